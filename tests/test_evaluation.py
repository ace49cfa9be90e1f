"""FIDCallback (one process, 2 DDP ranks, never in the sanity check), ``srdd evaluate`` and its errors, and the
classifier tool (the table's tests are in tests/test_table.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from srdd_lightning.callbacks.fid import FIDCallback
from srdd_lightning.cli import main as srdd_main
from srdd_lightning.data import ShardDataModule, ShardIndex, digits_images, pack_digits
from srdd_lightning.evaluation import (
    EvaluationError,
    dataset_key,
    dataset_reference,
    evaluate,
    evaluate_arrays,
    extractor_from_options,
    load_samples,
    load_split,
)
from srdd_lightning.metrics import DigitsClassifier, DigitsClassifierConfig, save_classifier
from srdd_lightning.utils.images import from_uint8, save_png, to_uint8

TESTS_DIR = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------
# stand-ins: a deterministic "generator" drawing real digits plus seeded noise, and a tiny stage
# ---------------------------------------------------------------------------------------------

_IMG, _LAB = digits_images(16)
BANK = {c: _IMG[_LAB == c] for c in range(10)}


def stand_in_image(label: int, seed: int, noise: float = 0.3) -> torch.Tensor:
    """Sample (label, seed): a real digit of that class chosen by the seed, plus seeded noise; (3, 16, 16) in [-1, 1]."""
    pool = BANK[label]
    g = torch.Generator().manual_seed(seed)
    x = from_uint8(pool[seed % len(pool)])
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def stand_in_batch(labels, seeds, noise: float = 0.3) -> torch.Tensor:
    return torch.stack([stand_in_image(int(c), int(s), noise) for c, s in zip(labels, seeds)])


class StandInSampler:
    def __init__(self, stage: StandInStage):
        self.stage = stage

    def sample(self, labels_B, config, seeds=None, edit=None):
        self.stage.sample_calls += 1
        return SimpleNamespace(images=stand_in_batch(list(labels_B), seeds))


class StandInStage(pl.LightningModule):
    """Satisfies FIDCallback's protocol: sampler(), generator.num_classes, reconstruct(), ema_weights()."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.generator = SimpleNamespace(num_classes=10)
        self.sample_calls = 0
        self.ema_entries = 0
        self.sanity_flags: list[bool] = []

    @contextlib.contextmanager
    def ema_weights(self):
        self.ema_entries += 1
        yield

    def sampler(self):
        self.sanity_flags.append(bool(self.trainer.sanity_checking))
        return StandInSampler(self)

    def reconstruct(self, img_B3HW):
        self.sanity_flags.append(bool(self.trainer.sanity_checking))
        return (img_B3HW * 0.8).clamp(-1, 1)

    def training_step(self, batch, batch_idx):
        img, _ = batch
        return (img.mean(dim=(1, 2, 3)) - self.w.sum()).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        img, _ = batch
        self.log("val/loss", (img.mean() - self.w.sum()).pow(2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory) -> Path:
    """A small untrained digits classifier (a stand-in feature extractor, 16-d features)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    save_classifier(path, DigitsClassifier(DigitsClassifierConfig(width=8, feature_dim=16)), {"val_accuracy": 0.99, "num_val": 264})
    return path


def _trainer(tmp_path, callback, *more, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2, check_val_every_n_epoch=None,
                num_sanity_val_steps=2, limit_val_batches=1, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=3)  # fmt: skip
    args.update(kw)
    return pl.Trainer(callbacks=[callback, *more], **args)


def _offline(digits_root, classifier_path, cache, n, seed, batch_size=256):
    labels = [i % 10 for i in range(n)]
    images = to_uint8(stand_in_batch(labels, [seed + i for i in range(n)]))
    ext = extractor_from_options("digits-classifier", classifier_path)
    return evaluate_arrays(images, torch.tensor(labels), ShardIndex.load(digits_root), ext, cache, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------
# FIDCallback
# ---------------------------------------------------------------------------------------------


def test_fid_callback_matches_offline_and_skips_sanity_check(tmp_path, digits_root, classifier_path):
    cache = tmp_path / "cache"
    cb = FIDCallback(every_n_steps=2, num_samples=61, classifier=str(classifier_path), cache_dir=str(cache),
                     batch_size=25, seed=5)  # fmt: skip
    stage = StandInStage()
    best = pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", monitor="val/fid_digits-classifier_61", every_n_train_steps=2)
    trainer = _trainer(tmp_path, cb, best, enable_checkpointing=True)
    trainer.fit(stage, datamodule=ShardDataModule(str(digits_root), batch_size=16))

    assert cb.calls == 2 and stage.ema_entries == 2  # steps 2 and 4, with the EMA weights
    assert stage.sample_calls == 2 * 3  # ceil(61 / 25) batches each time
    assert stage.sanity_flags and not any(stage.sanity_flags)  # the sanity check ran, without sampling

    key = "val/fid_digits-classifier_61"
    assert cb.metric_key() == key
    for k in (key, "val/is_digits-classifier_61", "val/class_acc_digits-classifier_61"):
        assert k in trainer.callback_metrics, sorted(trainer.callback_metrics)
    offline = _offline(digits_root, classifier_path, cache, 61, seed=5)["metrics"]
    assert offline["num_samples"] == cb.last_metrics["num_samples"] == 61
    for m in ("fid", "inception_score", "class_accuracy"):
        assert cb.last_metrics[m] == pytest.approx(offline[m], rel=1e-6, abs=1e-9)
    assert float(trainer.callback_metrics[key]) == pytest.approx(offline["fid"], rel=1e-5)
    assert float(best.best_model_score) == pytest.approx(offline["fid"], rel=1e-5)  # monitorable

    # The logger got it at the evaluation steps, whatever log_every_n_steps says (3 here).
    rows = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index(key)
    steps = {int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:] if r.split(",")[col]}
    assert steps == {2, 4}


def test_fid_callback_never_runs_under_fast_dev_run(tmp_path, digits_root, classifier_path):
    cb = FIDCallback(every_n_steps=1, num_samples=20, classifier=str(classifier_path), cache_dir=str(tmp_path))
    stage = StandInStage()
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=2, callbacks=[cb], enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(stage, datamodule=ShardDataModule(str(digits_root), batch_size=16))
    assert cb.calls == 0 and stage.sample_calls == 0


def test_fid_callback_reconstruct_mode_gives_rfid_of_validation_images(tmp_path, digits_root, classifier_path):
    cache = tmp_path / "cache"
    cb = FIDCallback(every_n_steps=4, num_samples=50, classifier=str(classifier_path), cache_dir=str(cache),
                     batch_size=16, mode="reconstruct")  # fmt: skip
    stage = StandInStage()
    trainer = _trainer(tmp_path, cb)
    trainer.fit(stage, datamodule=ShardDataModule(str(digits_root), batch_size=16))
    assert cb.calls == 1 and "val/rfid_digits-classifier_50" in trainer.callback_metrics
    index = ShardIndex.load(digits_root)
    val, labels = load_split(index, "val")
    recon = to_uint8((from_uint8(val[:50]) * 0.8).clamp(-1, 1))
    offline = evaluate_arrays(recon, labels[:50], index, extractor_from_options("digits-classifier", classifier_path), cache)
    assert cb.last_metrics["fid"] == pytest.approx(offline["metrics"]["fid"], rel=1e-6)
    assert cb.last_metrics["class_accuracy"] == offline["metrics"]["class_accuracy"]


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import lightning.pytorch as pl
from srdd_lightning.callbacks.fid import FIDCallback
from srdd_lightning.data import ShardDataModule
from test_evaluation import StandInStage

cb = FIDCallback(every_n_steps=2, num_samples=61, classifier={classifier!r}, cache_dir={cache!r}, batch_size=10, seed=5)
stage = StandInStage()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, val_check_interval=2,
                     check_val_every_n_epoch=None, num_sanity_val_steps=1, limit_val_batches=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
trainer.fit(stage, datamodule=ShardDataModule({root!r}, batch_size=16))
logged = float(trainer.callback_metrics["val/fid_digits-classifier_61"])
with open({out!r} + f"/rank{{trainer.global_rank}}.json", "w") as f:
    json.dump({{"metrics": cb.last_metrics, "logged": logged, "sample_calls": stage.sample_calls,
               "sanity": stage.sanity_flags}}, f)
"""


def test_fid_callback_identical_on_two_ddp_ranks_and_equal_to_one_process(tmp_path, digits_root, classifier_path):
    cache = tmp_path / "cache"
    script = tmp_path / "ddp_fid.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS_DIR), classifier=str(classifier_path), cache=str(cache),
                                        root=str(digits_root), out=str(tmp_path)))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["metrics"] == r1["metrics"] and r0["logged"] == r1["logged"]  # identical, not merely close
    # 31 + 30 samples in batches of 10: both ranks run 4 sampler calls (rank 1 pads its last one).
    assert r0["sample_calls"] == r1["sample_calls"] == 4 and not any(r0["sanity"] + r1["sanity"])
    single = _offline(digits_root, classifier_path, cache, 61, seed=5)["metrics"]
    for m in ("fid", "inception_score", "class_accuracy"):
        assert r0["metrics"][m] == pytest.approx(single[m], rel=1e-6, abs=1e-9)
    assert r0["metrics"]["num_samples"] == 61


