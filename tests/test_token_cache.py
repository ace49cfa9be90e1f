"""The token cache (``srdd data tokenize``): exact tokens, the same stream as the images, the same training step,
and the refusals (another tokenizer, flips it lacks, another schedule, an existing --out)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from helpers import user_error
from test_generator_stage import SMALL, _ckpt, module, save_tokenizer_module_ckpt, write_config

from srdd_lightning.callbacks.fid import FIDCallback
from srdd_lightning.cli import main
from srdd_lightning.data import ShardDataModule, ShardIndex, TrainLoader, TrainStream
from srdd_lightning.data.index import TOKENS_FORMAT
from srdd_lightning.data.pack import PackError
from srdd_lightning.data.stream import (
    CorruptSampleWarning,
    ShardReadError,
    TokenCodec,
    decode_image,
    decode_tokens,
    read_samples,
    read_shard,
)
from srdd_lightning.data.tokens import tokenize
from srdd_lightning.loading import load_tokenizer
from srdd_lightning.models.scales import flatten_tokens

SEED = 3


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory, digits_root) -> Path:
    """3 of the digits' 12 training shards (384 images) and all 8 validation shards (264): a cheap pack to encode."""
    full = ShardIndex.load(digits_root)
    root = tmp_path_factory.mktemp("mini")
    train = full.split("train").shards[:3]
    for sh in train + full.split("val").shards:
        shutil.copy(digits_root / sh.file, root / sh.file)
    splits = {"train": type(full.split("train"))(train), "val": full.split("val")}
    ShardIndex(name="digits-mini", resolution=16, classes=full.classes, splits=splits, source=str(digits_root)).save(root)
    return root


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "runs" / "tok"
    save_tokenizer_module_ckpt(root / "version_0" / "checkpoints" / "last.ckpt")
    return root


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("other") / "tok.ckpt"
    save_tokenizer_module_ckpt(path, seed=1)
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory, mini_root, tok_run) -> dict[str, Path]:
    """The mini digits tokenized with and without flips (batch 40: batches cross no shard, end mid-shard)."""
    base = tmp_path_factory.mktemp("caches")
    tokenize(mini_root, tok_run, base / "flip", flip=True, batch_size=40)
    tokenize(mini_root, tok_run, base / "plain", flip=False, batch_size=40)
    return {"flip": base / "flip", "plain": base / "plain"}


def _encode(tokenizer, img_B3HW: torch.Tensor, patch_nums=None) -> torch.Tensor:
    return flatten_tokens(tokenizer.img_to_tokens(img_B3HW, patch_nums))


# --------------------------------------------------------------------------------------------
# What the cache holds
# --------------------------------------------------------------------------------------------


def test_cached_tokens_are_the_tokenizers_tokens_of_each_image_and_its_mirror(mini_root, caches, tok_run):
    tokenizer, info = load_tokenizer(tok_run)
    source, cache = ShardIndex.load(mini_root), ShardIndex.load(caches["flip"], tokens=True)
    t = cache.tokens
    assert json.loads((caches["flip"] / "index.json").read_text())["format"] == TOKENS_FORMAT
    assert (t["fingerprint"], t["tokenizer"], t["patch_nums"], t["vocab_size"], t["flip"], t["num_tokens"]) == \
        (info["fingerprint"], info["path"], [1, 2, 3, 4], 512, True, 30)
    assert (cache.classes, cache.resolution, cache.source) == (source.classes, 16, str(mini_root.resolve()))
    for split in ("train", "val"):
        assert [(s.file, s.count) for s in cache.split(split).shards] == \
            [(s.file, s.count) for s in source.split(split).shards]  # same layout, same counts (both flips in a sample)
        fields = ("idx", "idx_flip") if split == "train" else ("idx",)
        for src, dst in zip(source.shard_paths(split), cache.shard_paths(split)):
            images = list(read_shard(src))
            cached = list(read_samples(dst, fields))
            assert [k for k, _, _ in images] == [k for k, _, _ in cached] and \
                [y for *_, y in images] == [y for *_, y in cached]  # same keys, order and labels
            img = torch.stack([decode_image(png, 16, False) for _, png, _ in images])
            idx = torch.stack([decode_tokens(d[0], 30) for _, d, _ in cached])
            assert torch.equal(idx.long(), _encode(tokenizer, img))
            if split == "train":
                mirror = torch.stack([decode_image(png, 16, True) for _, png, _ in images])
                idx_flip = torch.stack([decode_tokens(d[1], 30) for _, d, _ in cached])
                assert torch.equal(idx_flip.long(), _encode(tokenizer, mirror))
                assert not torch.equal(idx_flip, idx)
    with pytest.warns(CorruptSampleWarning, match="lacks idx/idx_flip/cls"), pytest.raises(ShardReadError):
        list(read_samples(cache.shard_paths("val")[0], ("idx", "idx_flip")))  # validation is never flipped


