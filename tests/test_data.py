"""Shards, the stream and the datamodule: round trips, splitting, determinism, resume, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from srdd_lightning.data import (
    CorruptSampleWarning,
    ShardDataModule,
    ShardIndex,
    ShardReadError,
    TrainLoader,
    TrainStream,
    ValShards,
    digits_images,
    pack_digits,
    pack_image_folder,
)
from srdd_lightning.data.pack import PackError
from srdd_lightning.data.stream import decode_image, read_shard


def _digest(img: torch.Tensor) -> str:
    return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest()


def _all_samples(index: ShardIndex, split: str) -> dict[str, tuple[bytes, int]]:
    out = {}
    for p in index.shard_paths(split):
        for key, png, label in read_shard(p):
            assert key not in out
            out[key] = (png, label)
    return out


# ----------------------------------------------------------------------------- packing


def test_digits_round_trip_pixels_and_labels(digits_root):
    index = ShardIndex.load(digits_root)
    img, labels = digits_images(16)
    assert index.num_classes == 10 and index.resolution == 16
    seen = {}
    for split in ("train", "val"):
        samples = _all_samples(index, split)
        assert len(samples) == index.split(split).total
        seen.update(samples)
    assert len(seen) == len(img) == 1797  # every digit exactly once across the two splits
    for key, (png, label) in seen.items():
        i = int(key)
        stored = np.asarray(Image.open(io.BytesIO(png)))
        assert np.array_equal(stored, img[i].permute(1, 2, 0).numpy())
        assert label == int(labels[i])
    # decode: [-1, 1] and exactly the stored pixels
    key, (png, _) = next(iter(seen.items()))
    x = decode_image(png, 16, flip=False)
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8), img[int(key)])


def test_val_shards_have_equal_counts(digits_root):
    index = ShardIndex.load(digits_root)
    counts = {s.count for s in index.split("val").shards}
    assert len(counts) == 1 and len(index.split("val").shards) == 8


def _write_image(path: Path, mode: str, size=(20, 12), color=(200, 30, 60)) -> None:
    img = Image.new("RGB", size, color)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putpixel((0, 0), (10, 20, 30, 0))
    elif mode == "L":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("P")
    img.save(path)


def test_folder_with_classes_formats_and_non_images(tmp_path):
    src = tmp_path / "imgs"
    for c, cls in enumerate(["cat", "dog"]):
        (src / cls).mkdir(parents=True)
        for i in range(10):
            mode, ext = [("RGB", "png"), ("RGBA", "png"), ("L", "jpg"), ("P", "gif"), ("RGB", "webp")][i % 5]
            _write_image(src / cls / f"{i}.{ext}", mode, color=(50 + 100 * c, 10 * i, 30))
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n garbage")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptSampleWarning)
        index = pack_image_folder(src, out, resolution=8, shard_size=4, val_fraction=0.2, val_shards=2)
    assert index.classes == ["cat", "dog"] and index.num_classes == 2
    assert index.extra["skipped_files"] == 2  # the text file and the broken png, counted
    assert index.split("train").total + index.split("val").total == 20
    labels = Counter(lbl for s in ("train", "val") for _, (_, lbl) in _all_samples(index, s).items())
    assert labels == {0: 10, 1: 10}
    png, _ = next(iter(_all_samples(index, "train").values()))
    assert Image.open(io.BytesIO(png)).mode == "RGB" and Image.open(io.BytesIO(png)).size == (8, 8)


def test_rgba_transparency_goes_to_white(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(6):
        Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(src / f"{i}.png")  # fully transparent
    index = pack_image_folder(src, tmp_path / "o", resolution=8, shard_size=10, val_fraction=0.34, val_shards=2)
    assert index.classes == ["all"] and not index.conditional
    png, label = next(iter(_all_samples(index, "train").values()))
    assert label == 0
    assert np.asarray(Image.open(io.BytesIO(png))).min() == 255


@pytest.mark.parametrize("make", ["missing", "empty", "only_non_images", "mixed"])
def test_bad_folders_raise_clear_errors(tmp_path, make):
    src = tmp_path / "src"
    if make != "missing":
        src.mkdir()
    if make == "only_non_images":
        (src / "a.txt").write_text("x")
        (src / "b.jpg").write_bytes(b"nope")
    if make == "mixed":
        (src / "sub").mkdir()
        _write_image(src / "sub" / "x.png", "RGB")
        _write_image(src / "y.png", "RGB")
    expected = {
        "missing": "does not exist",
        "empty": "is empty",
        "only_non_images": "no readable images",
        "mixed": "mixes images",
    }[make]
    with pytest.raises(PackError, match=expected) as e:
        pack_image_folder(src, tmp_path / "out", resolution=8)
    assert f"--src {src}" in str(e.value)
    assert not (tmp_path / "out").exists(), "a failed pack into a new folder leaves no folder behind"


def test_repack_needs_overwrite(tmp_path):
    pack_digits(tmp_path, resolution=8, shard_size=512, val_shards=2)
    with pytest.raises(PackError, match="--overwrite true"):
        pack_digits(tmp_path, resolution=8, shard_size=512, val_shards=2)
    pack_digits(tmp_path, resolution=8, shard_size=512, val_shards=2, overwrite=True)


def test_missing_index_and_shard_errors(tmp_path, digits_root):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardIndex.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="index.json"):
        ShardIndex.load(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "index.json").write_text((digits_root / "index.json").read_text())
    with pytest.raises(FileNotFoundError, match="train-000000.tar"):
        ShardIndex.load(copy)


# ----------------------------------------------------------------------------- corrupt shards


def _copy_index_with(tmp_path: Path, digits_root: Path, mangle) -> Path:
    """A copy of the digits pack whose first train shard is replaced by ``mangle(bytes)``."""
    root = tmp_path / "mangled"
    root.mkdir()
    raw = json.loads((digits_root / "index.json").read_text())
    for split in raw["splits"].values():
        for s in split["shards"]:
            (root / s["file"]).write_bytes((digits_root / s["file"]).read_bytes())
    first = root / raw["splits"]["train"]["shards"][0]["file"]
    first.write_bytes(mangle(first.read_bytes()))
    (root / "index.json").write_text(json.dumps(raw))
    return root


def test_truncated_shard_skips_and_counts(tmp_path, digits_root):
    root = _copy_index_with(tmp_path, digits_root, lambda b: b[: len(b) // 2])
    index = ShardIndex.load(root)
    counter: dict = {}
    with pytest.warns(CorruptSampleWarning, match="train-000000.tar"):
        got = list(read_shard(index.shard_paths("train")[0], counter))
    assert 0 < len(got) < 128 and counter["skipped"] >= 1
    # training keeps going: a stream over the mangled pack still yields full batches
    stream = TrainStream(index.shard_paths("train")[:2], 16, seed=0, shuffle_buffer=8)
    loader = TrainLoader(stream, batch_size=32, batches_per_epoch=10)
    with pytest.warns(CorruptSampleWarning):
        batches = list(loader)
    assert len(batches) == 10 and all(b[0].shape == (32, 3, 16, 16) for b in batches)


def test_corrupt_png_inside_intact_tar_is_skipped(tmp_path, digits_root):
    def corrupt_first_png(b: bytes) -> bytes:
        src = tarfile.open(fileobj=io.BytesIO(b))
        out = io.BytesIO()
        done = False
        with tarfile.open(fileobj=out, mode="w") as dst:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if not done and m.name.endswith(".png"):
                    done = True
                    data = b"\x89PNG broken"
                    m.size = len(data)
                dst.addfile(m, io.BytesIO(data))
        return out.getvalue()

    root = _copy_index_with(tmp_path, digits_root, corrupt_first_png)
    index = ShardIndex.load(root)
    stream = TrainStream(index.shard_paths("train")[:1], 16, seed=0, shuffle_buffer=1)
    with pytest.warns(CorruptSampleWarning, match="undecodable"):
        it = stream.iterate()
        items = [next(it) for _ in range(130)]  # more than one pass over the shard
    assert stream.counter["skipped"] >= 1 and len(items) == 130


def test_unreadable_shard_names_its_path(tmp_path, digits_root):
    root = _copy_index_with(tmp_path, digits_root, lambda b: b"this is not a tar file at all" * 10)
    path = ShardIndex.load(root).shard_paths("train")[0]
    with pytest.raises(ShardReadError, match=str(path)), warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        list(read_shard(path))


# ----------------------------------------------------------------------------- splitting and determinism


def test_val_each_sample_once_over_two_ranks_two_workers(digits_root):
    index = ShardIndex.load(digits_root)
    expected = Counter(_digest(decode_image(png, 16, False)) for png, _ in _all_samples(index, "val").values())
    seen: Counter = Counter()
    per_rank = []
    for rank in range(2):
        ds = ValShards(index.shard_paths("val"), 16, rank=rank, world_size=2)
        n = 0
        for img, _ in DataLoader(ds, batch_size=16, num_workers=2):
            for x in img:
                seen[_digest(x)] += 1
                n += 1
        per_rank.append(n)
    assert seen == expected
    assert per_rank[0] == per_rank[1] == index.split("val").total // 2  # equal work on every rank


def _first_batches(root: Path, n: int, *, seed=0, rank=0, epoch=0, num_workers=0) -> list[torch.Tensor]:
    index = ShardIndex.load(root)
    stream = TrainStream(index.shard_paths("train"), 16, seed=seed, rank=rank, flip=True, shuffle_buffer=64)
    loader = TrainLoader(stream, batch_size=16, batches_per_epoch=n, num_workers=num_workers)
    loader.load_state_dict({"epoch": epoch, "batches": 0})
    return [torch.cat([img.flatten(1), label[:, None].float()], 1) for img, label in loader]


def test_train_stream_deterministic_and_different_per_rank_and_epoch(digits_root):
    a = _first_batches(digits_root, 3, num_workers=2)
    b = _first_batches(digits_root, 3, num_workers=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "same seed must give the same batches"
    other_rank = _first_batches(digits_root, 3, rank=1, num_workers=2)
    assert not torch.equal(a[0], other_rank[0]), "ranks must read different streams"
    next_epoch = _first_batches(digits_root, 3, epoch=1, num_workers=2)
    assert not torch.equal(a[0], next_epoch[0]), "a new epoch must reshuffle"
    other_seed = _first_batches(digits_root, 3, seed=1, num_workers=2)
    assert not torch.equal(a[0], other_seed[0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_resumes_mid_epoch_exactly(digits_root, num_workers):
    index = ShardIndex.load(digits_root)

    def loader():
        stream = TrainStream(index.shard_paths("train"), 16, seed=3, flip=True, shuffle_buffer=64)
        return TrainLoader(stream, batch_size=8, batches_per_epoch=5, num_workers=num_workers)

    full = loader()
    reference = [b[0] for b in full] + [b[0] for b in full]  # two whole epochs
    first = loader()
    it = iter(first)
    consumed = [next(it)[0] for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b[0] for b in resumed] + [b[0] for b in resumed]
    assert all(torch.equal(x, y) for x, y in zip(consumed + rest, reference))
    assert len(consumed + rest) == len(reference)


# ----------------------------------------------------------------------------- datamodule


def test_datamodule_global_batch_and_shard_checks(digits_root):
    dm = ShardDataModule(root=str(digits_root), batch_size=30, num_workers=2)
    dm.world_size = 4
    with pytest.raises(ValueError, match="data.batch_size=30.*world_size=4"):
        dm.setup("fit")
    dm = ShardDataModule(root=str(digits_root), batch_size=32, num_workers=4)
    dm.world_size = 4
    with pytest.raises(ValueError, match="8 validation shards, fewer than world_size x num_workers"):
        dm.setup("fit")
    dm = ShardDataModule(root=str(digits_root), batch_size=32, num_workers=1)
    dm.world_size = 3
    dm.batch_size = dm.val_batch_size = 33
    with pytest.raises(ValueError, match="do not divide evenly"):
        dm.setup("fit")


def test_datamodule_batches(digits_root):
    dm = ShardDataModule(root=str(digits_root), batch_size=64, val_batch_size=32)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.image_size == 16
    loader = dm.train_dataloader()
    assert len(loader) == 1533 // 64
    raw, label = next(iter(loader))  # the workers send 8-bit pixels; the device gets float in [-1, 1]
    assert raw.shape == (64, 3, 16, 16) and raw.dtype == torch.uint8 and label.dtype == torch.long
    img, _ = dm.on_after_batch_transfer((raw, label), 0)
    assert img.dtype == torch.float32 and -1.0 <= img.min() and img.max() <= 1.0
    assert torch.equal(img, raw.float() / 127.5 - 1.0)
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 264


def test_uint8_images_are_the_float_decode_bit_for_bit(digits_root):
    """The loader's uint8 images, made float on the device, equal the float decode (a resize rounds to 8 bits)."""
    from srdd_lightning.utils.images import from_uint8

    _, png, _ = next(read_shard(digits_root / "train-000000.tar"))
    for flip in (False, True):
        assert torch.equal(from_uint8(decode_image(png, 16, flip, uint8=True)), decode_image(png, 16, flip))
    resized = decode_image(png, 12, False)
    assert (from_uint8(decode_image(png, 12, False, uint8=True)) - resized).abs().max() <= 0.5 / 127.5 + 1e-6


