"""What the sampler takes and returns: settings, editing constraints, outputs and their cost.

These types are shared by the sampler, validation callbacks, ``srdd sample``, evaluation and the
resampling policy, so that every place that generates images says the same thing about how.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Union

import torch

GuidanceSchedule = Literal["linear", "constant"]
ResampleMode = Literal["none", "simple", "mask"]
# A setting given once for every scale, or as one value per scale of the sampling schedule.
PerScale = Union[float, list[float]]


@dataclass
class SamplingConfig:
    """How to sample; each per-scale field takes one value or a list with one entry per scale.

    Guidance follows VAR: ``logits = (1 + t) * cond - t * uncond`` with ``t`` the guidance weight at
    that scale; ``linear`` ramps ``t = cfg * k / (K - 1)`` (no guidance at the first scale, VAR's
    default), ``constant`` uses ``t = cfg`` everywhere, a list gives ``t`` per scale.
    """

    schedule: list[int] | None = None
    """Scales to run, a subset of the trained ``patch_nums`` ending at the last one (None: all trained scales)."""
    cfg: float = 1.5
    """Classifier-free guidance weight (0 disables guidance and the doubled batch)."""
    cfg_schedule: GuidanceSchedule | list[float] = "linear"
    """``linear`` (VAR's ramp), ``constant``, or an explicit list of weights, one per scale (then ``cfg`` is unused)."""
    top_k: int | list[int] = 900
    """Keep the k most likely tokens (0: off). VAR's FID protocol: 900."""
    top_p: float | list[float] = 0.96
    """Nucleus sampling: keep the smallest set with this probability mass (1.0: off). VAR's FID protocol: 0.96."""
    temperature: PerScale = 1.0
    """Softmax temperature of the (guided) logits."""
    resample: ResampleMode | list[ResampleMode] = "none"
    """Refinement at a scale: ``simple`` re-degrades the state and predicts the scale again; ``mask`` does the
    same but keeps the tokens whose probability is >= ``p_resample`` and redraws only the others."""
    refine_steps: int | list[int] = 0
    """Refinement steps R per scale (each costs one extra forward pass of that scale)."""
    p_resample: PerScale = 0.5
    """Mask resampling: tokens whose probability under the model is >= this are kept."""

    def __post_init__(self) -> None:
        if self.cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")

    def per_scale(self, name: str, num_scales: int) -> list:
        """The value of field ``name`` at each of ``num_scales`` scales (a list must have exactly that length)."""
        value = getattr(self, name)
        if name == "cfg_schedule" and isinstance(value, str):
            raise ValueError("cfg_schedule as a name is expanded by the sampler, not per_scale")
        if isinstance(value, (list, tuple)):
            if len(value) != num_scales:
                raise ValueError(
                    f"{name} has {len(value)} entries but the sampling schedule has {num_scales} scales"
                )
            return list(value)
        return [value] * num_scales

    def to_dict(self) -> dict:
        """Plain values, recorded next to samples and in tables."""
        return asdict(self)


@dataclass
class EditSpec:
    """Known tokens forced during sampling (zero-shot editing).

    ``tokens`` are the reference image's per-scale token maps (``tokenizer.img_to_tokens``) on the
    sampling schedule; ``mask_Bhw`` (latent resolution, 1 = keep the reference) is resized to each
    scale's ``pn x pn`` grid; ``keep_scales`` forces every token of the first n scales regardless of
    the mask (super-resolution and reconstruction). At each scale the kept positions take the
    reference tokens and the rest is generated; with resampling the generated part harmonises.
    """

    tokens: list[torch.Tensor]
    mask_Bhw: torch.Tensor | None = None
    keep_scales: int = 0


@dataclass
class SamplingCost:
    """Compute spent per image: transformer evaluations and the tokens they processed."""

    forward_passes: int = 0
    """Scale evaluations of the transformer (one per scale plus one per refinement step)."""
    tokens: int = 0
    """Query tokens processed, counting the doubled guidance batch (the linear-layer FLOPs scale with this)."""
    attention_pairs: int = 0
    """Query-key pairs attended (counting guidance), which the mask decides: markov << causal."""
    per_scale_passes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleOutput:
    """Images in [-1, 1], the sampled token maps, and what they cost."""

    images: torch.Tensor
    tokens: list[torch.Tensor]
    cost: SamplingCost
    schedule: tuple[int, ...] = ()


def as_seed_list(seeds: Sequence[int] | torch.Tensor | int | None, batch: int) -> list[int] | None:
    """Per-sample seeds: a list, a tensor, or one int expanded to ``seed + i``."""
    if seeds is None:
        return None
    if isinstance(seeds, int):
        return [seeds + i for i in range(batch)]
    out = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    if len(out) != batch:
        raise ValueError(f"got {len(out)} seeds for a batch of {batch}")
    return out
