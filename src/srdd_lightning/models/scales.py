"""Scale schedules: the bookkeeping shared by the tokenizer, the generator and the sampler.

A schedule ``patch_nums`` is a tuple of patch sizes whose last entry is the latent size; scale ``k`` holds
``pn_k * pn_k`` tokens. Token maps travel as a list of ``(B, pn, pn)`` tensors or flattened coarse-to-fine (``idx_BL``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import numpy as np
import torch

Schedule = tuple[int, ...]

# VAR's released schedules (FoundationVision/VAR): 256 px (680 tokens, 16x16 latent) and 512 px (32x32 latent).
VAR_PATCH_NUMS_256: Schedule = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_PATCH_NUMS_512: Schedule = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
# 1024 px (64x64 latent; VAR released none): the 512 schedule, then 40, 48, 64. Sharing the 512 schedule's
# scales lets a 512 px model's embeddings seed a 1024 px one, and the added steps grow by x1.2-1.33, the ratios
# of the 512 schedule's last scales (18 -> 24 -> 32), so no scale jumps further than the model has learnt to:
# 13 scales, 10,240 tokens.
VAR_PATCH_NUMS_1024: Schedule = (*VAR_PATCH_NUMS_512, 40, 48, 64)


def as_schedule(patch_nums: Sequence[int]) -> Schedule:
    """Validate and normalise a schedule: positive, strictly increasing integers."""
    pns = tuple(int(p) for p in patch_nums)
    if not pns:
        raise ValueError("a scale schedule (patch_nums) needs at least one scale")
    if any(p <= 0 for p in pns) or any(b <= a for a, b in zip(pns, pns[1:])):
        raise ValueError(f"patch_nums must be strictly increasing positive integers, got {list(pns)}")
    return pns


def num_tokens(patch_nums: Sequence[int]) -> int:
    """Total tokens L = sum of pn^2 over the schedule (680 for VAR's 256 px schedule)."""
    return sum(p * p for p in patch_nums)


def scale_slices(patch_nums: Sequence[int]) -> list[slice]:
    """Position of each scale's tokens inside a flattened ``idx_BL`` sequence."""
    ends = list(accumulate(p * p for p in patch_nums))
    return [slice(end - p * p, end) for end, p in zip(ends, patch_nums)]


def scale_ids(patch_nums: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """``(L,)`` long tensor: the scale index of every token of the flattened sequence."""
    return torch.cat([torch.full((p * p,), k, dtype=torch.long, device=device) for k, p in enumerate(patch_nums)])


def flatten_tokens(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """List of ``(B, pn, pn)`` token maps -> ``(B, L)``."""
    return torch.cat([t.reshape(t.shape[0], -1) for t in tokens], dim=1)


def split_tokens(idx_BL: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """``(B, L)`` -> list of ``(B, pn, pn)`` token maps; the inverse of :func:`flatten_tokens`."""
    if idx_BL.shape[1] != num_tokens(patch_nums):
        raise ValueError(f"got {idx_BL.shape[1]} tokens, schedule {list(patch_nums)} has {num_tokens(patch_nums)}")
    return [idx_BL[:, s].reshape(-1, p, p) for s, p in zip(scale_slices(patch_nums), patch_nums)]


def subset_indices(schedule: Sequence[int], trained: Sequence[int]) -> list[int]:
    """Indices of ``schedule``'s scales inside the ``trained`` schedule: a subset of the trained scales that ends at
    the last one, so that the final state decodes at full resolution."""
    schedule, trained = as_schedule(schedule), as_schedule(trained)
    missing = [p for p in schedule if p not in trained]
    if missing:
        raise ValueError(f"schedule {list(schedule)} uses scales {missing} that are not among the trained scales {list(trained)}")
    if schedule[-1] != trained[-1]:
        raise ValueError(f"schedule {list(schedule)} must end at the last trained scale {trained[-1]}")
    return [trained.index(p) for p in schedule]


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Which of ``num_phi`` partially shared phi blends scale ``si`` of ``num_scales`` uses.

    VAR picks the phi whose tick is nearest to the relative position ``si / (num_scales - 1)``; the
    ticks are ``num_phi`` points evenly spaced in [1/(3n), 1 - 1/(3n)] for n = 4 (its release) and
    in [1/(2n), 1 - 1/(2n)] otherwise. Scales 2 and 7 of a 10-scale schedule sit halfway between
    two ticks; float64 rounding of this exact computation sends them to phi 1 and phi 3, and VAR's
    released weights depend on that, so it is computed the same way.
    """
    if num_phi == 1:
        return 0
    margin = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    ticks = np.linspace(margin, 1 - margin, num_phi)
    ratio = si / (num_scales - 1) if num_scales > 1 else 1.0
    return int(np.argmin(np.abs(ticks - ratio)))
