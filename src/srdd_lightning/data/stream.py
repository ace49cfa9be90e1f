"""Reading shards: a deterministic, endless, resampled training stream and a finite validation pass.

Training: every (seed, epoch, rank, worker) gets its own random generator, draws shards with replacement and
shuffles samples through a buffer of undecoded bytes. The random choices happen before decoding, so a resumed run
fast-forwards by reading raw bytes only and continues exactly the same stream. Validation: shards are dealt to
ranks, then to workers, in a fixed order; each sample is seen once. How a sample's bytes become a tensor is a codec
(:class:`ImageCodec` or :class:`TokenCodec`); the stream, its randomness and its resume are the same for both.
"""

from __future__ import annotations

import io
import itertools
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..utils.images import from_uint8

log = logging.getLogger(__name__)


class ShardReadError(RuntimeError):
    """A shard from which not a single sample could be read."""


class CorruptSampleWarning(UserWarning):
    """A sample (or the rest of a truncated shard) was skipped; training goes on."""


@dataclass
class RawSample:
    data: tuple[bytes, ...]  # the codec's fields, undecoded
    label: int
    flip: bool
    key: str


def read_shard(path: str | Path, counter: dict | None = None) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(key, png bytes, label)`` from one shard of packed images, skipping broken samples."""
    for key, (png,), label in read_samples(path, ("png",), counter):
        yield key, png, label


def read_samples(path: str | Path, fields: tuple[str, ...], counter: dict | None = None
                 ) -> Iterator[tuple[str, tuple[bytes, ...], int]]:  # fmt: skip
    """Yield ``(key, bytes of each of fields, label)`` from one shard, skipping broken samples.

    A truncated or corrupt tar stops the shard early with a warning; a shard that yields nothing
    at all raises :class:`ShardReadError` naming its path.
    """
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True  # keep going: skip what cannot be read

    n = 0
    with open(path, "rb") as stream:  # our own handle, closed even when the consumer stops early
        files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}], handler=handler)
        for sample in wds.tariterators.group_by_keys(files, handler=handler):
            data, cls = tuple(sample.get(f) for f in fields), sample.get("cls")
            if any(d is None for d in data) or cls is None:
                _skip(counter, path, f"sample {sample.get('__key__')} lacks {'/'.join(fields)}/cls")
                continue
            try:
                label = int(cls.decode() if isinstance(cls, bytes) else cls)
            except ValueError:
                _skip(counter, path, f"sample {sample.get('__key__')} has a bad label {cls!r}")
                continue
            n += 1
            yield sample["__key__"], data, label
    for e in errors:
        _skip(counter, path, f"read error: {e.args[0] if e.args else e}")
    if n == 0:
        detail = f": {errors[0]}" if errors else ""
        raise ShardReadError(f"shard {path} is unreadable: no sample could be read from it{detail}")


def _skip(counter: dict | None, path, why: str) -> None:
    total = "?"
    if counter is not None:
        total = counter["skipped"] = counter.get("skipped", 0) + 1
    warnings.warn(f"skipped corrupt data in shard {path} ({why}); {total} skipped so far", CorruptSampleWarning,
                  stacklevel=2)


def decode_image(png: bytes, resolution: int, flip: bool, uint8: bool = False) -> torch.Tensor:
    """PNG bytes -> ``(3, R, R)`` float in [-1, 1] (or, with ``uint8``, the 8-bit pixels, for a quarter of the copy
    from a loader worker and to the device), resized (shorter side) and center-cropped if needed."""
    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    h, w = img.shape[1:]
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        img = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        img = img[0].clamp(0, 255)
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        img = img[:, top : top + resolution, left : left + resolution]
        img = img.round().to(torch.uint8) if uint8 else img  # resized in the loader: rounded to 8 bits like a pack
    img = img.contiguous() if uint8 else from_uint8(img)
    return img.flip(-1) if flip else img


def decode_tokens(raw: bytes, num_tokens: int) -> torch.Tensor:
    """Little-endian uint16 bytes -> ``(L,)`` uint16 token indices (widened to int64 on the device, not here)."""
    if len(raw) != 2 * num_tokens:
        raise ValueError(f"{len(raw)} bytes, expected {num_tokens} uint16 tokens ({2 * num_tokens} bytes)")
    return torch.from_numpy(np.frombuffer(raw, dtype="<u2").astype(np.uint16))  # a writable native-order copy


@dataclass(frozen=True)
class ImageCodec:
    """Packed images: ``png`` -> ``(3, R, R)`` float in [-1, 1] (``uint8``: the 8-bit pixels, made float on the
    device by ``ShardDataModule.on_after_batch_transfer``), flipped horizontally when asked."""

    resolution: int
    uint8: bool = False
    fields = ("png",)  # a class attribute, not a dataclass field

    def decode(self, data: tuple[bytes, ...], flip: bool) -> torch.Tensor:
        return decode_image(data[0], self.resolution, flip, self.uint8)


@dataclass(frozen=True)
class TokenCodec:
    """A token cache: ``idx`` (or, flipped, ``idx_flip``, the tokens of the mirrored image) -> ``(L,)`` uint16."""

    num_tokens: int
    flipped: bool = False  # read idx_flip too (train shards of a cache written with --flip true)

    @property
    def fields(self) -> tuple[str, ...]:
        return ("idx", "idx_flip") if self.flipped else ("idx",)

    def decode(self, data: tuple[bytes, ...], flip: bool) -> torch.Tensor:
        return decode_tokens(data[1] if flip else data[0], self.num_tokens)


Codec = ImageCodec | TokenCodec


def _decode_or_skip(codec: Codec, data: tuple[bytes, ...], flip: bool, counter: dict, where: str
                    ) -> torch.Tensor | None:  # fmt: skip
    try:
        return codec.decode(data, flip)
    except Exception as e:  # a corrupt PNG (or token record) inside an intact tar: skip the sample, keep training
        _skip(counter, where, f"undecodable {'image' if isinstance(codec, ImageCodec) else 'tokens'}: {e}")
        return None


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """Endless resampled stream of ``(image, label)`` (or ``(idx_L, label)`` with a :class:`TokenCodec`) for one
    rank; batches are formed by the loader."""

    def __init__(self, shards: list[Path], resolution: int, seed: int, rank: int = 0, flip: bool = False,
                 shuffle_buffer: int = 1000, codec: Codec | None = None):
        if not shards:
            raise ValueError("the training split has no shards")
        self.shards = [Path(s) for s in shards]
        self.codec = codec or ImageCodec(resolution)
        if flip and isinstance(self.codec, TokenCodec) and not self.codec.flipped:
            # otherwise every flipped draw would be skipped as undecodable, silently halving the data
            raise ValueError("flip=True needs a token cache written with `srdd data tokenize --flip true`")
        self.seed, self.rank, self.flip, self.shuffle_buffer = seed, rank, flip, max(1, shuffle_buffer)
        self.epoch = 0
        self.counter: dict = {}

    def raw_samples(self, epoch: int, worker: int) -> Iterator[RawSample]:
        """The undecoded stream of one worker; all randomness is drawn here."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        buffer: list[RawSample] = []
        while True:
            shard = self.shards[int(rng.integers(len(self.shards)))]
            for key, data, label in read_samples(shard, self.codec.fields, self.counter):
                buffer.append(RawSample(data, label, bool(self.flip and rng.random() < 0.5), key))
                if len(buffer) >= self.shuffle_buffer:
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()

    def iterate(self, skip_samples: int = 0, worker: int | None = None) -> Iterator[tuple[torch.Tensor, int]]:
        """Decoded samples of one worker's stream (default: this process's), after ``skip_samples`` raw ones."""
        stream = self.raw_samples(self.epoch, _worker()[0] if worker is None else worker)
        for s in itertools.islice(stream, skip_samples, None):
            x = _decode_or_skip(self.codec, s.data, s.flip, self.counter, s.key)
            if x is not None:
                yield x, s.label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        return self.iterate()