# ---------------------------------------------------------------------------------------------
# srdd evaluate / srdd classifier
# ---------------------------------------------------------------------------------------------


SETTINGS = {"checkpoint": "runs/x/last.ckpt", "sampling": {"cfg": 2.0, "top_k": 900, "top_p": 0.96}, "seed": 3,
            "seconds_per_image": 0.01}  # fmt: skip


def _write_samples(folder: Path, n: int = 40, res: int = 16, npz: bool = False) -> tuple[torch.Tensor, list[int]]:
    folder.mkdir(parents=True, exist_ok=True)
    labels = [i % 10 for i in range(n)]
    imgs = to_uint8(stand_in_batch(labels, list(range(n))))
    if res != 16:
        imgs = to_uint8(torch.nn.functional.interpolate(from_uint8(imgs), size=res, mode="bilinear"))
    if npz:
        np.savez(folder / "samples.npz", arr_0=imgs.permute(0, 2, 3, 1).numpy(), labels=np.array(labels))
    else:
        for i, (img, c) in enumerate(zip(imgs, labels)):
            save_png(img, folder / f"{i:06d}_c{c}.png")
    (folder / "sampling.json").write_text(json.dumps(SETTINGS))
    return imgs, labels


def test_evaluate_folder_and_npz_agree_and_record_settings(tmp_path, digits_root, classifier_path, capsys):
    _write_samples(tmp_path / "pngs")
    _write_samples(tmp_path / "npz", npz=True)
    cache = tmp_path / "cache"
    out = tmp_path / "result.json"
    srdd_main(["evaluate", "--samples", str(tmp_path / "pngs"), "--data", str(digits_root), "--classifier",
               str(classifier_path), "--cache_dir", str(cache), "--out", str(out)])  # fmt: skip
    assert "FID" in capsys.readouterr().out
    from_folder = json.loads(out.read_text())
    from_npz = evaluate(str(tmp_path / "npz" / "samples.npz"), str(digits_root), classifier=str(classifier_path),
                        cache_dir=str(cache))  # fmt: skip
    assert from_folder["metrics"] == from_npz["metrics"]
    m = from_folder["metrics"]
    assert m["num_samples"] == 40 and {"fid", "inception_score", "precision", "recall", "class_accuracy"} <= set(m)
    assert m["kid_subset_size"] == 40 and m["kid_subsets"] == 100 and m["kid_std"] > 0  # min(1000, n) per subset
    assert m["kid_mean"] > 0 and m["precision_recall_real"] == from_folder["reference"]["count"]  # all real features
    assert from_folder["sampling"] == SETTINGS  # copied from sampling.json beside the samples
    assert from_folder["extractor"]["name"] == "digits-classifier"
    assert from_folder["reference"]["count"] == ShardIndex.load(digits_root).split("train").total
    assert len(list(cache.glob("*.npz"))) == 1  # computed once, then reused

    # The cache key follows the extractor (another classifier) and the resolution (another pack).
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    save_classifier(other, DigitsClassifier(DigitsClassifierConfig(width=8, feature_dim=16)))
    evaluate(str(tmp_path / "npz" / "samples.npz"), str(digits_root), classifier=str(other), cache_dir=str(cache))
    root12 = pack_digits(tmp_path / "digits12", resolution=12, val_shards=2).root
    _write_samples(tmp_path / "s12", res=12, npz=True)
    clf12 = _classifier(tmp_path / "clf12.pt", resolution=12)  # a 16 px classifier is refused for 12 px data
    evaluate(str(tmp_path / "s12" / "samples.npz"), str(root12), classifier=str(clf12), cache_dir=str(cache))
    names = sorted(p.name for p in cache.glob("*.npz"))
    assert len(names) == 3 and sum("-12px" in n for n in names) == 1, names


