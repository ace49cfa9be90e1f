"""Inception Score, KID and k-NN precision/recall by torch-fidelity over *our* extractors' features and logits (the
digits classifier or Inception) in float64, with its protocol's defaults: IS over 10 splits shuffled with seed 2020,
KID with the cubic polynomial kernel over 100 subsets of 1000, precision/recall with k = 3; class accuracy."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

TORCH_FIDELITY_SEED = 2020  # torch-fidelity's rng_seed: IS shuffle and KID subsets
Array = np.ndarray | torch.Tensor


InceptionScore = NamedTuple("InceptionScore", [("mean", float), ("std", float), ("splits", int)])
KernelInceptionDistance = NamedTuple("KernelInceptionDistance", [("mean", float), ("std", float),
                                                                 ("subset_size", int), ("subsets", int)])
PrecisionRecall = NamedTuple("PrecisionRecall", [("precision", float), ("recall", float)])


def _as_2d(x: Array, name: str) -> torch.Tensor:
    """float64 (N, D) on the CPU; torch-fidelity only asserts shapes (gone under python -O) and checks no values."""
    x = torch.as_tensor(x).detach()
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x.to(device="cpu", dtype=torch.float64)


def _real_fake(real_ND: Array, fake_MD: Array) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets through `_as_2d`, checked to share their dimension."""
    real_ND, fake_MD = _as_2d(real_ND, "real features"), _as_2d(fake_MD, "fake features")
    if real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(f"feature dims differ: real {real_ND.shape[1]} vs fake {fake_MD.shape[1]}")
    return real_ND, fake_MD


def inception_score(logits_NK: Array, splits: int = 10,
                    shuffle_seed: int | None = TORCH_FIDELITY_SEED) -> InceptionScore:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, mean and std over `splits` (torch-fidelity, float64).

    Shuffled with `shuffle_seed` before splitting (None: contiguous splits); samples sorted by class would
    otherwise put one class in each split and give an IS near 1.
    """
    logits_NK = _as_2d(logits_NK, "logits")
    if splits < 1 or (n := logits_NK.shape[0]) < splits:
        raise ValueError(f"inception_score needs 1 <= splits <= N, got splits={splits}, N={n}")
    out = isc_features_to_metric(logits_NK, splits=splits, shuffle=shuffle_seed is not None,
                                 rng_seed=shuffle_seed or 0)  # fmt: skip
    return InceptionScore(out["inception_score_mean"], out["inception_score_std"], splits)


def kernel_inception_distance(real_features_ND: Array, fake_features_MD: Array, subset_size: int = 1000,
                              subsets: int = 100, seed: int = TORCH_FIDELITY_SEED) -> KernelInceptionDistance:
    """Unbiased MMD^2, kernel (x.y / D + 1)^3, mean and std over `subsets` random subsets (torch-fidelity, float64).

    The subset size is min(`subset_size`, N_real, N_fake): 1000 (torch-fidelity's and the KID paper's) when both
    sets allow it, else the smaller set, so that a few hundred samples still get a KID. The estimate is unbiased
    at any subset size; only its spread grows as the subsets shrink.
    """
    real_ND, fake_MD = _real_fake(real_features_ND, fake_features_MD)
    size = min(subset_size, real_ND.shape[0], fake_MD.shape[0])
    if size < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 and at least 2 samples in each set, got subsets={subsets}, "
                         f"N_real={real_ND.shape[0]}, N_fake={fake_MD.shape[0]}")  # fmt: skip
    out = kid_features_to_metric(fake_MD, real_ND, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                 verbose=False)  # fmt: skip
    return KernelInceptionDistance(out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"],
                                   size, subsets)  # fmt: skip


def precision_recall(real_features_ND: Array, fake_features_MD: Array, k: int = 3,
                     batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN hypersphere manifolds (torch-fidelity, float64).

    precision = share of fakes inside the real manifold, recall = share of reals inside the fake manifold.
    Distances `batch_size` rows at a time (torch-fidelity's save_cpu_ram path): memory O(batch_size * N).
    """
    real_ND, fake_MD = _real_fake(real_features_ND, fake_features_MD)
    n, m = real_ND.shape[0], fake_MD.shape[0]
    if k < 1 or min(n, m) <= k:
        raise ValueError(f"k-NN manifolds need 1 <= k < N for both sets, got k={k}, N_real={n}, N_fake={m}")
    out = prc_features_to_metric(fake_MD, real_ND, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True,
                                 verbose=False)  # fmt: skip
    # torch-fidelity averages the 0/1 hits in float32; both are shares of a count, recovered exactly here.
    return PrecisionRecall(round(out["precision"] * m) / m, round(out["recall"] * n) / n)


def class_consistency_accuracy(logits_or_pred: Array, requested_labels_N: Array) -> float:
    """Share of conditional samples whose predicted class (argmax of logits (N, K), or classes (N,)) is the one
    they were asked for."""
    pred = torch.as_tensor(logits_or_pred).detach().cpu()
    labels_N = torch.as_tensor(requested_labels_N).detach().cpu().long()
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    elif pred.ndim != 1:
        raise ValueError(f"expected logits (N, K) or predicted classes (N,), got shape {tuple(pred.shape)}")
    if labels_N.ndim != 1 or labels_N.shape[0] != pred.shape[0]:
        raise ValueError(f"requested labels must be ({pred.shape[0]},), got {tuple(labels_N.shape)}")
    if pred.shape[0] == 0:
        raise ValueError("class_consistency_accuracy of zero samples is undefined")
    return float((pred.long() == labels_N).double().mean())