class TrainLoader:
    """A fixed number of batches per epoch from :class:`TrainStream`; resumable mid-epoch.

    Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict()`` on resume; the
    epoch then continues after the batches already consumed, whose bytes are read but not decoded.
    """

    def __init__(self, dataset: TrainStream, batch_size: int, batches_per_epoch: int, num_workers: int = 0,
                 pin_memory: bool = False):
        if batches_per_epoch < 1:
            raise ValueError(f"an epoch needs at least one batch, got batches_per_epoch={batches_per_epoch}")
        self.stream, self.batch_size, self.batches_per_epoch = dataset, batch_size, batches_per_epoch
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._epoch = 0  # epoch of the current (or next) iteration
        self._served = 0  # batches of that epoch already consumed

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator:
        epoch, skip = self._epoch, self._served
        self.stream.epoch = epoch
        it = iter(DataLoader(_SkipPerWorker(self.stream, skip, max(1, self.num_workers), self.batch_size),
                             batch_size=self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory))
        for i in range(skip, self.batches_per_epoch):
            batch = next(it)
            # Advance the position before yielding: Lightning stops asking after the last batch.
            self._epoch, self._served = (epoch + 1, 0) if i + 1 == self.batches_per_epoch else (epoch, i + 1)
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._epoch, self._served = int(state["epoch"]), int(state["batches"])


