"""``srdd data tokenize``: encode packed shards once with a frozen tokenizer, so the generator's step skips the encoder.

A sample is ``<key>.idx``, the indices of every scale flattened coarse-to-fine (``models.scales.flatten_tokens``)
as little-endian uint16, and ``<key>.cls``. With ``--flip true`` a *training* sample also holds ``<key>.idx_flip``,
the tokens of the mirrored image: both orientations in one sample keep the source's shard names, keys, order and
counts, so the training stream draws, shuffles and flips exactly as over the images (validation is never flipped).
``index.json`` (``srdd-tokens-v1``) names the tokenizer's weight fingerprint, path, schedule and vocabulary, which
the generator checks against its own. The cache is staged like a pack (``data.pack``), into a new or empty
``--out`` only: nothing the user made is overwritten, and a failed run leaves no folder that reads as complete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from ..models.scales import as_schedule, flatten_tokens, num_tokens, subset_indices
from ..utils.io import atomic_open
from .index import FORMAT, ShardIndex, ShardInfo, SplitInfo
from .pack import PackError, _check_int, _Stage
from .stream import ShardReadError, decode_image, read_shard

log = logging.getLogger(__name__)

MAX_VOCAB = 1 << 16  # indices 0..65535 fit the cache's uint16
TOKEN_DTYPE = "<u2"
DECODE_THREAD = "srdd-tokenize-decode"  # the thread that decodes the next batch


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PackError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PackError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def _check_out(out: Path) -> None:
    """Refuse an existing file or non-empty folder: a cache is only ever written somewhere new."""
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        what = "a token cache or packed dataset" if (out / "index.json").exists() else "files"
        raise PackError(f"--out {out} already exists and holds {what}; srdd data tokenize writes only into a new "
                        f"or empty folder (it never overwrites): choose another --out or remove it yourself")  # fmt: skip


def tokenize(data: str | Path, tokenizer: str | Path, out: str | Path, flip: bool = False,
             patch_nums: list[int] | None = None, batch_size: int = 64, device: str = "cpu", ema: bool = True
             ) -> ShardIndex:  # fmt: skip
    """Encode packed images (both splits) with a frozen tokenizer into token shards that ``data.root`` can read.

    Args:
        data: Packed image folder (index.json and shards from ``srdd data digits|folder``).
        tokenizer: Tokenizer run folder (its newest last.ckpt) or checkpoint file, the generator's
            ``model.init_args.tokenizer_ckpt``; VAR's vae_ch160v4096z32.pth works too.
        out: New (or empty) folder for the token shards and index.json; never overwritten.
        flip: Also store the tokens of every horizontally flipped training image (in the same sample), so that
            ``data.flip: true`` can train on the cache; validation is never flipped. Doubles the encoding time.
        patch_nums: Scales to quantize on (default: the tokenizer's whole schedule). A fewer-scale SRDDModule
            (``model.init_args.schedule``: a subset ending at the last scale) needs a cache written on its schedule.
        batch_size: Images per encoder call.
        device: Where the tokenizer runs: cpu, cuda, cuda:1, ...
        ema: Use the tokenizer's EMA weights, as the generator does (``model.init_args.tokenizer_ema``).
    """
    from ..loading import load_tokenizer

    _check_int("batch_size", batch_size, 1)
    data, out = Path(data), Path(out)
    _check_out(out)
    try:
        index = ShardIndex.load(data)
    except (FileNotFoundError, ValueError) as e:
        raise PackError(f"--data: {e}") from None
    dev = _device(device)
    try:
        tok, info = load_tokenizer(tokenizer, ema=ema, option="--tokenizer")
    except (FileNotFoundError, ValueError) as e:
        raise PackError(" ".join(str(e).split())) from None
    if info["vocab_size"] > MAX_VOCAB:
        raise PackError(f"--tokenizer {info['path']} has vocab_size {info['vocab_size']}: its indices do not fit the "
                        f"cache's uint16 (at most {MAX_VOCAB} codes); train the generator from the images instead")  # fmt: skip
    if tok.image_size != index.resolution:
        raise PackError(f"--tokenizer {info['path']} encodes {tok.image_size} px images, but --data {data} holds "
                        f"{index.resolution} px ones; pack the images at {tok.image_size} px")  # fmt: skip
    try:
        pns = as_schedule(patch_nums) if patch_nums is not None else tuple(info["patch_nums"])
        subset_indices(pns, info["patch_nums"])
    except ValueError as e:
        raise PackError(f"--patch_nums {list(patch_nums or [])} does not fit the tokenizer {info['path']}: {e}") from None
    tok.to(dev)

    @torch.no_grad()
    def encode(img_B3HW: torch.Tensor) -> np.ndarray:
        # fp32 without autocast, as SRDDModule.tokens_and_inputs encodes: the same tokens, bit for bit
        with torch.autocast(device_type=dev.type, enabled=False):
            idx_BL = flatten_tokens(tok.img_to_tokens(img_B3HW.to(dev).float(), pns))
        return idx_BL.cpu().numpy().astype(TOKEN_DTYPE)

    total = sum(s.total for s in index.splits.values())
    with _Stage(out, overwrite=False) as stage, tqdm(total=total, desc="tokenize", unit="img",
                                                     dynamic_ncols=True) as bar:  # fmt: skip
        counter: dict = {}
        splits: dict[str, SplitInfo] = {}
        for split, split_info in index.splits.items():
            shards = []
            for sh, path in zip(split_info.shards, index.shard_paths(split)):
                try:
                    count = _tokenize_shard(path, stage.dir / sh.file, index.resolution, encode, batch_size,
                                            flip and split == "train", bar, counter)  # fmt: skip
                except ShardReadError as e:
                    raise PackError(f"--data: {e}; re-pack the dataset") from None
                if count == 0:
                    raise PackError(f"--data: no image of shard {path} could be decoded; re-pack the dataset")
                shards.append(ShardInfo(sh.file, count))
            splits[split] = SplitInfo(shards)
        tokens = dict(fingerprint=info["fingerprint"], tokenizer=info["path"],
                      tokenizer_abspath=str(Path(info["path"]).resolve()), kind=info["kind"], ema=info["ema"],
                      patch_nums=list(pns), tokenizer_patch_nums=list(info["patch_nums"]),
                      vocab_size=info["vocab_size"], num_tokens=num_tokens(pns), dtype="uint16", flip=bool(flip))
        extra = {"source_format": FORMAT, "source_extra": index.extra, "skipped": counter.get("skipped", 0)}
        cache = ShardIndex(index.name, index.resolution, index.classes, splits, str(data.resolve()), extra,
                           tokens=tokens)
        stage.commit(cache)
    if counter.get("skipped"):
        log.warning("%d sample(s) of %s could not be read and are not in the cache", counter["skipped"], data)
    return cache


def _tokenize_shard(src: Path, dst: Path, resolution: int, encode: Callable[[torch.Tensor], np.ndarray],
                    batch_size: int, flip: bool, bar: tqdm, counter: dict) -> int:  # fmt: skip
    """Write the tokens of every readable sample of ``src`` into ``dst`` (same keys, same order); the count."""
    count = 0
    with atomic_open(dst) as f:  # a temporary name until the shard is complete
        writer = wds.TarWriter(f)
        try:
            for keys, img_B3HW, labels in _prefetched(_batches(src, resolution, batch_size, counter)):
                idx_BL = encode(img_B3HW)
                idx_flip_BL = encode(img_B3HW.flip(-1)) if flip else None  # = decode_image(png, R, flip=True)
                for i, key in enumerate(keys):
                    sample = {"__key__": key, "idx": idx_BL[i].tobytes(), "cls": str(labels[i]).encode()}
                    if idx_flip_BL is not None:
                        sample["idx_flip"] = idx_flip_BL[i].tobytes()
                    writer.write(sample)
                count += len(keys)
                bar.update(len(keys))
        finally:  # the tar's end blocks, also on an error (atomic_open then discards the file)
            writer.close()
    return count


def _batches(src: Path, resolution: int, batch_size: int, counter: dict
             ) -> Iterator[tuple[list[str], torch.Tensor, list[int]]]:  # fmt: skip
    """The decodable images of shard ``src`` in batches of ``batch_size`` (the last may be short)."""
    keys, imgs, labels = [], [], []
    for key, png, label in read_shard(src, counter):
        try:
            img = decode_image(png, resolution, False)
        except Exception as e:  # a corrupt PNG inside an intact tar: the image stream would skip it too
            counter["skipped"] = counter.get("skipped", 0) + 1
            log.warning("skipping sample %s of shard %s: undecodable image (%s)", key, src, e)
            continue
        keys.append(key), imgs.append(img), labels.append(label)
        if len(keys) == batch_size:
            yield keys, torch.stack(imgs), labels
            keys, imgs, labels = [], [], []
    if keys:
        yield keys, torch.stack(imgs), labels


def _prefetched(items: Iterator) -> Iterator:
    """``items`` in order, the next one made on a worker thread while the caller encodes the current one: PNG
    decoding overlaps the encoder (PIL and torch release the GIL). One ``next`` runs at a time, so the generator
    is never entered twice; its error reaches the caller at that item."""
    end = object()
    with ThreadPoolExecutor(1, thread_name_prefix=DECODE_THREAD) as pool:
        ahead = pool.submit(next, items, end)
        while (item := ahead.result()) is not end:
            ahead = pool.submit(next, items, end)
            yield item


__all__ = ["tokenize"]
