"""Streaming feature statistics and the Fréchet distance between two Gaussians (FID).

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}), everything in float64 (float32 accumulation visibly
shifts FID; see notes/lightning-webdataset-fid.md §3.2). Ranks exchange (n, sum x, sum x x^T), never images.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist

ArrayLike = np.ndarray | torch.Tensor


class FeatureStats:
    """Running count, sum and sum of outer products of D-dim features, in float64."""

    def __init__(self, feature_dim: int, device: torch.device | str | None = None):
        if feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        device = torch.device(device if device is not None else "cpu")
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.sum_D = torch.zeros(feature_dim, dtype=torch.float64, device=device)
        self.outer_DD = torch.zeros(feature_dim, feature_dim, dtype=torch.float64, device=device)

    @classmethod
    def from_features(cls, features_ND: ArrayLike) -> FeatureStats:
        """Statistics of one (N, D) array of features."""
        features_ND = torch.as_tensor(features_ND)
        if features_ND.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(features_ND.shape)}")
        return cls(features_ND.shape[1], device=features_ND.device).update(features_ND)

    @property
    def device(self) -> torch.device:
        return self.sum_D.device

    @property
    def n(self) -> int:
        """Number of samples seen so far (on this rank, or globally after `all_reduce`)."""
        return int(self.count.item())

    def update(self, features_ND: ArrayLike) -> FeatureStats:
        """Add a batch of features (N, D); returns self."""
        features_ND = torch.as_tensor(features_ND)
        if features_ND.ndim != 2 or features_ND.shape[1] != self.feature_dim:
            raise ValueError(f"expected features of shape (N, {self.feature_dim}), got {tuple(features_ND.shape)}")
        x_ND = features_ND.detach().to(device=self.device, dtype=torch.float64)
        if not torch.isfinite(x_ND).all():
            raise ValueError("features contain NaN or Inf; refusing to corrupt the statistics")
        self.count += x_ND.shape[0]
        self.sum_D += x_ND.sum(dim=0)
        self.outer_DD += x_ND.T @ x_ND
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another set of statistics (e.g. another shard of the same samples); returns self."""
        if other.feature_dim != self.feature_dim:
            raise ValueError(f"cannot merge statistics of dim {other.feature_dim} into dim {self.feature_dim}")
        for name in ("count", "sum_D", "outer_DD"):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        return self

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> FeatureStats:
        """Sum the statistics over the ranks of `group` (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        # NCCL only reduces CUDA tensors; statistics kept on CPU travel through the current GPU.
        via_cuda = dist.get_backend(group) == "nccl" and self.device.type != "cuda"
        for name in ("count", "sum_D", "outer_DD"):
            t = getattr(self, name)
            buf = t.to(torch.device("cuda", torch.cuda.current_device())) if via_cuda else t
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            setattr(self, name, buf.to(self.device) if via_cuda else buf)
        return self

    @property
    def mean(self) -> torch.Tensor:
        """mu = sum x / n, float64 (D,)."""
        if self.n < 1:
            raise ValueError("no samples seen: the mean is undefined")
        return self.sum_D / self.n

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance S = (sum x x^T - n mu mu^T) / (n - 1), float64 (D, D)."""
        if (n := self.n) < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n}")
        mu_D = self.sum_D / n
        cov_DD = (self.outer_DD - n * torch.outer(mu_D, mu_D)) / (n - 1)
        return 0.5 * (cov_DD + cov_DD.T)  # exact symmetry despite round-off

    def frechet_distance(self, other: FeatureStats) -> float:
        """Fréchet distance between the Gaussians fitted to self and other."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)


def _as_float64(x: ArrayLike) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def _sqrtm_trace(a_DD: np.ndarray) -> tuple[float, float, bool]:
    """tr(sqrtm(A)), the largest |imaginary part| on the diagonal, and whether the root is finite."""
    root = scipy.linalg.sqrtm(a_DD)
    finite = bool(np.isfinite(root).all())
    max_imag = float(np.abs(np.diagonal(root).imag).max()) if np.iscomplexobj(root) else 0.0
    return float(np.trace(root).real), max_imag, finite


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6,
                     imag_atol: float = 1e-3) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), in float64.

    sqrtm(S1 S2) of two PSD matrices has a real spectrum; round-off gives it a tiny imaginary
    part, which is dropped. When it is non-finite or clearly complex (near-singular covariances,
    e.g. fewer samples than dimensions), both covariances get `eps * I` added, with a warning.
    """
    mu1, sigma1, mu2, sigma2 = map(_as_float64, (mu1, sigma1, mu2, sigma2))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"means must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must be ({d}, {d}) to match the means, got {s.shape}")
        if not np.isfinite(s).all():
            raise ValueError(f"{name} contains NaN or Inf")

    tr_covmean, max_imag, finite = _sqrtm_trace(sigma1 @ sigma2)
    if not finite or max_imag > imag_atol:
        warnings.warn(
            f"frechet_distance: sqrtm(S1 S2) is {'not finite' if not finite else f'complex (|imag| {max_imag:.3g})'}; "
            f"the covariances are near-singular (too few samples for {d} dims?). "
            f"Retrying with {eps:g} * I added to both; the value is approximate.", RuntimeWarning, stacklevel=2)
        offset = eps * np.eye(d)
        tr_covmean, max_imag, finite = _sqrtm_trace((sigma1 + offset) @ (sigma2 + offset))
        if not finite or max_imag > imag_atol:
            raise ValueError(
                f"frechet_distance: sqrtm(S1 S2) is still {'not finite' if not finite else 'complex'} "
                f"(|imag| {max_imag:.3g}) after adding {eps:g} * I; the covariances are unusable"
            )

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
