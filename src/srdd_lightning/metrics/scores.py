"""Inception Score, k-NN precision/recall and class-consistency accuracy, from features or logits."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class InceptionScore(NamedTuple):
    mean: float
    std: float


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _as_2d(x: np.ndarray | torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x.to(dtype)


def inception_score(
    logits_NK: np.ndarray | torch.Tensor, splits: int = 10, shuffle_seed: int | None = None
) -> InceptionScore:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean prediction; mean and std over `splits`.

    Computed in float64 from logits (Inception: 'logits_unbiased'); splits are contiguous
    chunks, shuffled first when `shuffle_seed` is given (torch-fidelity shuffles with seed 2020).
    """
    logits_NK = _as_2d(logits_NK, "logits", torch.float64).cpu()
    n = logits_NK.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"inception_score needs 1 <= splits <= N, got splits={splits}, N={n}")
    if shuffle_seed is not None:
        logits_NK = logits_NK[torch.as_tensor(np.random.RandomState(shuffle_seed).permutation(n))]
    log_p_NK = logits_NK.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        log_p = log_p_NK[i * n // splits : (i + 1) * n // splits]
        log_py_K = torch.logsumexp(log_p, dim=0) - np.log(log_p.shape[0])  # log mean_x p(y|x)
        kl_N = (log_p.exp() * (log_p - log_py_K)).sum(dim=1)
        scores.append(float(kl_N.mean().exp()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)))


def _kth_nn_radii(x_ND: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample (the self-distance 0 is the 1st)."""
    return torch.cat([torch.cdist(xb, x_ND).kthvalue(k + 1, dim=1).values for xb in x_ND.split(batch_size)])


def _inside_any_ball(
    query_MD: torch.Tensor, centres_ND: torch.Tensor, radii_N: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """For each query: is ||q - c_j|| <= r_j for some centre j?"""
    return torch.cat([(torch.cdist(qb, centres_ND) <= radii_N).any(dim=1) for qb in query_MD.split(batch_size)])


def precision_recall(
    real_features_ND: np.ndarray | torch.Tensor,
    fake_features_MD: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 1024,
) -> PrecisionRecall:
    """Improved precision/recall (Kynkäänniemi et al. 2019) with k-NN hypersphere manifolds.

    precision = share of fake samples inside the real manifold (some real x: ||f - x|| <= r_k(x));
    recall = share of real samples inside the fake manifold. Distances in float64, `batch_size`
    rows at a time, so memory is O(batch_size * N) rather than O(N * M).
    """
    real_ND = _as_2d(real_features_ND, "real features", torch.float64)
    fake_MD = _as_2d(fake_features_MD, "fake features", torch.float64).to(real_ND.device)
    if real_ND.shape[1] != fake_MD.shape[1]:
        raise ValueError(f"feature dims differ: real {real_ND.shape[1]} vs fake {fake_MD.shape[1]}")
    if k < 1 or min(real_ND.shape[0], fake_MD.shape[0]) <= k:
        raise ValueError(
            f"k-NN manifolds need 1 <= k < N for both sets, got k={k}, "
            f"N_real={real_ND.shape[0]}, N_fake={fake_MD.shape[0]}"
        )
    real_radii_N = _kth_nn_radii(real_ND, k, batch_size)
    fake_radii_M = _kth_nn_radii(fake_MD, k, batch_size)
    precision = _inside_any_ball(fake_MD, real_ND, real_radii_N, batch_size).double().mean()
    recall = _inside_any_ball(real_ND, fake_MD, fake_radii_M, batch_size).double().mean()
    return PrecisionRecall(float(precision), float(recall))


def class_consistency_accuracy(
    logits_or_pred: np.ndarray | torch.Tensor, requested_labels_N: np.ndarray | torch.Tensor
) -> float:
    """Share of conditional samples whose predicted class equals the class they were asked for.

    `logits_or_pred`: logits (N, K) from the extractor's classifier head, or predicted classes (N,).
    """
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