def test_evaluate_errors_are_clear(tmp_path, digits_root, classifier_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    samples = tmp_path / "s"
    _write_samples(samples, npz=True)
    npz = str(samples / "samples.npz")
    with pytest.raises(EvaluationError, match="empty"):
        evaluate(str(tmp_path / "empty"), str(digits_root), classifier=str(classifier_path))
    with pytest.raises(EvaluationError, match="unknown extractor 'nope'"):
        evaluate(npz, str(digits_root), extractor="nope")
    monkeypatch.chdir(tmp_path)  # no runs/digits/classifier.pt here: the default path is named with its option
    with pytest.raises(EvaluationError, match=r"runs/digits/classifier\.pt \(--classifier\) not found"):
        evaluate(npz, str(digits_root))
    with pytest.raises(EvaluationError, match=r"missing\.pt \(--classifier\) not found"):
        evaluate(npz, str(digits_root), classifier=str(tmp_path / "missing.pt"))
    monkeypatch.delenv("SRDD_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(EvaluationError, match="weights-inception-2015-12-05-6726825d.pth.*--inception_weights"):
        evaluate(npz, str(digits_root), extractor="inception-v3-compat")
    s12 = tmp_path / "s12"
    _write_samples(s12, res=12, npz=True)
    with pytest.raises(EvaluationError, match="12x12 px but the reference dataset .* packed at 16 px"):
        evaluate(str(s12 / "samples.npz"), str(digits_root), classifier=str(classifier_path), cache_dir=str(tmp_path))
    with pytest.raises(EvaluationError, match="--samples DIR_or_NPZ is required"):
        evaluate(None, str(digits_root))
    # On the command line: a one-line message and exit code 2, no traceback.
    with pytest.raises(SystemExit) as e:
        srdd_main(["evaluate", "--samples", str(tmp_path / "empty"), "--data", str(digits_root),
                   "--classifier", str(classifier_path)])  # fmt: skip
    assert e.value.code == 2 and "srdd evaluate: error: sample folder" in capsys.readouterr().err


def test_load_samples_rejects_mixed_names_and_bad_npz(tmp_path):
    _write_samples(tmp_path / "mixed", n=3)
    save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), tmp_path / "mixed" / "000003.png")  # a sample without class
    with pytest.raises(EvaluationError, match="000003.png has no class; name all numbered samples the same way"):
        load_samples(tmp_path / "mixed")
    (tmp_path / "mixed" / "000003.png").rename(tmp_path / "mixed" / "000002_c7.png")
    with pytest.raises(EvaluationError, match="index 2 appears twice"):
        load_samples(tmp_path / "mixed")
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(EvaluationError, match="uint8"):
        load_samples(tmp_path / "bad.npz")
    with pytest.raises(EvaluationError, match="folder of images or an .npz"):
        load_samples(tmp_path / "mixed" / "000000_c0.png")


