"""Statistics over training seeds: a number of the table is the mean ± std of one value per seed; two rows differ
beyond their noise when Welch's t-test over the seeds says so, and a paper claim is judged from those tests."""

from __future__ import annotations

from types import SimpleNamespace

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


def compare(a: dict, b: dict, alpha: float) -> tuple[str, float, float]:
    """One line comparing two table rows' FIDs (Welch's t-test at ``alpha``), the difference of means and its p."""
    d, p = seed_stat(a["per_seed"])[0] - seed_stat(b["per_seed"])[0], welch_p(a["per_seed"], b["per_seed"])
    verdict = "not testable (< 2 seeds a side)" if np.isnan(p) else "larger than its noise" if p < alpha else "within noise"
    return f"{a['label']} vs {b['label']}: ΔFID {d:+.2f} (Welch t-test over seeds, p = {p:.3f}): {verdict}", d, p


def claim_line(c: SimpleNamespace, rows: dict, sweeps: list[dict], alpha: float) -> str:
    """Whether this run supports one paper claim, with the numbers; "not measured" when its rows are absent."""
    if c.kind == "converges":  # FID non-increasing in R within the seeds' std, and the best R beats R = 0 beyond noise
        ok, parts = False, []
        for s in (s for s in sweeps if s["name"] in c.rows):
            pts = [(p["R"], p["per_seed"], *seed_stat(p["per_seed"])[:2]) for p in s["points"]]  # (R, per seed, mean, std)
            best = min(pts, key=lambda q: q[2])
            down = all(b[2] <= a[2] + np.nan_to_num(max(a[3], b[3])) for a, b in zip(pts, pts[1:]))
            p = welch_p(best[1], pts[0][1])
            ok |= down and best[0] != pts[0][0] and p < alpha
            parts += [f"FID {', '.join(f'{q[2]:.1f}' for q in pts)} at R = {[q[0] for q in pts]}, "
                      f"{'non-increasing' if down else 'rising'} within std, best R = {best[0]} (vs R = 0: p = {p:.3f})"]
        verdict = f"{'' if ok else 'not '}supported. " + "; ".join(parts) if parts else "not measured in this run"
    elif missing := [n for n in c.rows if n not in rows]:
        verdict = f"not measured in this run (no row {', '.join(missing)})"
    else:  # better: lower FID beyond noise; cheaper: not worse beyond noise, at <= max_cost of the tokens
        (text, d, p), (a, b) = compare(rows[c.rows[0]], rows[c.rows[1]], alpha), (rows[n]["per_seed"] for n in c.rows)
        r, worse = seed_stat(a, "tokens")[0] / seed_stat(b, "tokens")[0], d > 0 and p < alpha
        verdict = (f"{'not ' * (worse or r > c.max_cost)}supported. {text}; {r:.0%} of the tokens" if c.kind == "cheaper"
                   else f"{'supported' if d < 0 and p < alpha else 'contradicted' if worse else 'not resolved'}. {text}")
    return f"- **{c.text}**: {verdict}"


__all__ = ["claim_line", "compare", "seed_stat", "welch_p"]
