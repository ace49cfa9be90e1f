"""Offline evaluation of generated samples, and the digits classifier behind the "digits FID".

    srdd classifier --data data/digits --out runs/digits/classifier.pt
    srdd evaluate --samples results/x/samples.npz --data data/digits \\
        --extractor digits-classifier --classifier runs/digits/classifier.pt --out results/x/metrics.json
    srdd evaluate --samples DIR --data data/ffhq --extractor inception-v3-compat --inception_weights PATH

Samples are a folder of PNGs (``{index:06d}_c{class}.png``, the class part optional) or an ``.npz``
holding ``arr_0`` (uint8 NHWC) and optionally ``labels``; the settings ``srdd sample`` wrote into
``sampling.json`` beside them are copied into the result. Reference statistics are those of the
*train* split of the packed dataset, computed once per (dataset, extractor, resolution) and cached.
Every number says which extractor and how many samples produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srdd_lightning.data.index import ShardIndex
from srdd_lightning.data.stream import ValShards
from srdd_lightning.metrics import (
    FEATURE_EXTRACTORS,
    FeatureExtractor,
    FeatureStats,
    ReferenceStats,
    build_feature_extractor,
    class_consistency_accuracy,
    frechet_distance,
    inception_score,
    precision_recall,
    reference_stats,
)
from srdd_lightning.utils.images import load_png, to_uint8

DEFAULT_CACHE_DIR = "runs/reference_stats"
DEFAULT_CLASSIFIER = "runs/digits/classifier.pt"
SAMPLING_JSON = "sampling.json"
RESULT_FORMAT = "srdd-evaluation-v1"
IS_SHUFFLE_SEED = 2020  # torch-fidelity's rng_seed
_CLASS_IN_NAME = re.compile(r"_c(\d+)(?=\.[^.]+$)")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class EvaluationError(ValueError):
    """Bad input to the evaluation (no samples, wrong size, unknown extractor, missing weights): a clear message."""


# ---------------------------------------------------------------------------------------------
# Feature extractors from command-line options
# ---------------------------------------------------------------------------------------------


def extractor_from_options(
    extractor: str,
    classifier: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> FeatureExtractor:
    """Build the named extractor; errors name the missing file and the option that sets it."""
    if extractor not in FEATURE_EXTRACTORS:
        raise EvaluationError(f"unknown extractor {extractor!r} (--extractor); available: {sorted(FEATURE_EXTRACTORS)}")
    if extractor == "digits-classifier":
        if classifier is None:
            raise EvaluationError(
                "--extractor digits-classifier needs --classifier PATH (a checkpoint written by "
                f"`srdd classifier --data data/digits --out {DEFAULT_CLASSIFIER}`)"
            )
        if not Path(classifier).is_file():
            raise EvaluationError(
                f"digits classifier checkpoint {classifier} (--classifier) not found; train it with "
                f"`srdd classifier --data data/digits --out {classifier}`"
            )
        kwargs: dict[str, Any] = {"checkpoint_path": classifier}
    elif extractor == "inception-v3-compat":
        kwargs = {"weights_path": inception_weights}
    else:
        kwargs = {}
    try:
        ext = build_feature_extractor(extractor, **kwargs)
    except FileNotFoundError as e:
        raise EvaluationError(str(e)) from None
    return ext.to(device).eval()


def extractor_description(ext: FeatureExtractor) -> dict[str, Any]:
    """What produced the features: name, the cache key (name + weights fingerprint), dims and the weights file."""
    desc: dict[str, Any] = {"name": ext.name, "cache_key": ext.cache_key, "feature_dim": ext.feature_dim,
                            "num_classes": ext.num_classes}  # fmt: skip
    for attr in ("checkpoint_path", "weights_path"):
        if getattr(ext, attr, None) is not None:
            desc["weights"] = str(getattr(ext, attr))
    return desc


@torch.no_grad()
def extract(
    extractor: FeatureExtractor, images: torch.Tensor | Iterator[torch.Tensor], batch_size: int = 256
) -> tuple[FeatureStats, torch.Tensor, torch.Tensor | None]:
    """Features of uint8 images (N, 3, H, W) or of an iterator of such batches.

    Returns float64 statistics, the features (N, D) float32 on the CPU and the logits (N, K) or None.
    """
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    stats = FeatureStats(extractor.feature_dim)
    feats, logits = [], []
    for img_B3HW in batches:
        if extractor.has_logits:
            f_BD, l_BK = extractor.features_and_logits(img_B3HW.to(extractor.device))
            logits.append(l_BK.float().cpu())
        else:
            f_BD = extractor(img_B3HW.to(extractor.device))
        stats.update(f_BD)
        feats.append(f_BD.float().cpu())
    if not feats:
        raise EvaluationError("no images to extract features from")
    return stats, torch.cat(feats), (torch.cat(logits) if logits else None)


# ---------------------------------------------------------------------------------------------
# Reference statistics of a packed dataset
# ---------------------------------------------------------------------------------------------


def dataset_key(index: ShardIndex, split: str = "train") -> str:
    """``<name>-<split>-<hash>``: two packs with different contents never share cached statistics."""
    info = index.to_json()
    content = {"split": info["splits"][split], "extra": info.get("extra"), "source": info.get("source"),
               "resolution": info["resolution"]}  # fmt: skip
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]
    return f"{index.name}-{split}-{digest}"


def iter_split_uint8(
    index: ShardIndex, split: str, resolution: int | None = None, batch_size: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All images of one split once, in shard order, as uint8 (B, 3, R, R) batches with their labels."""
    ds = ValShards(index.shard_paths(split), resolution or index.resolution)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0)
    for img_B3HW, label_B in loader:
        yield to_uint8(img_B3HW), label_B