def test_evaluate_a_folder_written_by_srdd_sample(tmp_path, digits_root, classifier_path):
    """``srdd sample`` writes grid.png and reference.png beside the samples: they are not samples."""
    folder = tmp_path / "samples"
    imgs, labels = _write_samples(folder, n=24)
    save_png(torch.zeros(3, 40, 72, dtype=torch.uint8), folder / "grid.png")  # another size: it would break the stack
    save_png(imgs[0], folder / "reference.png")
    np.savez(folder / "samples.npz", arr_0=imgs.permute(0, 2, 3, 1).numpy(), labels=np.array(labels))
    images, got_labels, settings = load_samples(folder)
    assert torch.equal(images, imgs) and got_labels.tolist() == labels and settings == SETTINGS
    cache = str(tmp_path / "cache")
    from_folder = evaluate(str(folder), str(digits_root), classifier=str(classifier_path), cache_dir=cache)
    from_npz = evaluate(str(folder / "samples.npz"), str(digits_root), classifier=str(classifier_path), cache_dir=cache)
    assert from_folder["metrics"] == from_npz["metrics"] and from_folder["metrics"]["num_samples"] == 24

    # Index order, not name order, when the index outgrows its zero padding (10 before 9 by name).
    numbered = tmp_path / "numbered"
    numbered.mkdir()
    for i in (9, 10, 1):
        save_png(imgs[i], numbered / f"{i}_c{labels[i]}.png")
    images, got_labels, _ = load_samples(numbered)
    assert torch.equal(images, imgs[[1, 9, 10]]) and got_labels.tolist() == [labels[1], labels[9], labels[10]]
    # A folder without {index}_c{class} names: every image is a sample, unlabelled.
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(5):
        save_png(imgs[i], plain / f"img{i}.png")
    images, got_labels, _ = load_samples(plain)
    assert torch.equal(images, imgs[:5]) and got_labels is None