def test_a_subset_schedule_cache_holds_that_schedules_tokens(tmp_path, mini_root, tok_run):
    cache = tokenize(mini_root, tok_run, tmp_path / "c", patch_nums=[1, 2, 4])
    assert cache.tokens["patch_nums"] == [1, 2, 4] and cache.tokens["num_tokens"] == 21
    m = module(tok_run, schedule=[1, 2, 4])
    dm = ShardDataModule(str(tmp_path / "c"), batch_size=8)
    m.check_token_cache(dm)  # accepted: the student schedule's own tokens
    images = ShardDataModule(str(mini_root), batch_size=8)
    dm.setup("fit"), images.setup("fit")
    (idx, _), (img, _) = next(iter(dm.val_dataloader())), _on_device(images, next(iter(images.val_dataloader())))
    assert torch.equal(idx.long(), m.tokens_and_inputs(img)[0])  # re-quantized on [1, 2, 4], not cut from the full


# --------------------------------------------------------------------------------------------
# The datamodule: the same stream as the images, resumable
# --------------------------------------------------------------------------------------------


def _on_device(dm: ShardDataModule, batch):
    """What a step receives: the loader's batch after ``on_after_batch_transfer`` (8-bit images made float)."""
    return dm.on_after_batch_transfer(batch, 0)


def _pair(mini_root: Path, cache: Path, flip: bool, **kw) -> tuple[ShardDataModule, ShardDataModule]:
    dms = (ShardDataModule(str(mini_root), batch_size=16, flip=flip, seed=SEED, shuffle_buffer=64, **kw),
           ShardDataModule(str(cache), batch_size=16, flip=flip, seed=SEED, shuffle_buffer=64, **kw))
    for dm in dms:
        dm.setup("fit")
    return dms


@pytest.mark.parametrize("flip", [True, False])
def test_token_batches_are_the_tokens_of_the_image_batches(mini_root, caches, tok_run, flip):
    tokenizer, _ = load_tokenizer(tok_run)
    images, tokens = _pair(mini_root, caches["flip" if flip else "plain"], flip)
    assert images.token_info is None and tokens.token_info["flip"] is flip
    assert tokens.num_classes == 10 and tokens.image_size == 16 and tokens.image_root == mini_root.resolve()
    for img_batch, (idx, y_tok) in list(zip(images.train_dataloader(), tokens.train_dataloader()))[:4]:
        img, y = _on_device(images, img_batch)
        assert idx.dtype == torch.uint16 and idx.shape == (16, 30)  # workers send 2 bytes per token
        assert torch.equal(y, y_tok) and torch.equal(idx.long(), _encode(tokenizer, img))
    (img, y), (idx, y_tok) = _on_device(images, next(iter(images.val_dataloader()))), next(iter(tokens.val_dataloader()))
    assert torch.equal(y, y_tok) and torch.equal(idx.long(), _encode(tokenizer, img))
    assert tokens.on_after_batch_transfer((idx, y_tok), 0)[0].dtype == torch.int64


@pytest.mark.parametrize("num_workers", [0, 2])
def test_token_loader_resumes_mid_epoch_exactly(caches, num_workers):
    index = ShardIndex.load(caches["flip"], tokens=True)

    def loader():
        stream = TrainStream(index.shard_paths("train"), 16, seed=SEED, flip=True, shuffle_buffer=64,
                             codec=TokenCodec(30, flipped=True))  # fmt: skip
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
    assert len(consumed + rest) == len(reference)
    assert all(torch.equal(x, y) for x, y in zip(consumed + rest, reference))
    assert not torch.equal(reference[0], reference[5])  # a new epoch reshuffles


def test_flip_needs_a_flipped_cache_and_resolution_is_fixed(caches):
    with pytest.raises(ValueError, match=r"data.flip is true.*`srdd data tokenize --flip true`"):
        ShardDataModule(str(caches["plain"]), flip=True)
    with pytest.raises(ValueError, match=r"data.resolution=12.*token cache"):
        ShardDataModule(str(caches["flip"]), resolution=12)
    ShardDataModule(str(caches["flip"]), flip=False)  # a flipped cache also trains without flips
    index = ShardIndex.load(caches["plain"], tokens=True)
    with pytest.raises(ValueError, match="--flip true"):
        TrainStream(index.shard_paths("train"), 16, seed=0, flip=True, codec=TokenCodec(30))


def test_image_readers_refuse_a_token_cache(caches):
    with pytest.raises(ValueError, match="is a token cache .*give the packed image folder"):
        ShardIndex.load(caches["plain"])


def test_fid_reference_of_a_token_cache_is_its_source_images(mini_root, caches):
    dm = ShardDataModule(str(caches["plain"]), batch_size=8)
    assert FIDCallback(classifier="unused.pt")._root(SimpleNamespace(datamodule=dm)) == str(mini_root.resolve())


