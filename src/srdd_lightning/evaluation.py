"""Offline evaluation of generated samples, and the digits classifier behind the "digits FID".

    srdd classifier --data data/digits --out runs/digits/classifier.pt
    srdd evaluate --samples results/x/samples.npz --data data/digits \\
        --extractor digits-classifier --classifier runs/digits/classifier.pt --out results/x/metrics.json
    srdd evaluate --samples DIR --data data/ffhq --extractor inception-v3-compat --inception_weights PATH

Samples are a folder of PNGs (``{index:06d}_c{class}.png``; other images there, such as ``srdd sample``'s ``grid.png``,
are not samples; a folder without such names counts all its images) or an ``.npz`` holding ``arr_0`` (uint8 NHWC) and
optionally ``labels``; the ``sampling.json`` beside them is copied into the result. Reference statistics are those of
the *train* split, cached per (dataset, extractor, resolution); a digits classifier or cached statistics made for other
data are refused. FID is ours (float64, streamed); IS, KID and precision/recall are torch-fidelity's over the same
features. Every number says which extractor and how many samples produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from srdd_lightning.data.index import ShardIndex
from srdd_lightning.data.stream import ValShards
from srdd_lightning.metrics import (FEATURE_EXTRACTORS, DigitsClassifierConfig, DigitsClassifierExtractor,
                                    FeatureExtractor, FeatureStats, ReferenceStats, build_feature_extractor,
                                    class_consistency_accuracy, frechet_distance, inception_score,
                                    kernel_inception_distance, precision_recall, reference_stats, save_classifier,
                                    train_digits_classifier)
from srdd_lightning.utils.images import load_png, to_uint8
from srdd_lightning.utils.io import write_json

DEFAULT_CACHE_DIR = "runs/reference_stats"
DEFAULT_CLASSIFIER = "runs/digits/classifier.pt"
SAMPLING_JSON = "sampling.json"
RESULT_FORMAT = "srdd-evaluation-v1"
_SAMPLE_NAME = re.compile(r"^(\d+)_c(\d+)$")  # the stem of `srdd sample`'s {index:06d}_c{class}.png
_INDEX_NAME = re.compile(r"^\d+$")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class EvaluationError(ValueError):
    """Bad input to the evaluation (no samples, wrong size, unknown extractor, missing weights): a clear message."""


# --- Feature extractors from command-line options ---


def extractor_from_options(extractor: str, classifier: str | os.PathLike | None = None,
                           inception_weights: str | os.PathLike | None = None,
                           device: str | torch.device = "cpu") -> FeatureExtractor:
    """Build the named extractor; errors name the missing file and the option that sets it."""
    if extractor not in FEATURE_EXTRACTORS:
        raise EvaluationError(f"unknown extractor {extractor!r} (--extractor); available: {sorted(FEATURE_EXTRACTORS)}")
    if extractor == "digits-classifier" and classifier is None:
        raise EvaluationError("--extractor digits-classifier needs --classifier PATH (a checkpoint written by "
                              f"`srdd classifier --data data/digits --out {DEFAULT_CLASSIFIER}`)")
    if extractor == "digits-classifier" and not Path(classifier).is_file():
        raise EvaluationError(f"digits classifier checkpoint {classifier} (--classifier) not found; train it with "
                              f"`srdd classifier --data data/digits --out {classifier}`")
    kwargs = {"digits-classifier": {"checkpoint_path": classifier},
              "inception-v3-compat": {"weights_path": inception_weights}}.get(extractor, {})
    try:
        ext = build_feature_extractor(extractor, **kwargs)
    except (FileNotFoundError, ValueError) as e:  # missing, or not the weights file it claims to be
        option = "--classifier" if extractor == "digits-classifier" else "--inception_weights"
        raise EvaluationError(f"{e} ({option})") from None
    return ext.to(device).eval()


def check_extractor_fits(ext: FeatureExtractor, index: ShardIndex, resolution: int,
                         option: str = "--classifier") -> None:
    """Refuse a digits classifier trained on other data: another dataset, class count or resolution."""
    if not isinstance(ext, DigitsClassifierExtractor):
        return  # Inception is meant for any images
    problems = []
    if ext.num_classes != index.num_classes:
        problems.append(f"{ext.num_classes} classes (the data has {index.num_classes})")
    if ext.input_resolution != resolution:
        problems.append(f"{ext.input_resolution} px images (the data is {resolution} px)")
    trained_on, key = ext.meta.get("dataset"), dataset_key(index)
    if trained_on is not None and trained_on != key:  # checkpoints written by hand may not record it
        problems.append(f"the dataset {trained_on} (the data is {key})")
    if problems:
        raise EvaluationError(f"digits classifier {ext.checkpoint_path or '(given as a model)'} ({option}) was trained "
                              f"for {', '.join(problems)}: its features do not describe {index.root}; train one on it "
                              f"with `srdd classifier --data {index.root} --out PATH`")


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: torch.Tensor | Iterator[torch.Tensor],
            batch_size: int = 256) -> tuple[FeatureStats, torch.Tensor, torch.Tensor | None]:
    """Float64 statistics, float32 CPU features (N, D) and logits (N, K) or None of uint8 images (N, 3, H, W) or
    of an iterator of such batches."""
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    stats = FeatureStats(extractor.feature_dim)
    feats, logits = [], []
    for img_B3HW in batches:
        x_B3HW = img_B3HW.to(extractor.device)
        f_BD, l_BK = extractor.features_and_logits(x_B3HW) if extractor.has_logits else (extractor(x_B3HW), None)
        if l_BK is not None:
            logits.append(l_BK.float().cpu())
        stats.update(f_BD)
        feats.append(f_BD.float().cpu())
    if not feats:
        raise EvaluationError("no images to extract features from")
    return stats, torch.cat(feats), (torch.cat(logits) if logits else None)


# --- Reference statistics of a packed dataset ---


def load_index(data: str | os.PathLike, option: str = "--data") -> ShardIndex:
    """``ShardIndex.load``; a missing folder or damaged index.json is an EvaluationError naming the option."""
    try:
        return ShardIndex.load(data)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(f"{e} ({option})") from None


def dataset_key(index: ShardIndex, split: str = "train") -> str:
    """``<name>-<split>-<hash>``: two packs with different contents never share cached statistics."""
    info = index.to_json()
    content = {"split": info["splits"][split], "extra": info.get("extra"), "source": info.get("source"),
               "resolution": info["resolution"]}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:8]
    return f"{index.name}-{split}-{digest}"


def iter_split_uint8(index: ShardIndex, split: str, resolution: int | None = None,
                     batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All images of one split once, in shard order, as uint8 (B, 3, R, R) batches with their labels."""
    ds = ValShards(index.shard_paths(split), resolution or index.resolution)
    for img_B3HW, label_B in torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0):
        yield to_uint8(img_B3HW), label_B