def _classifier(path: Path, meta: dict | None = None, **config) -> Path:
    torch.manual_seed(0)
    return save_classifier(path, DigitsClassifier(DigitsClassifierConfig(width=8, feature_dim=16, **config)), meta)


@pytest.fixture(scope="module")
def other_digits_root(tmp_path_factory) -> Path:
    """The same digits split differently: another dataset key (another train split)."""
    return pack_digits(tmp_path_factory.mktemp("other_digits"), resolution=16, val_fraction=0.3, val_shards=2).root


def test_evaluate_refuses_a_classifier_or_reference_of_other_data(tmp_path, digits_root, other_digits_root):
    samples = tmp_path / "s"
    _write_samples(samples, npz=True)
    npz, cache = str(samples / "samples.npz"), tmp_path / "cache"
    index = ShardIndex.load(digits_root)
    key = dataset_key(index)
    refused = {
        "five.pt": ({"num_classes": 5}, None, r"5 classes \(the data has 10\)"),
        "px12.pt": ({"resolution": 12}, None, r"12 px images \(the data is 16 px\)"),
        "other.pt": ({}, {"dataset": "digits-train-0"}, rf"the dataset digits-train-0 \(the data is {key}\)"),
    }
    for name, (config, meta, message) in refused.items():
        path = _classifier(tmp_path / name, meta, **config)
        with pytest.raises(EvaluationError, match=rf"{name} \(--classifier\) was trained for {message}.*srdd classifier"):
            evaluate(npz, str(digits_root), classifier=str(path), cache_dir=str(cache))
    assert not cache.exists()  # refused before any work
    mine = _classifier(tmp_path / "mine.pt", {"dataset": key, "val_accuracy": 0.99})  # what srdd classifier records
    assert evaluate(npz, str(digits_root), classifier=str(mine), cache_dir=str(cache))["metrics"]["num_samples"] == 40

    # Statistics cached for one dataset, under the name of another, are refused with the file and the option.
    ext = extractor_from_options("digits-classifier", mine)
    ref = dataset_reference(index, ext, cache)
    other_key = dataset_key(ShardIndex.load(other_digits_root))
    assert other_key != key
    fake = ref.path.with_name(ref.path.name.replace(key, other_key))
    shutil.copy(ref.path, fake)
    unchecked = _classifier(tmp_path / "unchecked.pt")  # mine's weights without the dataset: only the statistics tell
    assert extractor_from_options("digits-classifier", unchecked).cache_key == ext.cache_key
    with pytest.raises(EvaluationError, match=rf"{re.escape(other_key)}.*do not match the request: dataset='{key}'"
                                              r".*--cache_dir"):  # fmt: skip
        evaluate(npz, str(other_digits_root), classifier=str(unchecked), cache_dir=str(cache))


