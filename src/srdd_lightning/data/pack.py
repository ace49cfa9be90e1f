"""Write datasets once into train/val webdataset shards plus a JSON index (``srdd data ...``).

Each sample is ``<key>.png`` (RGB, lossless, already at the packed resolution) and ``<key>.cls``
(the class index as ASCII). Validation shards all hold the same number of samples, so every rank
of a distributed run gets the same amount of validation work.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .index import ShardIndex, ShardInfo, SplitInfo

log = logging.getLogger(__name__)


@dataclass
class SplitOptions:
    """How samples are divided into shards."""

    shard_size: int = 1000
    """Samples per training shard."""
    val_fraction: float = 0.05
    """Share of the samples held out for validation (rounded down to fill whole, equal validation shards)."""
    val_shards: int = 8
    """Number of validation shards, all of equal size; needs to be >= world_size x num_workers of any run."""
    seed: int = 0
    """Seed of the random train/val split and of the shard order."""

    def check(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_shards < 1:
            raise ValueError(f"val_shards must be >= 1, got {self.val_shards}")


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited onto white rather than black."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution`` (bicubic, antialiased), then a centered square crop."""
    return ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def _plan_split(n: int, opts: SplitOptions) -> tuple[np.ndarray, np.ndarray]:
    """Seeded permutation -> (train indices, val indices); val fills ``val_shards`` equal shards."""
    opts.check()
    per_shard = int(n * opts.val_fraction) // opts.val_shards
    if per_shard < 1:
        raise ValueError(
            f"{n} samples with val_fraction={opts.val_fraction} cannot fill val_shards={opts.val_shards} "
            f"validation shards with at least one sample each; raise val_fraction or lower val_shards"
        )
    n_val = per_shard * opts.val_shards
    if n_val >= n:
        raise ValueError(f"validation ({n_val}) would take every one of the {n} samples; lower val_fraction")
    perm = np.random.default_rng(opts.seed).permutation(n)
    return perm[n_val:], perm[:n_val]


def _write_split(
    out: Path, split: str, items: Sequence, load, shard_size: int, desc: str
) -> tuple[SplitInfo, int]:
    """Write ``items`` (each turned into ``(PIL image, label)`` by ``load``, or None to skip) into shards."""
    shards: list[ShardInfo] = []
    skipped = 0
    writer, count, shard_id = None, 0, 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            tmp = out / f".{split}-{shard_id:06d}.tar.tmp"
            final = out / f"{split}-{shard_id:06d}.tar"
            os.replace(tmp, final)
            shards.append(ShardInfo(final.name, count))
        writer = None

    for item in tqdm(items, desc=desc, unit="img", dynamic_ncols=True):
        loaded = load(item)
        if loaded is None:
            skipped += 1
            continue
        img, label = loaded
        if writer is None:
            writer = wds.TarWriter(str(out / f".{split}-{shard_id:06d}.tar.tmp"))
            count = 0
        # The key is the sample's position in the source (sorted file list or digits index): traceable.
        writer.write({"__key__": f"{int(item):09d}", "png": encode_png(img), "cls": str(int(label)).encode()})
        count += 1
        if count == shard_size:
            close()
            shard_id += 1
    close()
    return SplitInfo(shards), skipped


def _prepare_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if (out / "index.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a packed dataset; pass --overwrite true to replace it")
    if out.exists() and overwrite:
        for p in list(out.glob("*.tar")) + list(out.glob(".*.tar.tmp")) + [out / "index.json"]:
            if p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- built-in digits


