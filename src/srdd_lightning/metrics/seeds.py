"""Statistics over training seeds: a number of the table is the mean ± std of one value per seed."""

from __future__ import annotations

import numpy as np
from scipy import stats


def seed_stat(per_seed: dict, key: str = "fid") -> tuple[float, float, list[float]]:
    """(mean, std with ddof 1, the values) of ``per_seed[seed][key]`` over the seeds that have it."""
    v = [float(r[key]) for r in per_seed.values() if r.get(key) is not None]
    return float(np.mean(v)) if v else np.nan, float(np.std(v, ddof=1)) if len(v) > 1 else np.nan, v


def welch_p(a: dict, b: dict, key: str = "fid") -> float:
    """Two-sided p of Welch's t-test (unequal variances) of two rows' per-seed values; nan with < 2 seeds a side."""
    (_, sa, va), (_, sb, vb) = seed_stat(a, key), seed_stat(b, key)
    return float(stats.ttest_ind(va, vb, equal_var=False).pvalue) if np.nan_to_num(sa) + np.nan_to_num(sb) > 0 else np.nan


__all__ = ["seed_stat", "welch_p"]
