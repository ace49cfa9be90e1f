"""Write datasets once into train/val webdataset shards plus a JSON index (``srdd data ...``).

Each sample is ``<key>.png`` (RGB, at the packed resolution) and ``<key>.cls`` (the class index as ASCII).
Validation shards all hold the same number of samples, so every rank gets the same validation work.
A pack is staged in a hidden folder inside ``out`` and moved into place complete, ``index.json`` last: a failing
pack leaves the previous one as it was; ``--overwrite`` removes only the files the previous ``index.json`` lists.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ..utils.io import atomic_open, file_mode
from .index import INDEX_NAME, ShardIndex, ShardInfo, SplitInfo, listed_files

log = logging.getLogger(__name__)

STAGE_PREFIX = ".srdd-pack-"
_NAMED_SKIPS = 10  # skipped files named one by one in warnings; the rest are only counted


class PackError(ValueError):
    """Input the packer cannot honour (an option, the source folder, the output folder): one clear sentence."""


# ----------------------------------------------------------------------------- options


def _check_int(option: str, value, minimum: int) -> None:
    # bool is an int to Python, and 256.0 would silently become a float resolution downstream.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PackError(f"--{option} must be an integer >= {minimum}, got {value!r}")


@dataclass
class SplitOptions:
    """How samples are divided into shards (the options of ``pack_digits``); checked on creation."""

    shard_size: int = 1000
    val_fraction: float = 0.05
    val_shards: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("shard_size", self.shard_size, 1)
        f = self.val_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float, np.floating)) or not 0.0 < f < 1.0:
            raise PackError(f"--val_fraction must lie strictly between 0 and 1, got {f!r}")
        _check_int("val_shards", self.val_shards, 1)
        _check_int("seed", self.seed, 0)  # numpy's generators refuse negative seeds


def warn_tokenizer_sizes(resolution: int) -> None:
    """Warn when ``resolution`` is not a multiple of a tokenizer preset's downsampling."""
    from ..models.tokenizer import TOKENIZER_PRESETS, tokenizer_config

    by_factor: dict[int, list[str]] = {}
    for name in TOKENIZER_PRESETS:
        by_factor.setdefault(tokenizer_config(name).downsample, []).append(name)
    bad = [(f, names) for f, names in sorted(by_factor.items(), reverse=True) if resolution % f]
    if not bad:
        return
    f = bad[0][0]
    nearby = " or ".join(str(r) for r in (resolution // f * f, resolution // f * f + f) if r > 0)
    msg = (f"resolution {resolution} is not a multiple of "
           + " / ".join(f"{f} (the downsampling of {', '.join(names)})" for f, names in bad)
           + f": those tokenizer presets cannot encode these images; pack at e.g. {nearby}, "
             f"or set data.resolution when training to resize on the fly")  # fmt: skip
    log.warning(msg)


# ----------------------------------------------------------------------------- images


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled by 1/257, float read as [0, 1], transparency over white; CMYK by
    Pillow's conversion (an embedded ICC profile is not applied)."""
    if img.mode in _INT_MODES or img.mode == "F":
        img = _gray_to_8bit(img, name)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _gray_to_8bit(img: Image.Image, name: str) -> Image.Image:
    """16/32-bit integer or float grayscale -> ``L`` (``LA`` if a value is marked transparent); Pillow's own
    conversion clips these to 0..255, so a 16-bit photo would pack as white."""
    if img.mode == "F":
        arr, lo, hi = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0), 0.0, 1.0
        gray = np.round(np.clip(arr, lo, hi) * 255.0).astype(np.uint8)
    else:  # mode I comes from 16-bit PNG/TIFF files: read it as 16-bit too
        arr, lo, hi = np.asarray(img).astype(np.int64), 0, 65535
        gray = ((np.clip(arr, lo, hi) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        log.warning("%s: pixel values span [%s, %s], outside the %s..%s of its mode %s; clipped",
                    name, arr.min(), arr.max(), lo, hi, img.mode)
    out = Image.fromarray(gray)
    t = img.info.get("transparency")
    if isinstance(t, int) and img.mode != "F":
        out = Image.merge("LA", (out, Image.fromarray(np.where(arr == t, 0, 255).astype(np.uint8))))
    return out


def load_image(path: Path, resolution: int) -> tuple[Image.Image, bool]:
    """``path`` as RGB (EXIF orientation applied), its shorter side resized to ``resolution`` (bicubic,
    antialiased) and center-cropped to a square, and whether it had to be upscaled."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)  # phone photos store "rotate 90°" as a tag, not in the pixels
        img = ImageOps.fit(to_rgb(im, str(path)), (resolution, resolution), method=Image.Resampling.BICUBIC)
        return img, min(im.size) < resolution


def _unreadable(path: Path) -> str | None:
    """Why ``path`` is not an image Pillow can open (None if it is); a cheap check that does not decode."""
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # PIL raises many types for a non-image; each is a skip, not a crash
        return f"not a readable image ({type(e).__name__}: {e})"


@dataclass
class _Skipped:
    """Files left out of a pack: counted, the first few named in warnings and in the index."""

    root: Path
    names: list[str] = field(default_factory=list)

    def add(self, path: Path, why: str) -> None:
        self.names.append(str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path))
        if len(self.names) <= _NAMED_SKIPS:
            log.warning("skipping %s: %s", path, why)
        elif len(self.names) == _NAMED_SKIPS + 1:
            log.warning("skipping more files; they are counted, not named")


# ----------------------------------------------------------------------------- shards and the staging folder


def _shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _write_shards(folder: Path, split: str, samples: Iterator, per_shard: int, max_shards: int | None = None
                  ) -> SplitInfo:  # fmt: skip
    """Consume ``(key, image, label)`` from ``samples`` into shards of ``per_shard`` (the last may be short)."""
    shards: list[ShardInfo] = []
    while max_shards is None or len(shards) < max_shards:
        first = next(samples, None)
        if first is None:
            break
        name, count = _shard_name(split, len(shards)), 0
        with atomic_open(folder / name) as f:  # a temporary name until the shard is complete
            writer = wds.TarWriter(f)
            try:
                for key, img, label in itertools.chain([first], itertools.islice(samples, per_shard - 1)):
                    writer.write({"__key__": key, "png": encode_png(img), "cls": str(int(label)).encode()})
                    count += 1
            finally:  # the tar's end blocks, also on an error (atomic_open then discards the file)
                writer.close()
        shards.append(ShardInfo(name, count))
    return SplitInfo(shards)


def _write_splits(stage: _Stage, n: int, opts: SplitOptions, load: Callable[[int], tuple[Image.Image, int] | None],
                  desc: str) -> dict[str, SplitInfo]:  # fmt: skip
    """Write source items ``0..n-1`` in a seeded order: validation takes the first ``n_val`` loadable ones, training
    the rest. An item whose ``load`` returns None is skipped; the next one takes its place, so validation stays full.
    """
    val_per_shard = int(n * opts.val_fraction) // opts.val_shards
    if val_per_shard < 1:
        raise PackError(f"{n} samples with --val_fraction {opts.val_fraction} cannot fill --val_shards "
                        f"{opts.val_shards} validation shards with at least one sample each; raise --val_fraction "
                        f"or lower --val_shards")  # fmt: skip
    n_val = val_per_shard * opts.val_shards
    if n_val >= n:
        raise PackError(f"validation ({n_val}) would take every one of the {n} samples; lower --val_fraction")
    order = np.random.default_rng(opts.seed).permutation(n)
    # every shard name the pack may write (training may come out shorter): none may be a file no pack wrote
    n_train = math.ceil((n - n_val) / opts.shard_size)
    stage.check_names([_shard_name("val", i) for i in range(opts.val_shards)]
                      + [_shard_name("train", i) for i in range(n_train)])  # fmt: skip

    def samples() -> Iterator[tuple[str, Image.Image, int]]:
        for i in tqdm(order, desc=desc, unit="img", dynamic_ncols=True):
            loaded = load(int(i))
            if loaded is not None:
                # The key is the sample's position in the source (sorted file list or digits index): traceable.
                yield f"{int(i):09d}", loaded[0], loaded[1]

    stream = samples()
    val = _write_shards(stage.dir, "val", stream, val_per_shard, max_shards=opts.val_shards)
    if val.total < n_val:
        raise PackError(f"only {val.total} images could be decoded, fewer than the {n_val} validation samples; "
                        f"see the warnings about skipped files")  # fmt: skip
    train = _write_shards(stage.dir, "train", stream, opts.shard_size)
    if train.total == 0:
        raise PackError("no decodable images are left for training after the validation split; lower --val_fraction")
    return {"train": train, "val": val}


class _Stage:
    """A hidden staging folder inside ``out``: :meth:`commit` swaps a complete pack in; an error discards it."""

    def __init__(self, out: str | Path, overwrite: bool):
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise PackError(f"--out {self.out} is a file, not a folder")
        self.old_files: list[str] = []
        if (self.out / INDEX_NAME).exists():
            if not overwrite:
                raise PackError(f"--out {self.out} already holds a packed dataset; pass --overwrite true to replace "
                                f"it (only the files its index.json lists are removed)")  # fmt: skip
            try:
                self.old_files = listed_files(self.out)
            except ValueError as e:
                raise PackError(f"--out {self.out} holds an index.json that cannot be read ({e}), so which files "
                                f"belong to the old pack is unknown and nothing is replaced; remove the old pack "
                                f"by hand or choose another --out") from None  # fmt: skip
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(f"{STAGE_PREFIX}*"):
                log.warning("removing %s, left behind by an interrupted pack", stale)
                shutil.rmtree(stale, ignore_errors=True)
            self.dir = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=self.out))
        except OSError as e:
            raise PackError(f"cannot write into --out {self.out}: {e.strerror or e}") from None

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # also KeyboardInterrupt: the previous pack stays as it was
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.created and not any(self.out.iterdir()):
                self.out.rmdir()

    def check_names(self, names: Iterable[str]) -> None:
        """Refuse to replace a file that no earlier pack wrote (a user's own ``train-000000.tar``)."""
        for name in names:
            if (self.out / name).exists() and name not in self.old_files:
                raise PackError(f"--out {self.out} already holds {name}, which no index.json there lists; "
                                f"move it away or choose another --out")  # fmt: skip

    def commit(self, index: ShardIndex) -> None:
        """Move the new shards and index into ``out`` and remove the files of the old pack no longer used."""
        names = [s.file for split in index.splits.values() for s in split.shards]
        self.check_names(names)
        index.save(self.dir)
        mode = file_mode()
        for name in names + [INDEX_NAME]:  # temporary files are private (0600); a dataset is shared
            os.chmod(self.dir / name, mode)
        # The old index goes first and the new one comes last: in between, the folder reads as an
        # unfinished pack (a clear error on load) rather than an old index over new shards.
        (self.out / INDEX_NAME).unlink(missing_ok=True)
        for name in names:
            os.replace(self.dir / name, self.out / name)
        for name in sorted(set(self.old_files) - set(names)):
            (self.out / name).unlink(missing_ok=True)
        os.replace(self.dir / INDEX_NAME, self.out / INDEX_NAME)
        shutil.rmtree(self.dir, ignore_errors=True)
        index.root = self.out


# ----------------------------------------------------------------------------- built-in digits


def digits_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as ``(N, 3, R, R)`` uint8 RGB and ``(N,)`` labels: grey
    levels 0..16 scaled to 0..255 (white on black), upsampled bilinearly; nothing is downloaded."""
    from sklearn.datasets import load_digits

    _check_int("resolution", resolution, 8)  # the source is 8x8
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    img = x.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return img, torch.from_numpy(d.target).long()


def pack_digits(out: str | Path = "data/digits", resolution: int = 16, shard_size: int = 128,
                val_fraction: float = 0.15, val_shards: int = 8, seed: int = 0, overwrite: bool = False
                ) -> ShardIndex:  # fmt: skip
    """Pack the built-in digits (scikit-learn's load_digits: 1,797 real 8x8 digits, 10 classes) into shards.

    Args:
        out: Output folder for the shards and index.json.
        resolution: Side length in pixels the 8x8 digits are upsampled to (bilinear; at least 8).
        shard_size: Samples per training shard.
        val_fraction: Share of samples held out for validation (rounded down to fill equal shards).
        val_shards: Number of equal-size validation shards (>= world_size x num_workers of any run).
        seed: Seed of the train/val split.
        overwrite: Replace an existing pack in the output folder (only the files its index.json lists are removed).
    """
    opts = SplitOptions(shard_size, val_fraction, val_shards, seed)
    _check_int("resolution", resolution, 8)
    warn_tokenizer_sizes(resolution)
    with _Stage(out, overwrite) as stage:
        img, labels = digits_images(resolution)

        def load(i: int):
            return Image.fromarray(img[i].permute(1, 2, 0).numpy()), int(labels[i])

        splits = _write_splits(stage, len(img), opts, load, "pack digits")
        index = ShardIndex("digits", resolution, [str(c) for c in range(10)], splits,
                           source="sklearn.datasets.load_digits (UCI ML hand-written digits, CC BY 4.0)",
                           extra={"seed": seed})  # fmt: skip
        stage.commit(index)
    return index


# ----------------------------------------------------------------------------- image folders


def _walk_files(folder: Path, skipped: _Skipped) -> list[Path]:
    """Files below ``folder``, sorted; hidden files and folders (.DS_Store, .git, ...) and broken links are skipped."""
    files: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree would otherwise be walked forever
            dirnames[:] = []
            continue
        seen.add(real)
        for d in sorted(d for d in dirnames if d.startswith(".")):
            skipped.add(Path(dirpath) / d, "hidden folder")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith("."):
                skipped.add(p, "hidden file")
            elif not p.is_file():
                skipped.add(p, "broken link or not a regular file")
            else:
                files.append(p)
    return sorted(files)


def scan_image_folder(src: Path, skipped: _Skipped) -> tuple[list[tuple[Path, int]], list[str]]:
    """Candidate ``(file, class)`` pairs: one subfolder per class, or a flat folder (one class, unconditional)."""
    if not src.exists():
        raise PackError(f"--src {src} does not exist")
    if not src.is_dir():
        raise PackError(f"--src {src} is a file, not a folder of images")
    entries = sorted(src.iterdir())
    subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not subdirs:
        return [(f, 0) for f in _walk_files(src, skipped)], ["all"]
    for p in entries:
        if p in subdirs:
            continue
        if p.name.startswith("."):
            skipped.add(p, "hidden file or folder")
        elif _unreadable(p) is not None:
            skipped.add(p, "not an image, beside the class folders")  # a README.txt next to the classes
        else:
            raise PackError(f"--src {src} mixes images ({p.name}, ...) and class subfolders ({subdirs[0].name}, "
                            f"...); use either a flat folder (unconditional) or one subfolder per class")
    return [(f, c) for c, d in enumerate(subdirs) for f in _walk_files(d, skipped)], [d.name for d in subdirs]


def _readable_images(src: Path, skip_empty_classes: bool, skipped: _Skipped
                     ) -> tuple[list[tuple[Path, int]], list[str], list[str]]:  # fmt: skip
    """The ``(file, class)`` pairs Pillow can open, the classes and the empty class folders left out. An empty class
    is an error unless ``skip_empty_classes``: it would still take a label and a row of the class embedding."""
    candidates, classes = scan_image_folder(src, skipped)
    if not candidates and not skipped.names:
        raise PackError(f"--src {src} is empty: no files found")
    readable: list[tuple[Path, int]] = []
    for f, c in tqdm(candidates, desc="check images", unit="file", dynamic_ncols=True):
        why = _unreadable(f)
        if why is None:
            readable.append((f, c))
        else:
            skipped.add(f, why)
    if not readable:
        raise PackError(f"no readable images in --src {src}: all {len(skipped.names)} files were skipped "
                        f"(e.g. {', '.join(skipped.names[:3])})")  # fmt: skip
    counts = Counter(c for _, c in readable)
    empty = [classes[c] for c in range(len(classes)) if counts[c] == 0]
    if empty:
        if not skip_empty_classes:
            raise PackError(f"class folder(s) {', '.join(empty)} in --src {src} hold no readable images; add "
                            f"images, remove the folder(s), or pass --skip_empty_classes true to pack without them")
        log.warning("skipping empty class folder(s) %s: they hold no readable images", ", ".join(empty))
        renumber = {old: new for new, old in enumerate(c for c in range(len(classes)) if counts[c])}
        readable = [(f, renumber[c]) for f, c in readable]
        classes = [classes[c] for c in renumber]
    return readable, classes, empty


def pack_image_folder(src: str | Path, out: str | Path, resolution: int = 256, name: str | None = None,
                      shard_size: int = 1000, val_fraction: float = 0.05, val_shards: int = 8, seed: int = 0,
                      skip_empty_classes: bool = False, overwrite: bool = False) -> ShardIndex:  # fmt: skip
    """Pack a folder of images into shards: flat (unconditional) or one subfolder per class.

    Any Pillow-readable format becomes 8-bit RGB (see ``to_rgb``), resized (shorter side) and center-cropped to
    ``resolution``. Hidden and non-image files are skipped and counted.

    Args:
        src: Image folder: files directly inside (one class) or one subfolder per class.
        out: Output folder for the shards and index.json.
        resolution: Side length in pixels of the stored images.
        name: Dataset name recorded in the index (default: the folder's name).
        shard_size: Samples per training shard.
        val_fraction: Share of samples held out for validation (rounded down to fill equal shards).
        val_shards: Number of equal-size validation shards (>= world_size x num_workers of any run).
        seed: Seed of the train/val split.
        skip_empty_classes: Leave out class folders without readable images (default: an error naming them).
        overwrite: Replace an existing pack in the output folder (only the files its index.json lists are removed).
    """
    opts = SplitOptions(shard_size, val_fraction, val_shards, seed)
    _check_int("resolution", resolution, 1)
    src, out = Path(src), Path(out)
    if out.resolve().is_relative_to(src.resolve()):
        raise PackError(f"--out {out} lies inside --src {src}; the pack would be read as images next time")
    warn_tokenizer_sizes(resolution)
    with _Stage(out, overwrite) as stage:
        skipped = _Skipped(src)
        readable, classes, empty_classes = _readable_images(src, skip_empty_classes, skipped)
        upscaled = 0

        def load(i: int):
            nonlocal upscaled
            f, c = readable[i]
            try:
                img, small = load_image(f, resolution)
            except Exception as e:  # opened in the check but cannot be decoded (truncated data, odd mode)
                skipped.add(f, f"cannot be decoded ({type(e).__name__}: {e})")
                return None
            upscaled += small
            return img, c

        splits = _write_splits(stage, len(readable), opts, load, "pack")
        if upscaled:
            log.warning("%d images were smaller than %d px on their shorter side and were upscaled", upscaled,
                        resolution)
        extra = {"seed": seed, "skipped_files": len(skipped.names), "skipped_examples": skipped.names[:5]}
        if empty_classes:
            extra["skipped_classes"] = empty_classes
        if upscaled:
            extra["upscaled"] = upscaled
        index = ShardIndex(name or src.resolve().name, resolution, classes, splits, str(src.resolve()), extra)
        stage.commit(index)
    return index