# --------------------------------------------------------------------------------------------
# The generator: the same step as from images, and the refusals
# --------------------------------------------------------------------------------------------


def test_a_generator_step_from_tokens_equals_one_from_images(mini_root, caches, tok_run):
    m = module(tok_run).train()
    images, tokens = _pair(mini_root, caches["flip"], flip=True)
    img_batch, tok_batch = next(iter(images.train_dataloader())), next(iter(tokens.train_dataloader()))
    img_batch, tok_batch = _on_device(images, img_batch), _on_device(tokens, tok_batch)
    out_img = m._forward_loss(img_batch, torch.Generator().manual_seed(7))
    out_tok = m._forward_loss(tok_batch, torch.Generator().manual_seed(7))
    for a, b in zip(out_img, out_tok):
        assert torch.equal(a, b)  # ce_BL, logits_BLV, gt_BL: bit for bit
    assert torch.equal(m.tokens_and_inputs(img_batch[0])[1], m.inputs_from_tokens(tok_batch[0])[1])


def _fit_config(tmp_path: Path, root: Path, tok: Path, **model) -> Path:
    path = write_config(tmp_path, root, tok, max_steps=3, **model)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(flip=True, shuffle_buffer=64)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_from_tokens_trains_the_same_weights_as_from_images(tmp_path, mini_root, caches, tok_run):
    runs = {}
    for name, root in (("images", mini_root), ("tokens", caches["flip"])):
        main(["fit", "--config", str(_fit_config(tmp_path / name, root, tok_run))])
        runs[name] = _ckpt(tmp_path / name / "runs" / "gen" / "srdd" / "version_0")
    assert runs["tokens"]["global_step"] == 3
    a, b = runs["images"]["state_dict"], runs["tokens"]["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # 3 steps, EMA and validation alike
    assert (tmp_path / "tokens" / "runs" / "gen" / "srdd" / "version_0" / "samples" / "step_3.png").is_file()


def test_generator_refuses_another_tokenizers_cache(tmp_path, caches, other_tok, capsys):
    line = user_error(capsys, ["fit", "--config", str(_fit_config(tmp_path, caches["flip"], other_tok))],
                      r"token cache .* \(data.root\) was written by the tokenizer .*version_0/checkpoints/last.ckpt "
                      r".*model.init_args.tokenizer_ckpt gives .*tok.ckpt")  # fmt: skip
    assert str(caches["flip"]) in line


def test_generator_refuses_a_cache_on_another_schedule(caches, tok_run):
    dm = ShardDataModule(str(caches["plain"]), batch_size=8)
    with pytest.raises(ValueError, match=r"patch_nums \[1, 2, 3, 4\].*\[1, 2, 4\] \(model.init_args.schedule\).*"
                                         r"--patch_nums \[1,2,4\]`"):
        module(tok_run, schedule=[1, 2, 4]).check_token_cache(dm)


def test_stages_that_need_images_refuse_a_token_cache(caches, capsys):
    user_error(capsys, ["fit", "--model", "srdd_lightning.stages.smoke.SmokeTestModule", "--data.root",
                        str(caches["plain"])], r"is a token cache .*SmokeTestModule trains on images")  # fmt: skip


# --------------------------------------------------------------------------------------------
# srdd data tokenize: one-line errors, nothing half-written, nothing overwritten
# --------------------------------------------------------------------------------------------


def _tokenize(*argv: str) -> list[str]:
    return ["data", "tokenize", *argv]


def test_tokenize_refuses_an_existing_out_and_a_missing_tokenizer(tmp_path, mini_root, caches, tok_run, capsys):
    before = sorted(p.name for p in caches["plain"].iterdir())
    user_error(capsys, _tokenize("--data", str(mini_root), "--tokenizer", str(tok_run), "--out", str(caches["plain"])),
               r"--out .* already exists and holds a token cache .*never overwrites")  # fmt: skip
    assert sorted(p.name for p in caches["plain"].iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    user_error(capsys, _tokenize("--data", str(mini_root), "--tokenizer", str(tok_run), "--out", str(mine)),
               r"--out .*mine already exists and holds files")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    user_error(capsys, _tokenize("--data", str(mini_root), "--tokenizer", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "new")), r"tokenizer checkpoint not found: .*nope.*--tokenizer")  # fmt: skip
    user_error(capsys, _tokenize("--data", str(tmp_path / "nodata"), "--tokenizer", str(tok_run), "--out",
                                 str(tmp_path / "new")), r"--data: dataset folder .*nodata does not exist")  # fmt: skip
    user_error(capsys, _tokenize("--data", str(caches["plain"]), "--tokenizer", str(tok_run), "--out",
                                 str(tmp_path / "new")), r"--data: .* is a token cache")  # fmt: skip
    user_error(capsys, _tokenize("--data", str(mini_root), "--tokenizer", str(tok_run), "--out", str(tmp_path / "new"),
                                 "--patch_nums", "[1, 3]"), r"--patch_nums \[1, 3\] does not fit .*must end at")  # fmt: skip
    user_error(capsys, _tokenize("--data", str(mini_root), "--tokenizer", str(tok_run), "--out", str(tmp_path / "new"),
                                 "--batch_size", "0"), r"--batch_size must be an integer >= 1")  # fmt: skip
    assert not (tmp_path / "new").exists()


def test_tokenize_refuses_a_vocabulary_beyond_uint16(tmp_path, mini_root, tok_run, monkeypatch):
    monkeypatch.setattr("srdd_lightning.data.tokens.MAX_VOCAB", 256)
    with pytest.raises(PackError, match=r"vocab_size 512: its indices do not fit the cache's uint16"):
        tokenize(mini_root, tok_run, tmp_path / "c")


def test_a_failing_tokenize_leaves_nothing_named_as_complete(tmp_path, mini_root, tok_run, monkeypatch):
    import srdd_lightning.data.tokens as tokens

    real, calls = tokens._tokenize_shard, []

    def fail_on_the_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(tokens, "_tokenize_shard", fail_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        tokenize(mini_root, tok_run, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # it made the folder, so it removed it
    (tmp_path / "empty").mkdir()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        tokenize(mini_root, tok_run, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []  # the user's empty folder stays, empty


def test_tokenize_cli_prints_the_summary_and_explains_its_options(tmp_path, mini_root, tok_run, capsys):
    main(_tokenize("--data", str(mini_root), "--tokenizer", str(tok_run), "--out", str(tmp_path / "c"),
                   "--batch_size", "128"))  # fmt: skip
    out = capsys.readouterr().out
    assert "token cache of" in out and "30 tokens per image" in out and "train: 384 samples in 3 shard(s)" in out
    with pytest.raises(SystemExit):
        main(_tokenize("--help"))
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--data", "--tokenizer", "--out", "--flip", "--patch_nums", "--batch_size", "--device", "--ema"):
        assert option in text
    assert "horizontally flipped" in text and "never overwritten" in text


@pytest.mark.gpu
def test_cuda_tokenize_pinned_uint16_batches_and_a_fit(tmp_path, mini_root, caches, tok_run):
    """On CUDA: the cache encoded there equals the CPU's, batches arrive pinned as uint16 and widen on the device."""
    import lightning.pytorch as pl

    cache = tokenize(mini_root, tok_run, tmp_path / "c", flip=True, device="cuda", batch_size=128)
    for a, b in zip(cache.shard_paths("train"), ShardIndex.load(caches["flip"], tokens=True).shard_paths("train")):
        assert [d for _, d, _ in read_samples(a, ("idx", "idx_flip"))] == [d for _, d, _ in read_samples(b, ("idx", "idx_flip"))]
    m = module(tok_run, optim={"warmup_steps": 1})
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_steps=3, val_check_interval=2, check_val_every_n_epoch=None,
                         limit_val_batches=2, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)  # fmt: skip
    dm = ShardDataModule(str(tmp_path / "c"), batch_size=16, flip=True)
    trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 3
    loader = dm.train_dataloader()
    assert loader.pin_memory
    idx, _ = next(iter(loader))
    assert idx.dtype == torch.uint16 and idx.is_pinned()
    assert dm.on_after_batch_transfer((idx.cuda(), _), 0)[0].dtype == torch.int64


def test_tokenize_decodes_the_next_batch_on_a_worker_thread(tmp_path, mini_root, tok_run, monkeypatch, caches):
    import threading

    from srdd_lightning.data import tokens as tokens_module

    threads, real = set(), tokens_module.decode_image

    def spy(*a, **kw):
        threads.add(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(tokens_module, "decode_image", spy)
    tokenize(mini_root, tok_run, tmp_path / "c", flip=True, batch_size=40)
    assert threads and all(t.startswith(tokens_module.DECODE_THREAD) for t in threads)  # never the encoding thread
    for split in ("train", "val"):  # the same cache as decoding in line
        for a, b in zip(ShardIndex.load(tmp_path / "c", tokens=True).shard_paths(split),
                        ShardIndex.load(caches["flip"], tokens=True).shard_paths(split)):
            assert list(read_samples(a, ("idx",))) == list(read_samples(b, ("idx",)))
    # an error while decoding reaches the caller (and stops the run) rather than being lost on the thread
    monkeypatch.setattr(tokens_module, "read_shard", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        tokenize(mini_root, tok_run, tmp_path / "d", batch_size=40)
    assert not (tmp_path / "d" / "index.json").exists()