def test_datamodule_resizes_to_configured_resolution(digits_root):
    dm = ShardDataModule(root=str(digits_root), batch_size=8, resolution=12)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 3, 12, 12)
    assert next(iter(dm.val_dataloader()))[0].dtype == torch.uint8


def test_a_truncated_validation_shard_still_gives_equal_work_per_rank(tmp_path, digits_root):
    """Ranks doing unequal validation work would wait for each other forever: a short shard is padded."""
    import warnings as _warnings

    from srdd_lightning.data import ShardDataModule

    raw = json.loads((digits_root / "index.json").read_text())
    root = tmp_path / "short"
    root.mkdir()
    for split in raw["splits"].values():
        for s in split["shards"]:
            (root / s["file"]).write_bytes((digits_root / s["file"]).read_bytes())
    val0 = root / raw["splits"]["val"]["shards"][0]["file"]
    val0.write_bytes(val0.read_bytes()[: len(val0.read_bytes()) // 2])
    (root / "index.json").write_text(json.dumps(raw))
    per_rank = []
    for rank in (0, 1):
        dm = ShardDataModule(str(root), batch_size=8)
        dm.rank, dm.world_size = rank, 2
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            per_rank.append(sum(1 for _ in dm.val_dataset()))
        if rank == 0:
            assert any("repeating its last one" in str(w.message) for w in caught)
    assert per_rank[0] == per_rank[1] == raw["splits"]["val"]["total"] // 2