def test_fid_callback_refuses_a_classifier_or_reference_of_other_data(tmp_path, digits_root, other_digits_root,
                                                                      classifier_path):  # fmt: skip
    def fit(classifier, root, cache):
        cb = FIDCallback(every_n_steps=2, num_samples=20, classifier=str(classifier), cache_dir=str(cache))
        stage = StandInStage()
        trainer = _trainer(tmp_path, cb, max_steps=2, num_sanity_val_steps=0, logger=False)
        with pytest.raises(EvaluationError) as e:
            trainer.fit(stage, datamodule=ShardDataModule(str(root), batch_size=16))
        assert stage.sample_calls == 0
        return str(e.value)

    five = _classifier(tmp_path / "five.pt", num_classes=5)
    assert "five.pt (FIDCallback classifier) was trained for 5 classes" in fit(five, digits_root, tmp_path / "c1")
    # Reference statistics of digits_root copied under other_digits_root's name.
    index, other = ShardIndex.load(digits_root), ShardIndex.load(other_digits_root)
    ref = dataset_reference(index, extractor_from_options("digits-classifier", classifier_path), tmp_path / "c2")
    shutil.copy(ref.path, ref.path.with_name(ref.path.name.replace(dataset_key(index), dataset_key(other))))
    msg = fit(classifier_path, other_digits_root, tmp_path / "c2")
    assert f"dataset='{dataset_key(index)}' (expected '{dataset_key(other)}')" in msg and "FIDCallback cache_dir" in msg


def test_cli_mistakes_are_one_line_and_exit_code_2(tmp_path, digits_root, classifier_path, capsys):
    samples = tmp_path / "s"
    _write_samples(samples, npz=True)
    npz = samples / "samples.npz"
    (tmp_path / "text.npz").write_text("not an archive\n")
    (tmp_path / "truncated.npz").write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    data = ["--data", str(digits_root), "--cache_dir", str(tmp_path / "cache")]
    base = [*data, "--classifier", str(classifier_path)]
    cases = [
        (["--samples", str(tmp_path / "text.npz"), *base], "text.npz (--samples) is not a readable .npz archive"),
        (["--samples", str(tmp_path / "truncated.npz"), *base], "truncated.npz (--samples) is not a readable .npz"),
        (["--samples", str(tmp_path / "missing"), *base], "missing (--samples) do not exist"),
        (["--samples", str(npz), "--data", str(tmp_path / "no_data"), "--classifier", str(classifier_path)],
         "no_data does not exist; pack one first"),
        (["--samples", str(npz), *base, "--extractor", "clip"], "unknown extractor 'clip' (--extractor)"),
        (["--samples", str(npz), *data, "--classifier", str(tmp_path / "garbage.pt")],
         "garbage.pt is not a readable digits classifier checkpoint"),
        (["--samples", str(npz), *base, "--batch_size", "many"], 'Parser key "batch_size": Expected a'),
        (["--samples", str(npz), *base, "--num_real", "99999"], "but the data holds only 1533"),
        (["--samples", str(npz), *base, "--nope", "1"], "unrecognized arguments: --nope 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            srdd_main(["evaluate", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("srdd evaluate: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
    for argv, message in [(["--data", str(tmp_path / "no_data")], "no_data does not exist"),
                          (["--data", str(digits_root), "--epochs", "0"], "--epochs must be >= 1")]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            srdd_main(["classifier", *argv, "--out", str(tmp_path / "c.pt")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("srdd classifier: error: ") and err.count("\n") == 1
        assert message in err, (argv, err)


@pytest.mark.slow
def test_classifier_tool_trains_to_95_percent(tmp_path, digits_root, capsys):
    out = tmp_path / "classifier.pt"
    srdd_main(["classifier", "--data", str(digits_root), "--out", str(out)])
    assert "accuracy" in capsys.readouterr().out
    from srdd_lightning.metrics import load_classifier

    model, meta = load_classifier(out)
    # it learns from the val split only, so the FID reference (the train split) holds digits it never saw
    assert meta["trained_on"] == "val" and meta["num_train"] == 264 and meta["accuracy_on"] == "train"
    assert meta["val_accuracy"] >= 0.95 and meta["num_val"] == 1533 and model.config.feature_dim == 32


def test_real_vs_real_compares_two_disjoint_halves_of_the_reference(digits_root, classifier_path):
    from srdd_lightning.evaluation import load_split, real_vs_real

    index = ShardIndex.load(digits_root)
    ext = extractor_from_options("digits-classifier", classifier_path)
    a, n = real_vs_real(index, ext)
    b, _ = real_vs_real(index, ext)
    assert n == 1533 // 2 and a["num_samples"] == n and a == b  # seeded: the same halves every time
    images, _ = load_split(index, "train")
    same = torch.equal(images[:n], images[n : 2 * n])
    assert not same and 0 < a["fid"] < 50 and abs(a["kid_mean"]) < 1 and a["class_accuracy"] > 0
