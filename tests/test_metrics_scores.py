"""IS, precision/recall and KID come from torch-fidelity: they must give what our former code gave.

The project's own float64 Inception Score and k-NN precision/recall (removed from src/ once torch-fidelity took
over) are kept below, verbatim, as the reference; KID, which we never had, is checked against the unbiased
MMD^2 written out in a few lines.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srdd_lightning.metrics import inception_score, kernel_inception_distance, precision_recall


def gaussian_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Correlated Gaussian features: x = z A + shift."""
    rng = np.random.default_rng(seed)
    a_DD = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a_DD + shift


# ---------------------------------------------------------------------------------------------
# the former implementations (src/srdd_lightning/metrics/scores.py before torch-fidelity), the reference
# ---------------------------------------------------------------------------------------------


def old_inception_score(logits_NK, splits=10, shuffle_seed=None):
    logits_NK = torch.as_tensor(logits_NK).detach().to(torch.float64).cpu()
    n = logits_NK.shape[0]
    if shuffle_seed is not None:
        logits_NK = logits_NK[torch.as_tensor(np.random.RandomState(shuffle_seed).permutation(n))]
    log_p_NK = logits_NK.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        log_p = log_p_NK[i * n // splits : (i + 1) * n // splits]
        log_py_K = torch.logsumexp(log_p, dim=0) - np.log(log_p.shape[0])  # log mean_x p(y|x)
        kl_N = (log_p.exp() * (log_p - log_py_K)).sum(dim=1)
        scores.append(float(kl_N.mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_nn_radii(x_ND, k, batch_size):
    return torch.cat([torch.cdist(xb, x_ND).kthvalue(k + 1, dim=1).values for xb in x_ND.split(batch_size)])


def _inside_any_ball(query_MD, centres_ND, radii_N, batch_size):
    return torch.cat([(torch.cdist(qb, centres_ND) <= radii_N).any(dim=1) for qb in query_MD.split(batch_size)])


def old_precision_recall(real_features_ND, fake_features_MD, k=3, batch_size=1024):
    real_ND = torch.as_tensor(real_features_ND).detach().to(torch.float64)
    fake_MD = torch.as_tensor(fake_features_MD).detach().to(torch.float64)
    real_radii_N = _kth_nn_radii(real_ND, k, batch_size)
    fake_radii_M = _kth_nn_radii(fake_MD, k, batch_size)
    precision = _inside_any_ball(fake_MD, real_ND, real_radii_N, batch_size).double().mean()
    recall = _inside_any_ball(real_ND, fake_MD, fake_radii_M, batch_size).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------


def _logit_cases():
    g = torch.Generator().manual_seed(0)
    yield "random", torch.randn(503, 20, generator=g) * 3, 7
    yield "one split", torch.randn(64, 10, generator=g), 1
    yield "float32 like an extractor", (torch.randn(1000, 10, generator=g) * 5).float(), 10
    # Sorted by class, as `srdd sample` writes them: only the shuffle keeps each split from holding one class.
    labels = torch.arange(400) // 40
    yield "sorted by class", 8.0 * F.one_hot(labels, 10).float() + torch.randn(400, 10, generator=g), 8


@pytest.mark.parametrize("case", list(_logit_cases()), ids=lambda c: c[0])
def test_inception_score_equals_the_former_implementation(case):
    _, logits, splits = case
    ours = inception_score(logits, splits=splits)  # torch-fidelity's defaults: shuffled with seed 2020
    mean, std = old_inception_score(logits, splits=splits, shuffle_seed=2020)
    assert ours.mean == pytest.approx(mean, rel=1e-10)
    assert ours.std == pytest.approx(std, rel=1e-7, abs=1e-12)
    assert ours.splits == splits
    unshuffled = inception_score(logits, splits=splits, shuffle_seed=None)
    assert unshuffled.mean == pytest.approx(old_inception_score(logits, splits=splits)[0], rel=1e-10)


def test_inception_score_bounds_and_bad_input():
    assert inception_score(torch.zeros(100, 10), splits=5).mean == pytest.approx(1.0, abs=1e-12)
    confident = 30.0 * F.one_hot(torch.arange(200) % 10, 10).float()
    score = inception_score(confident, splits=4, shuffle_seed=None)  # every split holds 5 of each class
    assert score.mean == pytest.approx(10.0, rel=1e-6) and score.std < 1e-6
    sorted_by_class = 30.0 * F.one_hot(torch.arange(2000) // 200, 10).float()
    assert inception_score(sorted_by_class, splits=10).mean > 9.5  # shuffled: ~200 random samples per split
    assert inception_score(sorted_by_class, splits=10, shuffle_seed=None).mean == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(3, 10), splits=10)
    with pytest.raises(ValueError, match="2-D"):
        inception_score(torch.zeros(3), splits=1)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(torch.full((4, 3), float("nan")), splits=1)


# ---------------------------------------------------------------------------------------------
# precision / recall
# ---------------------------------------------------------------------------------------------


def _feature_cases():
    x = gaussian_features(300, 8, seed=11)
    yield "identical", x, x, 3
    yield "disjoint", x, x + 100.0, 3
    yield "half covered", x, x[x[:, 0] > 0] + 0.01, 3
    yield "shifted, k=5", gaussian_features(257, 16, seed=12), gaussian_features(190, 16, seed=13, shift=0.4), 5
    yield "float32, more rows than a batch", gaussian_features(1500, 12, seed=14).astype(np.float32), \
        gaussian_features(1100, 12, seed=15, shift=0.2).astype(np.float32), 3  # fmt: skip


@pytest.mark.parametrize("case", list(_feature_cases()), ids=lambda c: c[0])
def test_precision_recall_equals_the_former_implementation(case):
    _, real, fake, k = case
    ours = precision_recall(real, fake, k=k)
    assert (ours.precision, ours.recall) == old_precision_recall(real, fake, k=k)  # the same shares, exactly
    assert precision_recall(real, fake, k=k, batch_size=64) == ours  # batching changes the memory, not the value


def test_precision_recall_direction_and_bad_input():
    x = gaussian_features(300, 8, seed=11)
    assert precision_recall(x, x) == (1.0, 1.0) and precision_recall(x, x + 100.0) == (0.0, 0.0)
    p, r = precision_recall(x, x[x[:, 0] > 0] + 0.01)  # fakes cover half the reals: precise, half the recall
    assert p > 0.9 and 0.3 < r < 0.85
    with pytest.raises(ValueError, match="dims differ"):
        precision_recall(x, x[:, :4])
    with pytest.raises(ValueError, match="k < N"):
        precision_recall(x[:3], x, k=3)


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------


def unbiased_mmd2_cubic(x_ND: np.ndarray, y_ND: np.ndarray) -> float:
    """MMD^2 with k(a, b) = (a.b / D + 1)^3, diagonals of K_xx and K_yy left out (Binkowski et al. 2018)."""
    d, m = x_ND.shape[1], x_ND.shape[0]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x_ND, x_ND), (y_ND, y_ND), (x_ND, y_ND)))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_is_the_unbiased_cubic_mmd():
    x, y = gaussian_features(200, 10, seed=1), gaussian_features(200, 10, seed=2, shift=0.5)
    # Subsets as large as both sets are permutations of them: KID is then the full-sample estimate.
    kid = kernel_inception_distance(x, y, subsets=1)
    assert kid.subset_size == 200 and kid.subsets == 1 and kid.std == 0.0
    assert kid.mean == pytest.approx(unbiased_mmd2_cubic(y, x), rel=1e-10)
    assert kid.mean > 0.01


def test_kid_subsets_size_and_determinism():
    x = gaussian_features(4200, 16, seed=3)
    real, same, shifted = x[:3000], x[3000:], x[3000:] + 0.3
    kid_same, kid_shifted = (kernel_inception_distance(real, f, subsets=20) for f in (same, shifted))
    assert kid_same.subset_size == 1000  # torch-fidelity's subset size when both sets allow it
    assert kernel_inception_distance(real, same[:30]).subsets == 100  # and its subset count
    assert abs(kid_same.mean) < kid_same.std  # unbiased: about 0, may be < 0 (the subsets overlap: no 1/sqrt(100))
    assert kid_shifted.mean > 20 * kid_same.std and kid_shifted.std > 0
    assert kernel_inception_distance(real, shifted, subsets=20) == kid_shifted  # seeded subsets
    small = kernel_inception_distance(real, shifted[:40], subsets=10)
    assert small.subset_size == 40  # min(1000, n): every sample set gets a KID
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(real, shifted[:1])
    with pytest.raises(ValueError, match="dims differ"):
        kernel_inception_distance(real, shifted[:, :4])
