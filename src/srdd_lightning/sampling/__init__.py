"""The one sampler (guidance, top-k/top-p, resampling, editing, policy hook) and its config."""

from srdd_lightning.sampling.config import EditSpec, SampleOutput, SamplingConfig, SamplingCost, as_seed_list
from srdd_lightning.sampling.editing import (box_mask, inpaint, keep_mask_from_pixels, load_mask, outpaint, reconstruct,
                                             super_resolution)
from srdd_lightning.sampling.sampler import (RESAMPLE_MODES, RefineDecision, ResamplingPolicy, Sampler, ScaleSettings,
                                             ScaleStats, check_compatible, draw_tokens, filter_logits, guidance_weights,
                                             guided_logits, sampling_probs, scale_settings)

__all__ = [
    "EditSpec", "RESAMPLE_MODES", "RefineDecision", "ResamplingPolicy", "SampleOutput", "Sampler", "SamplingConfig",
    "SamplingCost", "ScaleSettings", "ScaleStats", "as_seed_list", "box_mask", "check_compatible", "draw_tokens",
    "filter_logits", "guidance_weights", "guided_logits", "inpaint", "keep_mask_from_pixels", "load_mask", "outpaint",
    "reconstruct", "sampling_probs", "scale_settings", "super_resolution",
]  # fmt: skip