def load_split(index: ShardIndex, split: str, resolution: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole split in memory: uint8 images (N, 3, R, R) and labels (N,) (for small datasets only)."""
    imgs, labels = zip(*iter_split_uint8(index, split, resolution))
    return torch.cat(imgs), torch.cat(labels)


def dataset_reference(data: str | os.PathLike | ShardIndex, extractor: FeatureExtractor,
                      cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, num_images: int | None = None,
                      resolution: int | None = None, batch_size: int = 256,
                      option: str = "--cache_dir") -> ReferenceStats:
    """Reference statistics of the train split of a packed dataset (computed once, then read from ``cache_dir``);
    a cached file made for another dataset, extractor or resolution, or a too-large ``num_images``, is refused."""
    index = data if isinstance(data, ShardIndex) else load_index(data)
    res = resolution or index.resolution
    try:
        return reference_stats(dataset_key(index), res, extractor,
                               lambda: (img for img, _ in iter_split_uint8(index, "train", res, batch_size)),
                               cache_dir, num_images=num_images)
    except ValueError as e:
        raise EvaluationError(f"{e} (reference statistics in {option} {cache_dir})") from None


# --- Samples ---


def _sample_files(path: Path) -> tuple[list[Path], torch.Tensor | None]:
    """The sample images of a folder, in index order, and their classes (None when the names carry none)."""
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise EvaluationError(f"sample folder {path} is empty: no image files (.png, .jpg, ...) in it")
    named = {p: m for p in images if (m := _SAMPLE_NAME.match(p.stem))}
    if not named:
        return images, None
    # `srdd sample` writes grid.png (and reference.png) beside the samples: only {index}_c{class} files count.
    unlabelled = [p.name for p in images if p not in named and _INDEX_NAME.match(p.stem)]
    if unlabelled:
        raise EvaluationError(f"{path}: {len(named)} samples are named <index>_c<class>, but e.g. {unlabelled[0]} "
                              "has no class; name all numbered samples the same way")
    files = sorted(named, key=lambda p: int(named[p].group(1)))
    indices = [int(named[p].group(1)) for p in files]
    if (dup := next((i for i, j in zip(indices, indices[1:]) if i == j), None)) is not None:
        raise EvaluationError(f"{path}: sample index {dup} appears twice (two _c<k> files); one file per index")
    return files, torch.tensor([int(named[p].group(2)) for p in files])


def load_samples(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
    """uint8 images (N, 3, H, W), requested labels (N,) or None, and ``sampling.json`` beside them (or None), of a
    folder of images (``{index}_c{class}.png`` in index order, else all, by name) or an ``.npz`` (see the top)."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"samples {path} (--samples) do not exist")
    if path.is_dir():
        files, labels = _sample_files(path)
        imgs = []
        for p in files:
            try:
                imgs.append(load_png(p))
            except Exception as e:  # PIL raises several types for a damaged or non-image file
                raise EvaluationError(f"sample {p} (--samples) is not a readable image "
                                      f"({type(e).__name__}: {e})") from None
        shapes = {tuple(i.shape) for i in imgs}
        if len(shapes) > 1:
            raise EvaluationError(f"images in {path} have different sizes: {sorted(shapes)}")
        images = torch.stack(imgs)
        settings_file = path / SAMPLING_JSON
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                files, arr = z.files, z["arr_0"] if "arr_0" in z.files else None
                labels_np = z["labels"] if "labels" in z.files else None
        except Exception as e:  # a text file, a truncated archive, a pickle: numpy's errors vary
            raise EvaluationError(f"{path} (--samples) is not a readable .npz archive ({type(e).__name__}: {e}); "
                                  "srdd sample writes samples.npz with arr_0 (uint8 N, H, W, 3) and labels") from None
        if arr is None:
            raise EvaluationError(f"{path} (--samples) has no 'arr_0' array of images (it holds {files})")
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise EvaluationError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        if arr.shape[0] == 0:
            raise EvaluationError(f"{path} holds no samples (arr_0 is empty)")
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
        if labels_np is not None and (labels_np.shape != (arr.shape[0],) or labels_np.dtype.kind not in "iu"):
            raise EvaluationError(f"{path}: labels must be integers ({arr.shape[0]},), got {labels_np.dtype} "
                                  f"{labels_np.shape}")
        labels = None if labels_np is None else torch.from_numpy(labels_np.astype(np.int64))
        settings_file = path.parent / SAMPLING_JSON
    else:
        raise EvaluationError(f"--samples must be a folder of images or an .npz file, got {path}")
    if images.shape[-1] != images.shape[-2]:
        raise EvaluationError(f"samples must be square, got {tuple(images.shape[-2:])}")
    try:
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{settings_file} (beside --samples) is not valid JSON ({e})") from None
    return images, labels, settings


# --- Metrics ---


def compute_metrics(stats: FeatureStats, features_ND: torch.Tensor | None, logits_NK: torch.Tensor | None,
                    labels_N: torch.Tensor | None, ref: ReferenceStats, class_logits: bool,
                    pr_k: int = 3) -> dict[str, Any]:
    """FID; IS when there are logits; KID and precision/recall against the stored real features; class accuracy
    when the logits are those of a classifier over the dataset's own classes (``class_logits``)."""
    n = stats.n
    # FID is ours (float64, its statistics stream across ranks), against the cached reference statistics.
    out: dict[str, Any] = {"fid": frechet_distance(stats.mean, stats.cov, ref.mu_D, ref.sigma_DD), "num_samples": n}
    if logits_NK is not None:
        # IS splits: the customary 10, fewer for small sample counts (>= 50 per split); torch-fidelity shuffles first.
        score = inception_score(logits_NK, splits=max(1, min(10, n // 50)))
        out.update(inception_score=score.mean, inception_score_std=score.std, inception_score_splits=score.splits)
    real_ND = ref.features_ND
    if features_ND is not None and real_ND is not None:
        out["precision_recall_real"] = int(len(real_ND))  # the real features KID and precision/recall saw
        if min(n, len(real_ND)) > pr_k:
            pr = precision_recall(real_ND, features_ND, k=pr_k)
            out.update(precision=pr.precision, recall=pr.recall, precision_recall_k=pr_k)
        if min(n, len(real_ND)) >= 2:
            kid = kernel_inception_distance(real_ND, features_ND)  # 100 subsets of min(1000, n, n_real)
            out.update(kid_mean=kid.mean, kid_std=kid.std, kid_subset_size=kid.subset_size, kid_subsets=kid.subsets)
    if class_logits and logits_NK is not None and labels_N is not None:
        out["class_accuracy"] = class_consistency_accuracy(logits_NK, labels_N)
    return out


def real_vs_real(index: ShardIndex, extractor: FeatureExtractor, batch_size: int = 256) -> tuple[dict[str, Any], int]:
    """Where zero is: the metrics of one random half of the reference (train) split against the other half
    (seeded), and the half's size: two independent samples of the real distribution at that count."""
    images, labels = load_split(index, "train")
    perm, n = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)), len(images) // 2
    stats, feats, _ = extract(extractor, images[perm[n : 2 * n]], batch_size)
    half = ReferenceStats(stats.mean.numpy(), stats.cov.numpy(), n, f"{dataset_key(index)}-half", extractor.cache_key,
                          index.resolution, feats.numpy())
    stats2, feats2, logits2 = extract(extractor, images[perm[:n]], batch_size)
    return compute_metrics(stats2, feats2, logits2, labels[perm[:n]], half,
                           has_class_logits(extractor, index.num_classes)), n


def has_class_logits(extractor: FeatureExtractor, num_classes: int) -> bool:
    """Logits that classify the dataset's own classes (the digits classifier), not ImageNet's (Inception)."""
    return extractor.has_logits and extractor.name != "inception-v3-compat" and extractor.num_classes == num_classes


def evaluate_arrays(images: torch.Tensor, labels: torch.Tensor | None, index: ShardIndex, extractor: FeatureExtractor,
                    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, num_real: int | None = None,
                    batch_size: int = 256) -> dict[str, Any]:
    """Metrics of uint8 samples (N, 3, H, W) against the train split of ``index`` (checks the resolution), with
    what produced them: the extractor (its cache key names the weights) and the reference statistics."""
    if (res := images.shape[-1]) != index.resolution:
        raise EvaluationError(
            f"samples are {res}x{res} px but the reference dataset {index.root} is packed at {index.resolution} px; "
            f"evaluate against data packed at {res} px (e.g. `srdd data digits --resolution {res}`), or sample at "
            f"{index.resolution} px")
    if images.shape[0] < 2:
        raise EvaluationError(f"FID needs at least 2 samples, got {images.shape[0]}")
    if labels is not None and index.conditional and int(labels.max()) >= index.num_classes:
        raise EvaluationError(f"sample labels go up to {int(labels.max())}, but {index.root} has "
                              f"{index.num_classes} classes")
    check_extractor_fits(extractor, index, res)
    ref = dataset_reference(index, extractor, cache_dir, num_images=num_real, batch_size=batch_size)
    stats, feats, logits = extract(extractor, images, batch_size)
    metrics = compute_metrics(stats, feats, logits, labels, ref, has_class_logits(extractor, index.num_classes))
    ext = extractor
    weights = [str(w) for a in ("checkpoint_path", "weights_path") if (w := getattr(ext, a, None)) is not None]
    return {"metrics": metrics,
            "extractor": {"name": ext.name, "cache_key": ext.cache_key, "feature_dim": ext.feature_dim,
                          "num_classes": ext.num_classes, **({"weights": weights[-1]} if weights else {})},
            "reference": {"dataset": ref.dataset, "split": "train", "count": ref.count, "resolution": ref.resolution,
                          "extractor": ref.extractor, "cache": str(ref.path) if ref.path else None,
                          "root": str(index.root)}}


def evaluate(samples: str | None = None, data: str = "data/digits", extractor: str = "digits-classifier",
             classifier: str | None = DEFAULT_CLASSIFIER, inception_weights: str | None = None,
             num_real: int | None = None, out: str | None = None, cache_dir: str = DEFAULT_CACHE_DIR,
             batch_size: int = 256, device: str = "auto") -> dict[str, Any]:
    """Score generated samples: FID (float64), IS, KID, precision/recall and class-consistency accuracy.

    Args:
        samples: A folder of images (``{index:06d}_c{class}.png``; ``grid.png`` and other images beside them are
            ignored) or an ``.npz`` with ``arr_0`` (uint8 NHWC) and optionally ``labels``; ``sampling.json`` beside
            them is recorded with the result.
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
        raise EvaluationError("--samples DIR_or_NPZ is required: a folder of sample PNGs or an .npz "
                              "(srdd sample writes both)")
    t0 = time.time()
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if str(dev).startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}: CUDA is not available here; use --device cpu")
    if batch_size < 1 or (num_real is not None and num_real < 2):
        raise EvaluationError(f"--batch_size must be >= 1 and --num_real >= 2, got {batch_size} and {num_real}")
    images, labels, settings = load_samples(samples)
    index = load_index(data)
    ext = extractor_from_options(extractor, classifier, inception_weights, dev)
    result = {"format": RESULT_FORMAT, "samples": str(samples),
              **evaluate_arrays(images, labels, index, ext, cache_dir, num_real, batch_size), "sampling": settings,
              "seconds": round(time.time() - t0, 3)}
    print(format_result(result))
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")
    return result


def format_result(result: dict[str, Any]) -> str:
    m, ext, ref = result["metrics"], result["extractor"], result["reference"]
    lines = [f"{m['num_samples']} samples vs {ref['count']} real ({ref['dataset']}, train split, "
             f"{ref['resolution']} px), extractor {ext['cache_key']}:"]
    names = {"fid": "FID", "kid_mean": "KID", "inception_score": "IS", "precision": "precision", "recall": "recall",
             "class_accuracy": "class accuracy"}
    for key, name in ((k, n) for k, n in names.items() if k in m):
        extra = ""
        if key == "inception_score":
            extra = f" ± {m['inception_score_std']:.4f} ({m['inception_score_splits']} splits)"
        elif key == "kid_mean":
            extra = f" ± {m['kid_std']:.5f} ({m['kid_subsets']} subsets of {m['kid_subset_size']})"
        lines.append(f"  {name:<15} {m[key]:.{5 if key == 'kid_mean' else 4}f}{extra}")  # KID is ~1e-3: more digits
    return "\n".join(lines)


# --- The digits classifier ---


def train_classifier(data: str = "data/digits", out: str = DEFAULT_CLASSIFIER,
                     train_split: Literal["val", "train"] = "val", feature_dim: int = 32, epochs: int = 60,
                     seed: int = 0, width: int = 32, min_accuracy: float = 0.95) -> dict[str, Any]:
    """Train the digits classifier (the "digits FID" feature extractor) on one split of a packed dataset.

    By default it learns from the *val* split and is checked on the train split, so the FID reference (the train
    split, what the generators learn from) holds only digits the classifier never saw, and its features are 32-d,
    a dimension a few thousand samples estimate (README, "The digits FID").

    Args:
        data: Packed dataset (``srdd data digits --out data/digits``).
        out: Checkpoint to write; its meta records the accuracy on the other split.
        train_split: The split it learns from (val: the reference stays unseen; train: the former behaviour).
        feature_dim: Size of the penultimate layer used as FID features.
        epochs: Training epochs (AdamW, one-cycle LR, light shift/rotation augmentation).
        seed: Seeds initialisation, order and augmentation.
        width: Channels of the first conv stage.
        min_accuracy: Fail (after writing the checkpoint) when the accuracy on the other split is lower.
    """
    index = load_index(data)
    if epochs < 1:
        raise EvaluationError(f"--epochs must be >= 1, got {epochs}")
    if feature_dim < 1:
        raise EvaluationError(f"--feature_dim must be >= 1, got {feature_dim}")
    if not index.conditional:
        raise EvaluationError(f"{data} has a single class: a class-consistency classifier needs labelled classes")
    if not {"train", "val"} <= set(index.splits):
        raise EvaluationError(f"{data} (--data) needs a train and a val split, it has {sorted(index.splits)}")
    t0 = time.time()
    check_split = "train" if train_split == "val" else "val"
    xt, yt = load_split(index, train_split)
    xv, yv = load_split(index, check_split)
    print(f"training the digits classifier on the {len(yt)} {train_split} images of {data} ({index.resolution} px), "
          f"checking it on the {len(yv)} {check_split} images; writing {out}")
    config = DigitsClassifierConfig(num_classes=index.num_classes, resolution=index.resolution, width=width,
                                    feature_dim=feature_dim)
    model, acc = train_digits_classifier(xt, yt, xv, yv, epochs=epochs, seed=seed, config=config, log_every=10)
    # What it was trained on: evaluation refuses it for other data (check_extractor_fits).
    meta = {"val_accuracy": acc, "accuracy_on": check_split, "trained_on": train_split, "epochs": epochs, "seed": seed,
            "data": str(data), "dataset": dataset_key(index, "train"), "num_classes": index.num_classes,
            "resolution": index.resolution, "feature_dim": feature_dim, "num_train": len(yt), "num_val": len(yv),
            "seconds": round(time.time() - t0, 1)}
    save_classifier(out, model, meta)
    print(f"digits classifier: accuracy {acc:.4f} on the {len(yv)} {check_split} images after {meta['seconds']} s "
          f"-> {out}")
    if acc < min_accuracy:
        raise EvaluationError(f"the digits classifier reached only {acc:.4f} accuracy on the {check_split} split "
                              f"(< --min_accuracy {min_accuracy}); train longer (--epochs) before trusting "
                              "digits-FID numbers")
    return meta


# --- srdd evaluate / srdd classifier ---


def _run_tool(fn: Callable, argv: Sequence[str], prog: str, description: str) -> None:
    """Run ``fn`` as a command; a user's mistake (bad option, path or file) is one line on stderr and exit code 2."""
    from jsonargparse import CLI, ArgumentError

    try:
        CLI(fn, args=list(argv), prog=prog, description=description, exit_on_error=False)
    except (ArgumentError, EvaluationError, FileNotFoundError) as e:
        hint = f" (see {prog} --help)" if isinstance(e, ArgumentError) else ""
        print(f"{prog}: error: {' '.join(str(e).split())}{hint}", file=sys.stderr)
        raise SystemExit(2) from None


def evaluate_tool(argv: Sequence[str]) -> None:
    _run_tool(evaluate, argv, "srdd evaluate",
              "FID / KID / IS / precision-recall / class accuracy of generated samples.")


def classifier_tool(argv: Sequence[str]) -> None:
    _run_tool(train_classifier, argv, "srdd classifier", "Train the digits classifier used for the digits FID.")


__all__ = ["DEFAULT_CACHE_DIR", "EvaluationError", "check_extractor_fits", "compute_metrics", "dataset_key",
           "dataset_reference", "evaluate", "evaluate_arrays", "extract", "extractor_from_options", "has_class_logits",
           "load_index", "load_samples", "train_classifier", "write_json"]
