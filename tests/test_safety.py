"""Nothing lost, nothing silently wrong: non-finite training, preemption, resuming the wrong thing, bad files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import user_error

from test_generator_stage import SMALL, save_tokenizer_module_ckpt
from test_tokenizer_stage import DIGITS, DISC, LOSS

GEN = "srdd_lightning.stages.generator.SRDDModule"
TOK = "srdd_lightning.stages.tokenizer.TokenizerModule"


class Poison(pl.Callback):
    """Fill every trainable weight with NaN at the end of optimizer step ``step`` (a diverging run)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


class Signal(pl.Callback):
    """Send this process ``signum`` at the end of optimizer step ``step`` (a scheduler's preemption, Ctrl-C)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)):
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "runs" / "tok"
    save_tokenizer_module_ckpt(root / "version_0" / "checkpoints" / "last.ckpt")
    return root


def _config(tmp_path: Path, digits_root: Path, model: dict, max_steps: int = 6, every: int = 2, callbacks=(),
            name: str = "gen") -> Path:
    cfg = {
        "model": model,
        "ema": {"decay": 0.9},
        "data": {"root": str(digits_root), "batch_size": 16},
        "trainer": {"accelerator": "cpu", "max_steps": max_steps, "val_check_interval": 100, "check_val_every_n_epoch": None,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": [
                        {"class_path": f"test_safety.{c[0]}", "init_args": c[1]} for c in callbacks]},
        "checkpoint": {"every_n_train_steps": every},
        "run": {"root": str(tmp_path / "runs"), "name": name},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _generator(tok_run: Path) -> dict:
    return {"class_path": GEN, "init_args": {"tokenizer_ckpt": str(tok_run), "architecture": dict(SMALL)}}


def _tokenizer() -> dict:
    return {"class_path": TOK, "init_args": {"tokenizer": {**DIGITS, "channels": 16, "vocab_size": 64}, "loss": LOSS,
                                            "discriminator": DISC}}  # fmt: skip


def _last(tmp_path: Path, name: str = "gen") -> dict:
    return torch.load(tmp_path / "runs" / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)


def _finite(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for part in ("state_dict", "current_model_state") for v in ckpt[part].values()
               if v.is_floating_point())  # fmt: skip


# ---- non-finite training stops and keeps the last good checkpoint -------------------------------------------------


@pytest.mark.parametrize("stage", ["generator", "tokenizer"])
def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(tmp_path, digits_root, tok_run, capsys, stage):
    model = _generator(tok_run) if stage == "generator" else _tokenizer()
    cfg = _config(tmp_path, digits_root, model, max_steps=8, every=2, callbacks=[("Poison", {"step": 3})])
    line = user_error(capsys, ["fit", "--config", str(cfg)], r"training stopped at step 4: train/loss\w* is nan.*"
                      r"last good checkpoint is .*last.ckpt.*--ckpt_path last", code=1)  # fmt: skip
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == 2 and _finite(ckpt), line  # step 3's weights were poisoned: never saved
    assert not any(p.name.startswith("epoch") and "step=4" in p.name
                   for p in (tmp_path / "runs" / "gen" / "version_0" / "checkpoints").iterdir())  # fmt: skip


def test_non_finite_weights_are_never_written(tmp_path, digits_root, tok_run, capsys):
    """Weights poisoned after step 2's loss was computed: the periodic save of step 2 is refused, step 1's stays."""
    cfg = _config(tmp_path, digits_root, _generator(tok_run), max_steps=6, every=1, callbacks=[("Poison", {"step": 2})])
    user_error(capsys, ["fit", "--config", str(cfg)], r"step 2: the weights are not finite", code=1)
    ckpt = _last(tmp_path)
    assert ckpt["global_step"] == 1 and _finite(ckpt)


# ---- preemption: a checkpoint at the current step, a non-zero exit, an exact continuation --------------------------


def _srdd(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    srdd = Path(sys.executable).with_name("srdd")
    tests = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(srdd), *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_current_step_and_resume_is_exact(tmp_path, digits_root, tok_run, signum):
    ref = _config(tmp_path / "ref", digits_root, _generator(tok_run), max_steps=6, every=100)
    assert _srdd(["fit", "--config", str(ref)], tmp_path).returncode == 0
    cfg = _config(tmp_path / "cut", digits_root, _generator(tok_run), max_steps=6, every=100,
                  callbacks=[("Signal", {"step": 3, "signum": int(signum)})])  # fmt: skip
    cut = _srdd(["fit", "--config", str(cfg)], tmp_path)
    assert cut.returncode == 128 + int(signum), cut.stderr[-2000:]
    assert f"stopped by {signum.name}" in cut.stderr and "--ckpt_path last" in cut.stderr
    assert _last(tmp_path / "cut")["global_step"] == 3
    # the signal callback fires at step 3 only: the resumed run passes it and goes on to 6
    done = _srdd(["fit", "--config", str(cfg), "--ckpt_path", "last"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _last(tmp_path / "ref"), _last(tmp_path / "cut")
    assert b["global_step"] == 6
    for part in ("state_dict", "current_model_state"):
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part


# ---- resuming the wrong thing is refused, and nothing is overwritten ----------------------------------------------------


def test_resuming_another_stages_checkpoint_is_refused(tmp_path, digits_root, tok_run, capsys):
    tok_ckpt = tok_run / "version_0" / "checkpoints" / "last.ckpt"
    before = tok_ckpt.read_bytes()
    cfg = _config(tmp_path, digits_root, _generator(tok_run))
    user_error(capsys, ["fit", "--config", str(cfg), "--ckpt_path", str(tok_ckpt)],
               rf"{tok_ckpt.name} is a checkpoint of {TOK}, but the config trains {GEN}")  # fmt: skip
    assert tok_ckpt.read_bytes() == before and not (tmp_path / "runs").exists()


def test_resuming_with_another_tokenizer_is_refused(tmp_path, digits_root, tok_run, capsys):
    cfg = _config(tmp_path, digits_root, _generator(tok_run), max_steps=2, every=2)
    assert _srdd(["fit", "--config", str(cfg)], tmp_path).returncode == 0
    last = tmp_path / "runs" / "gen" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    other = tmp_path / "tok2" / "last.ckpt"
    save_tokenizer_module_ckpt(other, seed=5)
    user_error(capsys, ["fit", "--config", str(cfg), "--ckpt_path", "last", "--trainer.max_steps", "4",
                        "--model.init_args.tokenizer_ckpt", str(other)],
               r"was trained with the tokenizer .*tok/version_0.*but model.init_args.tokenizer_ckpt=.*tok2")  # fmt: skip
    assert last.read_bytes() == before


@pytest.mark.parametrize("content,match", [(b"not a checkpoint\n", "is not a PyTorch checkpoint"),
                                           (b"PK\x03\x04truncated", "truncated or corrupt|not a readable checkpoint"),
                                           (b"", "is empty")])  # fmt: skip
def test_a_bad_checkpoint_file_gets_one_line(tmp_path, digits_root, tok_run, capsys, content, match):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    cfg = _config(tmp_path, digits_root, _generator(tok_run))
    user_error(capsys, ["fit", "--config", str(cfg), "--ckpt_path", str(bad)], rf"bad.ckpt .*({match})")