def digits_images(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as ``(N, 3, R, R)`` uint8 RGB and ``(N,)`` labels.

    The 0..16 grey levels are scaled to 0..255 (white digit on black) and upsampled bilinearly to
    ``resolution``; nothing is downloaded (the data ship inside scikit-learn).
    """
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ValueError(f"digits resolution must be >= 8 (the source is 8x8), got {resolution}")
    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    img = x.clamp(0, 1).mul(255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return img, torch.from_numpy(d.target).long()


def pack_digits(
    out: str | Path = "data/digits",
    resolution: int = 16,
    shard_size: int = 128,
    val_fraction: float = 0.15,
    val_shards: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> ShardIndex:
    """Pack the built-in digits (scikit-learn's load_digits: 1,797 real 8x8 digits, 10 classes) into shards.

    Args:
        out: Output folder for the shards and index.json.
        resolution: Side length in pixels the 8x8 digits are upsampled to (bilinear).
        shard_size: Samples per training shard.
        val_fraction: Share of samples held out for validation (rounded down to fill equal shards).
        val_shards: Number of equal-size validation shards (>= world_size x num_workers of any run).
        seed: Seed of the train/val split.
        overwrite: Replace an existing pack in ``out``.
    """
    opts = SplitOptions(shard_size, val_fraction, val_shards, seed)
    img, labels = digits_images(resolution)
    train_idx, val_idx = _plan_split(len(img), opts)
    out = _prepare_out(out, overwrite)

    def load(i: int):
        return Image.fromarray(img[i].permute(1, 2, 0).numpy(), mode="RGB"), int(labels[i])

    splits = {}
    splits["train"], _ = _write_split(out, "train", train_idx.tolist(), load, shard_size, "pack digits/train")
    splits["val"], _ = _write_split(out, "val", val_idx.tolist(), load, len(val_idx) // val_shards, "pack digits/val")
    index = ShardIndex(
        name="digits",
        resolution=resolution,
        classes=[str(c) for c in range(10)],
        splits=splits,
        source="sklearn.datasets.load_digits (UCI ML hand-written digits, CC BY 4.0)",
        extra={"seed": seed},
        root=out,
    )
    index.save(out)
    return index


# ----------------------------------------------------------------------------- image folders


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def scan_image_folder(src: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Find ``(file, label)`` pairs: one subfolder per class, or a flat folder (one class, unconditional)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"image folder {src} does not exist")
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a folder")
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    top_files = [p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")]
    if subdirs and top_files:
        raise ValueError(
            f"{src} mixes files ({top_files[0].name}, ...) and class subfolders ({subdirs[0].name}, ...); "
            f"use either a flat folder (unconditional) or one subfolder per class"
        )
    if subdirs:
        classes = [d.name for d in subdirs]
        files = [(f, c) for c, d in enumerate(subdirs) for f in _list_files(d)]
    else:
        classes = ["all"]
        files = [(f, 0) for f in _list_files(src)]
    if not files:
        raise ValueError(f"image folder {src} is empty: no files found")
    return files, classes


def _open_image(path: Path, resolution: int) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            im.load()
            return resize_center_crop(to_rgb(im), resolution)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("skipping %s: not a readable image (%s)", path, e)
        return None


def pack_image_folder(
    src: str | Path,
    out: str | Path,
    resolution: int = 256,
    name: str | None = None,
    shard_size: int = 1000,
    val_fraction: float = 0.05,
    val_shards: int = 8,
    seed: int = 0,
    overwrite: bool = False,
) -> ShardIndex:
    """Pack a folder of images into shards: flat (unconditional) or one subfolder per class.

    Any PIL-readable format; RGBA, palette and grayscale images become RGB (transparency over
    white); each image is resized (shorter side) and center-cropped to ``resolution``. Files that
    are not images are skipped and counted.

    Args:
        src: Image folder: files directly inside (one class) or one subfolder per class.
        out: Output folder for the shards and index.json.
        resolution: Side length in pixels of the stored images.
        name: Dataset name recorded in the index (default: the folder's name).
        shard_size: Samples per training shard.
        val_fraction: Share of samples held out for validation (rounded down to fill equal shards).
        val_shards: Number of equal-size validation shards (>= world_size x num_workers of any run).
        seed: Seed of the train/val split.
        overwrite: Replace an existing pack in ``out``.
    """
    opts = SplitOptions(shard_size, val_fraction, val_shards, seed)
    opts.check()
    files, classes = scan_image_folder(src)
    # Decode once up front so unreadable files are dropped before the split: the val shards must be full.
    readable: list[tuple[Path, int]] = []
    skipped = 0
    for f, c in tqdm(files, desc="check images", unit="file", dynamic_ncols=True):
        try:
            with Image.open(f) as im:
                im.verify()
            readable.append((f, c))
        except Exception as e:  # PIL raises many types for a non-image; each is a skip, not a crash
            log.warning("skipping %s: not a readable image (%s)", f, e)
            skipped += 1
    if not readable:
        raise ValueError(f"no readable images in {src}: all {len(files)} files were skipped as non-images")
    if skipped:
        log.warning("skipped %d of %d files in %s that are not readable images", skipped, len(files), src)
    train_idx, val_idx = _plan_split(len(readable), opts)
    out = _prepare_out(out, overwrite)

    def load(i: int):
        f, c = readable[i]
        img = _open_image(f, resolution)
        return None if img is None else (img, c)

    splits = {}
    splits["train"], s1 = _write_split(out, "train", train_idx.tolist(), load, shard_size, "pack train")
    splits["val"], s2 = _write_split(out, "val", val_idx.tolist(), load, len(val_idx) // val_shards, "pack val")
    if s2:
        raise RuntimeError(f"{s2} validation images became unreadable while packing {src}; re-run the pack")
    index = ShardIndex(
        name=name or Path(src).resolve().name,
        resolution=resolution,
        classes=classes,
        splits=splits,
        source=str(Path(src).resolve()),
        extra={"seed": seed, "skipped_files": skipped + s1},
        root=out,
    )
    index.save(out)
    return index
