"""Reference statistics of real data, computed once per (dataset, extractor, resolution) and cached in
`<cache_dir>/<dataset>-<extractor.cache_key>-<res>px[-n<num_images>].npz`: float64 mu (D,) and sigma (D, D), the image
count, a seeded uniform subsample of the real features (float32, at most 10k: all of them for the digits; KID and
precision/recall use it) and the metadata checked on every load."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from srdd_lightning.utils.io import atomic_write

from .features import FeatureExtractor, check_uint8_images
from .frechet import FeatureStats

CACHE_FORMAT = "srdd-reference-stats-v1"


@dataclass
class ReferenceStats:
    """Gaussian statistics (and a feature subsample) of one real dataset under one extractor."""

    mu_D: np.ndarray
    sigma_DD: np.ndarray
    count: int
    dataset: str
    extractor: str
    resolution: int
    features_ND: np.ndarray | None = None
    path: Path | None = None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def reference_cache_path(cache_dir: str | os.PathLike, dataset_name: str, extractor_key: str, resolution: int,
                         num_images: int | None = None) -> Path:
    """`<cache_dir>/<dataset>-<extractor>-<res>px.npz`, with `-n<num_images>` when a subset is used."""
    suffix = f"-n{num_images}" if num_images is not None else ""
    return Path(cache_dir) / f"{_safe(dataset_name)}-{_safe(extractor_key)}-{int(resolution)}px{suffix}.npz"


@torch.no_grad()
def compute_reference_stats(extractor: FeatureExtractor, images: Iterable, resolution: int,
                            num_images: int | None = None, max_stored_features: int = 10_000,
                            seed: int = 0) -> tuple[FeatureStats, np.ndarray]:
    """Stream uint8 batches (B, 3, res, res) — or (images, labels, ...) tuples — through `extractor` (the first
    `num_images`); the statistics and a uniform subsample (reservoir sampling, `seed`) of <= `max_stored_features`."""
    stats = FeatureStats(extractor.feature_dim)
    rng = np.random.default_rng(seed)
    reservoir: np.ndarray | None = None
    seen = 0
    for batch in images:
        img_B3HW = batch[0] if isinstance(batch, (tuple, list)) else batch
        img_B3HW = img_B3HW["image"] if isinstance(img_B3HW, dict) else img_B3HW
        check_uint8_images(img_B3HW)
        if tuple(img_B3HW.shape[-2:]) != (resolution, resolution):
            raise ValueError(f"reference images are {tuple(img_B3HW.shape[-2:])}, but the statistics are keyed to "
                             f"{resolution}x{resolution}; pass the resolution the images really have")
        if num_images is not None:
            img_B3HW = img_B3HW[: num_images - seen]
        features_BD = extractor(img_B3HW).detach().double().cpu()
        stats.update(features_BD)
        f_np = features_BD.float().numpy()
        if reservoir is None:
            reservoir = np.empty((max_stored_features, f_np.shape[1]), dtype=np.float32)
        for j, row in enumerate(f_np):  # reservoir sampling: item t is kept with probability K / (t + 1)
            t = seen + j
            if (slot := t if t < max_stored_features else rng.integers(0, t + 1)) < max_stored_features:
                reservoir[slot] = row
        seen += img_B3HW.shape[0]
        if num_images is not None and seen >= num_images:
            break
    if num_images is not None and seen < num_images:
        raise ValueError(f"asked for reference statistics of {num_images} images, but the data holds only {seen}")
    if seen < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {seen}")
    return stats, reservoir[: min(seen, max_stored_features)]


def save_reference_stats(path: str | os.PathLike, ref: ReferenceStats) -> Path:
    """Write `ref` to `path` atomically (utils.io.atomic_write)."""
    meta = {"format": CACHE_FORMAT, "dataset": ref.dataset, "extractor": ref.extractor,
            "resolution": int(ref.resolution), "count": int(ref.count)}
    arrays = {"mu": np.asarray(ref.mu_D, np.float64), "sigma": np.asarray(ref.sigma_DD, np.float64),
              "meta": np.array(json.dumps(meta))}
    if ref.features_ND is not None:
        arrays["features"] = np.asarray(ref.features_ND, np.float32)
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_reference_stats(path: str | os.PathLike) -> ReferenceStats:
    """Read a file written by `save_reference_stats`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            ref = ReferenceStats(mu_D=z["mu"], sigma_DD=z["sigma"], count=int(meta["count"]), dataset=meta["dataset"],
                                 extractor=meta["extractor"], resolution=int(meta["resolution"]),
                                 features_ND=z["features"] if "features" in z.files else None, path=path)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable reference-statistics file ({e}); delete it to recompute") from e
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {CACHE_FORMAT!r}; delete it to recompute")
    return ref


def reference_stats(dataset_name: str, resolution: int, extractor: FeatureExtractor,
                    images_iter_fn: Callable[[], Iterable], cache_dir: str | os.PathLike, num_images: int | None = None,
                    max_stored_features: int = 10_000, recompute: bool = False) -> ReferenceStats:
    """The cached statistics for (dataset, extractor, resolution[, num_images]), computed and cached on a miss.

    `images_iter_fn()` returns an iterable of uint8 (B, 3, res, res) batches (or tuples whose first item is one); it is
    called only on a cache miss. A cached file disagreeing with the request is a ValueError (delete it, or recompute).
    """
    path = reference_cache_path(cache_dir, dataset_name, extractor.cache_key, resolution, num_images)
    if path.is_file() and not recompute:
        ref = load_reference_stats(path)
        expected = {"dataset": dataset_name, "extractor": extractor.cache_key, "resolution": int(resolution)}
        problems = [f"{k}={getattr(ref, k)!r} (expected {v!r})" for k, v in expected.items() if getattr(ref, k) != v]
        if num_images is not None and ref.count != num_images:
            problems.append(f"count={ref.count} (expected {num_images})")
        if ref.mu_D.shape != (extractor.feature_dim,) or ref.sigma_DD.shape != (extractor.feature_dim,) * 2:
            problems.append(f"feature dim {ref.mu_D.shape} (expected {extractor.feature_dim})")
        # KID and precision/recall need the real features: all of them up to max_stored_features.
        stored = 0 if ref.features_ND is None else len(ref.features_ND)
        if stored < min(ref.count, max_stored_features):
            problems.append(f"{stored} stored real features (expected {min(ref.count, max_stored_features)})")
        if problems:
            raise ValueError(f"cached reference statistics {path} do not match the request: {', '.join(problems)}; "
                             "delete the file to recompute it")
        return ref
    stats, features_ND = compute_reference_stats(extractor, images_iter_fn(), resolution, num_images=num_images,
                                                 max_stored_features=max_stored_features)
    ref = ReferenceStats(mu_D=stats.mean.numpy(), sigma_DD=stats.cov.numpy(), count=stats.n, dataset=dataset_name,
                         extractor=extractor.cache_key, resolution=int(resolution), features_ND=features_ND, path=path)
    save_reference_stats(path, ref)
    return ref
