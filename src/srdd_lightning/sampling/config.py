"""What the sampler takes and returns (settings, editing constraints, outputs, cost), shared by all its callers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union, get_args

import torch

GuidanceSchedule = Literal["linear", "constant"]
ResampleMode = Literal["none", "simple", "mask", "pc", "renoise"]
PerScale = Union[float, list[float]]  # one value for every scale, or one per scale of the sampling schedule
RESAMPLE_MODES: tuple[str, ...] = get_args(ResampleMode)
# Fields that take one value per scale of the sampling schedule (cfg_schedule only as an explicit list).
PER_SCALE_FIELDS = ("cfg_schedule", "top_k", "top_p", "temperature", "resample", "refine_steps", "p_resample",
                    "refine_temperature")


def _finite_nonneg(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _int_nonneg(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0


def _probability(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v <= 1  # NaN fails both comparisons


def _check(name: str, value: Any, ok: Callable[[Any], bool], rule: str, per_scale: bool = True) -> None:
    """Raise a one-line ValueError naming ``--name`` unless ``value`` (or each entry of a per-scale list) passes ``ok``."""
    if per_scale and isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"--{name} is an empty list: give one value, or one per scale")
        bad = [v for v in value if not ok(v)]
        if bad:
            raise ValueError(f"--{name} must be {rule} at every scale, got {bad[0]!r} in {list(value)}")
    elif not ok(value):
        raise ValueError(f"--{name} must be {rule}, got {value!r}")


@dataclass
class SamplingConfig:
    """How to sample; each per-scale field takes one value or a list with one entry per scale.

    Guidance follows VAR: ``logits = (1 + t) * cond - t * uncond`` with ``t`` the weight at that scale; ``linear``
    ramps ``t = cfg * k / (K - 1)`` (none at the first scale, VAR's default), ``constant`` is ``t = cfg``.
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
    """Refinement of a scale, R times (README "Refinement"): ``simple`` redraws the scale from its prediction (the
    state I_(k-1) is unchanged, so this is a fresh draw); ``mask`` keeps the tokens whose probability is >=
    ``p_resample`` and redraws the others; ``pc`` (predictor-corrector) redraws and keeps a new token only where
    its probability is higher; ``renoise`` completes the image, re-degrades the completed latent onto the coarser
    scales (the forward process M(k-1) applied to the model's estimate of x_0) and predicts the scale again."""
    refine_steps: int | list[int] = 0
    """Refinement steps R per scale (simple/mask/pc reuse the scale's prediction; each renoise step costs the
    passes of the remaining scales plus one of this scale)."""
    p_resample: PerScale = 0.5
    """Mask resampling: tokens whose probability under the model is >= this are kept."""
    refine_temperature: PerScale | None = None
    """Temperature of the redraws during refinement (null: ``temperature``); below 1 anneals towards the mode."""

    def __post_init__(self) -> None:
        # Every caller (srdd sample, callbacks, the table, a notebook) gets the same check, before any model is
        # loaded; messages name the CLI option, the one spelling users see. Lengths of per-scale lists need the
        # schedule and are checked by check_schedule once it is known.
        if self.schedule is not None:
            from srdd_lightning.models.scales import as_schedule

            try:
                as_schedule(self.schedule)
            except (TypeError, ValueError) as e:
                raise ValueError(f"--schedule: {e}") from None
        _check("cfg", self.cfg, _finite_nonneg, "a finite number >= 0 (0: no guidance)", per_scale=False)
        if isinstance(self.cfg_schedule, str):
            if self.cfg_schedule not in get_args(GuidanceSchedule):
                raise ValueError(f"--cfg_schedule must be linear, constant or a list of weights, got {self.cfg_schedule!r}")
        else:
            _check("cfg_schedule", self.cfg_schedule, _finite_nonneg, "a finite weight >= 0")
        _check("top_k", self.top_k, _int_nonneg, "an integer >= 0 (0: off)")
        _check("top_p", self.top_p, _probability, "in [0, 1] (1: off)")
        _check("temperature", self.temperature, _finite_nonneg, "a finite number >= 0 (0: greedy)")
        _check("resample", self.resample, lambda v: v in RESAMPLE_MODES, f"one of {', '.join(RESAMPLE_MODES)}")
        _check("refine_steps", self.refine_steps, _int_nonneg, "an integer >= 0")
        _check("p_resample", self.p_resample, _probability, "in [0, 1]")
        if self.refine_temperature is not None:
            _check("refine_temperature", self.refine_temperature, _finite_nonneg, "a finite number >= 0 (0: greedy)")

    def check_schedule(self, schedule: Sequence[int]) -> None:
        """Every per-scale list has one entry per scale of the sampling ``schedule`` (known only with the model)."""
        for name in PER_SCALE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) != len(schedule):
                raise ValueError(f"--{name} has {len(value)} entries but the sampling schedule {list(schedule)} has "
                                 f"{len(schedule)} scales: give one value, or one per scale")  # fmt: skip

    def per_scale(self, name: str, num_scales: int) -> list:
        """The value of field ``name`` at each of ``num_scales`` scales (a list must have exactly that length)."""
        value = getattr(self, name)
        if name == "refine_temperature" and value is None:
            value = self.temperature
        if isinstance(value, (list, tuple)):
            if len(value) != num_scales:
                raise ValueError(f"--{name} has {len(value)} entries but the sampling schedule has {num_scales} scales")
            return list(value)
        return [value] * num_scales

    def to_dict(self) -> dict:
        """Plain values, recorded next to samples and in tables."""
        return asdict(self)


@dataclass
class EditSpec:
    """Known tokens forced during sampling (zero-shot editing); the rest is generated, and harmonised by resampling."""

    tokens: list[torch.Tensor]  # the reference's token maps on the sampling schedule (tokenizer.img_to_tokens)
    mask_Bhw: torch.Tensor | None = None  # latent-grid keep mask (1: the reference), resized to each scale's pn x pn
    keep_scales: int = 0  # every token of the first n scales is forced, whatever the mask (superres, reconstruct)


@dataclass
class SamplingCost:
    """Compute spent per image: transformer evaluations and the tokens they processed."""

    # scale evaluations per image: one per scale plus refinement's; a pass only some samples needed counts as that share
    forward_passes: float = 0
    tokens: float = 0  # query tokens per image, counting the doubled guidance batch (the linear layers' FLOPs)
    attention_pairs: float = 0  # query-key pairs per image (counting guidance): the mask decides, markov << causal
    per_scale_passes: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleOutput:
    """Images in [-1, 1], the sampled token maps, and what they cost."""

    images: torch.Tensor
    tokens: list[torch.Tensor]
    cost: SamplingCost
    schedule: tuple[int, ...] = ()
    tokens_per_sample: torch.Tensor | None = None  # (B,) query tokens of each sample's passes (a policy's cost)


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