class _SkipPerWorker(IterableDataset):
    """Continue a stream after ``skip_batches`` consumed batches.

    The DataLoader takes batch i from worker i % W. A resumed loader starts again at worker 0, so
    worker w plays the stream of the original worker (w + skip) % W, minus the batches it served.
    """

    def __init__(self, ds: TrainStream, skip_batches: int, workers: int, batch_size: int):
        self.ds, self.skip_batches, self.workers, self.batch_size = ds, skip_batches, workers, batch_size

    def __iter__(self):
        role = (_worker()[0] + self.skip_batches) % self.workers
        served = len(range(role, self.skip_batches, self.workers))
        return self.ds.iterate(skip_samples=served * self.batch_size, worker=role)


class ValShards(IterableDataset):
    """Finite pass over this rank's share of the validation shards; every sample once, no shuffling.

    With ``counts`` (the index's per-shard counts) every shard yields exactly that many samples: unreadable ones
    are replaced by repeating the shard's last readable sample, with a warning, because ranks doing unequal
    validation work would wait for each other forever.
    """

    def __init__(self, shards: list[Path], resolution: int, rank: int = 0, world_size: int = 1,
                 counts: list[int] | None = None, codec: Codec | None = None):
        self.shards = [Path(s) for s in shards]
        self.codec = codec or ImageCodec(resolution)
        self.rank, self.world_size, self.counts = rank, world_size, counts
        self.counter: dict = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        worker, workers = _worker()
        counts = self.counts[self.rank :: self.world_size] if self.counts is not None else None
        for i, shard in list(enumerate(self.shards[self.rank :: self.world_size]))[worker::workers]:
            n, last = 0, None
            for key, data, label in read_samples(shard, self.codec.fields, self.counter):
                img = _decode_or_skip(self.codec, data, False, self.counter, f"{shard}:{key}")
                if img is not None and (counts is None or n < counts[i]):
                    n, last = n + 1, (img, label)
                    yield img, label
            if counts is not None and n < counts[i] and last is not None:
                warnings.warn(f"validation shard {shard} gave {n} of its {counts[i]} samples; repeating its last one "
                              f"{counts[i] - n} times so every rank does the same work (re-pack the dataset)",
                              CorruptSampleWarning, stacklevel=2)  # fmt: skip
                for _ in range(counts[i] - n):
                    yield last