def load_split(index: ShardIndex, split: str, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole split in memory: uint8 images (N, 3, R, R) and labels (N,) (for small datasets only)."""
    imgs, labels = zip(*iter_split_uint8(index, split, resolution))
    return torch.cat(imgs), torch.cat(labels)


def dataset_reference(
    data: str | os.PathLike | ShardIndex,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    num_images: int | None = None,
    resolution: int | None = None,
    batch_size: int = 256,
) -> ReferenceStats:
    """Reference statistics of the train split of a packed dataset (computed once, then read from ``cache_dir``)."""
    index = data if isinstance(data, ShardIndex) else ShardIndex.load(data)
    res = resolution or index.resolution
    return reference_stats(
        dataset_key(index), res, extractor,
        lambda: (img for img, _ in iter_split_uint8(index, "train", res, batch_size)),
        cache_dir, num_images=num_images,
    )  # fmt: skip


def reference_description(ref: ReferenceStats, index: ShardIndex | None = None) -> dict[str, Any]:
    desc = {"dataset": ref.dataset, "split": "train", "count": ref.count, "resolution": ref.resolution,
            "extractor": ref.extractor, "cache": str(ref.path) if ref.path else None}  # fmt: skip
    if index is not None:
        desc["root"] = str(index.root)
    return desc


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def load_samples(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
    """uint8 images (N, 3, H, W), requested labels (N,) or None, and ``sampling.json`` beside them (or None).

    ``path`` is a folder of images (sorted by name; ``_c<class>`` before the extension gives the
    label) or an ``.npz`` with ``arr_0`` (N, H, W, 3) uint8 and optionally ``labels``.
    """
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"samples {path} (--samples) do not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise EvaluationError(f"sample folder {path} is empty: no image files (.png, .jpg, ...) in it")
        classes = [_CLASS_IN_NAME.search(p.name) for p in files]
        with_class = sum(m is not None for m in classes)
        if 0 < with_class < len(files):
            bad = next(p.name for p, m in zip(files, classes) if m is None)
            raise EvaluationError(f"{path}: {with_class} of {len(files)} file names carry a class (_c<k>), "
                                  f"but e.g. {bad} does not; all or none must")  # fmt: skip
        imgs = [load_png(p) for p in files]
        shapes = {tuple(i.shape) for i in imgs}
        if len(shapes) > 1:
            raise EvaluationError(f"images in {path} have different sizes: {sorted(shapes)}")
        images = torch.stack(imgs)
        labels = torch.tensor([int(m.group(1)) for m in classes]) if with_class else None
        settings_file = path / SAMPLING_JSON
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "arr_0" not in z.files:
                    raise EvaluationError(f"{path} has no 'arr_0' array of images (it holds {z.files})")
                arr = z["arr_0"]
                labels_np = z["labels"] if "labels" in z.files else None
        except EvaluationError:
            raise
        except Exception as e:
            raise EvaluationError(f"{path} is not a readable .npz file: {e}") from e
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise EvaluationError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        if arr.shape[0] == 0:
            raise EvaluationError(f"{path} holds no samples (arr_0 is empty)")
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        labels = None
        if labels_np is not None:
            if labels_np.shape != (arr.shape[0],):
                raise EvaluationError(f"{path}: labels must be ({arr.shape[0]},), got {labels_np.shape}")
            labels = torch.from_numpy(labels_np.astype(np.int64))
        settings_file = path.parent / SAMPLING_JSON
    else:
        raise EvaluationError(f"--samples must be a folder of images or an .npz file, got {path}")
    if images.shape[-1] != images.shape[-2]:
        raise EvaluationError(f"samples must be square, got {tuple(images.shape[-2:])}")
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    return images, labels, settings


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def is_splits(n: int) -> int:
    """Splits of the Inception Score: the customary 10, fewer for small sample counts (>= 50 per split)."""
    return max(1, min(10, n // 50))


def fid_from_stats(stats: FeatureStats, ref: ReferenceStats) -> float:
    """FID in float64 against cached reference statistics."""
    return frechet_distance(stats.mean, stats.cov, ref.mu_D, ref.sigma_DD)


def compute_metrics(
    stats: FeatureStats,
    features_ND: torch.Tensor | None,
    logits_NK: torch.Tensor | None,
    labels_N: torch.Tensor | None,
    ref: ReferenceStats,
    class_logits: bool,
    pr_k: int = 3,
) -> dict[str, Any]:
    """FID; IS when there are logits; precision/recall against the stored real features; class accuracy
    when the logits are those of a classifier over the dataset's own classes (``class_logits``)."""
    n = stats.n
    out: dict[str, Any] = {"fid": fid_from_stats(stats, ref), "num_samples": n}
    if logits_NK is not None:
        splits = is_splits(n)
        # Shuffled before splitting (torch-fidelity's seed): samples sorted by class would otherwise give one
        # class per split, and an IS near 1.
        score = inception_score(logits_NK, splits=splits, shuffle_seed=IS_SHUFFLE_SEED)
        out.update(inception_score=score.mean, inception_score_std=score.std, inception_score_splits=splits)
    if features_ND is not None and ref.features_ND is not None and min(n, len(ref.features_ND)) > pr_k:
        pr = precision_recall(ref.features_ND, features_ND, k=pr_k)
        out.update(precision=pr.precision, recall=pr.recall, precision_recall_k=pr_k,
                   precision_recall_real=int(len(ref.features_ND)))  # fmt: skip
    if class_logits and logits_NK is not None and labels_N is not None:
        out["class_accuracy"] = class_consistency_accuracy(logits_NK, labels_N)
    return out


def has_class_logits(extractor: FeatureExtractor, num_classes: int) -> bool:
    """Logits that classify the dataset's own classes (the digits classifier), not ImageNet's (Inception)."""
    return extractor.has_logits and extractor.name != "inception-v3-compat" and extractor.num_classes == num_classes


def evaluate_arrays(
    images: torch.Tensor,
    labels: torch.Tensor | None,
    index: ShardIndex,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    num_real: int | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Metrics of uint8 samples (N, 3, H, W) against the train split of ``index`` (checks the resolution)."""
    res = images.shape[-1]
    if res != index.resolution:
        raise EvaluationError(
            f"samples are {res}x{res} px but the reference dataset {index.root} is packed at {index.resolution} px; "
            f"evaluate against data packed at {res} px (e.g. `srdd data digits --resolution {res}`), or sample at "
            f"{index.resolution} px"
        )
    if images.shape[0] < 2:
        raise EvaluationError(f"FID needs at least 2 samples, got {images.shape[0]}")
    if labels is not None and index.conditional and int(labels.max()) >= index.num_classes:
        raise EvaluationError(f"sample labels go up to {int(labels.max())}, but {index.root} has {index.num_classes} classes")
    ref = dataset_reference(index, extractor, cache_dir, num_images=num_real, batch_size=batch_size)
    stats, feats, logits = extract(extractor, images, batch_size)
    metrics = compute_metrics(stats, feats, logits, labels, ref, has_class_logits(extractor, index.num_classes))
    return {"metrics": metrics, "extractor": extractor_description(extractor),
            "reference": reference_description(ref, index)}  # fmt: skip


def evaluate(
    samples: str | None = None,
    data: str = "data/digits",
    extractor: str = "digits-classifier",
    classifier: str | None = None,
    inception_weights: str | None = None,
    num_real: int | None = None,
    out: str | None = None,
    cache_dir: str = DEFAULT_CACHE_DIR,
    batch_size: int = 256,
    device: str = "auto",
) -> dict[str, Any]:
    """Score generated samples: FID (float64), IS, precision/recall and class-consistency accuracy.

    Args:
        samples: A folder of images (``{index:06d}_c{class}.png``) or an ``.npz`` with ``arr_0`` (uint8 NHWC)
            and optionally ``labels``; ``sampling.json`` beside them is recorded with the result.
        data: Packed dataset (``srdd data ...``) whose train split is the reference.
        extractor: Feature extractor: ``digits-classifier`` (built-in data) or ``inception-v3-compat``.
        classifier: Digits classifier checkpoint (``srdd classifier``), for ``--extractor digits-classifier``.
        inception_weights: torch-fidelity's Inception weights file, for ``--extractor inception-v3-compat``
            (default: the env var SRDD_INCEPTION_WEIGHTS).
        num_real: Use only the first N train images as the reference (default: the whole train split).
        out: Write the result as JSON here.
        cache_dir: Folder of cached reference statistics.
        batch_size: Images per feature-extractor batch.
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available).
    """
    if samples is None:
        raise EvaluationError("--samples DIR_or_NPZ is required: a folder of sample PNGs or an .npz (srdd sample writes both)")
    t0 = time.time()
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    images, labels, settings = load_samples(samples)
    index = ShardIndex.load(data)
    ext = extractor_from_options(extractor, classifier, inception_weights, dev)
    result = evaluate_arrays(images, labels, index, ext, cache_dir, num_real, batch_size)
    result = {"format": RESULT_FORMAT, "samples": str(samples), **result, "sampling": settings,
              "seconds": round(time.time() - t0, 3)}  # fmt: skip
    print(format_result(result))
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")
    return result


def format_result(result: dict[str, Any]) -> str:
    m, ext, ref = result["metrics"], result["extractor"], result["reference"]
    lines = [f"{m['num_samples']} samples vs {ref['count']} real ({ref['dataset']}, train split, {ref['resolution']} px), "
             f"extractor {ext['cache_key']}:"]  # fmt: skip
    names = {"fid": "FID", "inception_score": "IS", "precision": "precision", "recall": "recall",
             "class_accuracy": "class accuracy"}  # fmt: skip
    for key, name in names.items():
        if key in m:
            extra = f" ± {m['inception_score_std']:.4f} ({m['inception_score_splits']} splits)" if key == "inception_score" else ""
            lines.append(f"  {name:<15} {m[key]:.4f}{extra}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# The digits classifier
# ---------------------------------------------------------------------------------------------


def train_classifier(
    data: str = "data/digits",
    out: str = DEFAULT_CLASSIFIER,
    epochs: int = 20,
    seed: int = 0,
    width: int = 32,
    min_accuracy: float = 0.95,
) -> dict[str, Any]:
    """Train the digits classifier (the "digits FID" feature extractor) on a packed dataset's train split.

    Args:
        data: Packed dataset (``srdd data digits --out data/digits``).
        out: Checkpoint to write; its meta records the validation accuracy.
        epochs: Training epochs (AdamW, one-cycle LR, light shift/rotation augmentation).
        seed: Seeds initialisation, order and augmentation.
        width: Channels of the first conv stage.
        min_accuracy: Fail (after writing the checkpoint) when the validation accuracy is lower.
    """
    from srdd_lightning.metrics import DigitsClassifierConfig, save_classifier, train_digits_classifier

    index = ShardIndex.load(data)
    if not index.conditional:
        raise EvaluationError(f"{data} has a single class: a class-consistency classifier needs labelled classes")
    t0 = time.time()
    xt, yt = load_split(index, "train")
    xv, yv = load_split(index, "val")
    print(f"training the digits classifier on {len(yt)} train images of {data} ({index.resolution} px), "
          f"validating on {len(yv)}; writing {out}")  # fmt: skip
    config = DigitsClassifierConfig(num_classes=index.num_classes, resolution=index.resolution, width=width)
    model, acc = train_digits_classifier(xt, yt, xv, yv, epochs=epochs, seed=seed, config=config, log_every=5)
    meta = {"val_accuracy": acc, "epochs": epochs, "seed": seed, "data": str(data), "dataset": dataset_key(index, "train"),
            "num_train": len(yt), "num_val": len(yv), "seconds": round(time.time() - t0, 1)}  # fmt: skip
    save_classifier(out, model, meta)
    print(f"digits classifier: val accuracy {acc:.4f} ({len(yv)} images) after {meta['seconds']} s -> {out}")
    if acc < min_accuracy:
        raise EvaluationError(f"the digits classifier reached only {acc:.4f} val accuracy (< --min_accuracy {min_accuracy}); "
                              f"train longer (--epochs) before trusting digits-FID numbers")  # fmt: skip
    return meta


# ---------------------------------------------------------------------------------------------
# srdd evaluate / srdd classifier
# ---------------------------------------------------------------------------------------------


def _run_tool(fn: Callable, argv: Sequence[str], prog: str, description: str) -> None:
    from jsonargparse import CLI

    try:
        CLI(fn, args=list(argv), prog=prog, description=description)
    except (EvaluationError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def evaluate_tool(argv: Sequence[str]) -> None:
    _run_tool(evaluate, argv, "srdd evaluate", "FID / IS / precision-recall / class accuracy of generated samples.")


def classifier_tool(argv: Sequence[str]) -> None:
    _run_tool(train_classifier, argv, "srdd classifier", "Train the digits classifier used for the digits FID.")


__all__ = [
    "DEFAULT_CACHE_DIR",
    "EvaluationError",
    "compute_metrics",
    "dataset_key",
    "dataset_reference",
    "evaluate",
    "evaluate_arrays",
    "extract",
    "extractor_from_options",
    "has_class_logits",
    "load_samples",
    "train_classifier",
]
