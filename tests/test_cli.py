"""The ``srdd`` command: config handling, run folders, exact resume, data tools and 2-process DDP on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import user_error

from srdd_lightning.cli import default_run_name, main

SMOKE = "srdd_lightning.stages.smoke.SmokeTestModule"


def _config(tmp_path: Path, digits_root: Path, **trainer) -> Path:
    cfg = {
        "model": {"class_path": SMOKE},
        "data": {"root": str(digits_root), "batch_size": 32},
        "trainer": {"accelerator": "cpu", "max_steps": 6, "val_check_interval": 3, "check_val_every_n_epoch": None,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1, **trainer},
        "run": {"root": str(tmp_path / "runs")},
    }
    path = tmp_path / "experiments" / "demo" / "smoke.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_default_run_name():
    assert default_run_name(["experiments/digits/srdd.yaml"], None) == "digits/srdd"
    assert default_run_name(["/x/experiments/ffhq.yaml"], None) == "ffhq"
    assert default_run_name(["elsewhere/cfg.yaml"], None) == "cfg"
    assert default_run_name([], "a.b.SRDDModule") == "SRDDModule"


def test_print_config_resolves_model_and_data(tmp_path, digits_root, capsys):
    cfg = _config(tmp_path, digits_root)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), "--print_config"])
    assert e.value.code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"] == SMOKE
    assert out["data"]["batch_size"] == 32 and out["checkpoint"]["save_last"] is True


def test_unknown_config_key_is_rejected(tmp_path, digits_root, capsys):
    cfg = _config(tmp_path, digits_root)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), "--data.no_such_option", "1"])
    assert e.value.code != 0
    assert "no_such_option" in capsys.readouterr().err


def test_model_arguments_from_data_and_mismatch(tmp_path, digits_root, capsys):
    cfg = _config(tmp_path, digits_root)
    user_error(capsys, ["fit", "--config", str(cfg), "--model.init_args.num_classes", "3"], "num_classes=3 disagrees with the data")


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def test_fit_then_resume_continues_exactly(tmp_path, digits_root):
    # uninterrupted: 8 steps
    ref_cfg = _config(tmp_path / "ref", digits_root, max_steps=8)
    main(["fit", "--config", str(ref_cfg)])
    ref_dir = tmp_path / "ref" / "runs" / "demo" / "smoke" / "version_0"
    assert (ref_dir / "config.yaml").exists() and (ref_dir / "checkpoints" / "last.ckpt").exists()

    # interrupted at 5 (mid-epoch, mid-validation interval), resumed to 8 in the same run folder
    cfg = _config(tmp_path / "res", digits_root, max_steps=5)
    main(["fit", "--config", str(cfg)])
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "8", "--ckpt_path", "last"])
    run_dir = tmp_path / "res" / "runs" / "demo" / "smoke" / "version_0"
    assert (run_dir / "config.yaml").exists() and (run_dir / "config.resume-1.yaml").exists()
    assert not (run_dir.parent / "version_1").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8
    ref, got = _weights(ref_dir / "checkpoints" / "last.ckpt"), ckpt["state_dict"]
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed run must equal the uninterrupted one"
    assert not list(run_dir.glob("checkpoints/.*tmp*")), "no temporary checkpoint files left behind"


def test_last_checkpoint_is_the_final_step_and_overwritten_on_resume(tmp_path, digits_root):
    # max_steps 7 is not a multiple of every_n_train_steps 5: last.ckpt must still hold step 7
    cfg = _config(tmp_path, digits_root, max_steps=7)
    main(["fit", "--config", str(cfg), "--checkpoint.every_n_train_steps", "5"])
    ckpts = tmp_path / "runs" / "demo" / "smoke" / "version_0" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 7
    # a resume with other checkpoint options overwrites last.ckpt instead of writing last-v1.ckpt
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "9", "--ckpt_path", "last",
          "--checkpoint.every_n_train_steps", "4"])
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 9
    assert not list(ckpts.glob("last-v*.ckpt"))


def test_ckpt_path_last_without_a_run_is_a_clear_error(tmp_path, digits_root, capsys):
    cfg = _config(tmp_path, digits_root)
    user_error(capsys, ["fit", "--config", str(cfg), "--ckpt_path", "last"], "no .*last.ckpt exists")


def test_data_tool_packs_digits(tmp_path, capsys):
    main(["data", "digits", "--out", str(tmp_path / "d"), "--resolution", "8", "--val_shards", "2"])
    out = capsys.readouterr().out
    assert "train: " in out and (tmp_path / "d" / "index.json").exists()


def test_overview_lists_tools(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "fit" in out and "data" in out and "sample" in out and "predict" not in out
    user_error(capsys, ["predict"], r"there is no srdd predict: .*srdd sample")


def test_ddp_two_cpu_processes_through_the_real_datamodule(tmp_path, digits_root):
    cfg = _config(tmp_path, digits_root, max_steps=4, val_check_interval=2, devices=2, strategy="ddp")
    srdd = Path(sys.executable).with_name("srdd")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(srdd), "fit", "--config", str(cfg), "--data.num_workers", "1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "demo" / "smoke" / "version_0" / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    assert "world_size=2" in proc.stderr or "distributed_backend=gloo" in proc.stderr


def test_csv_logger_writes_into_the_run_folder(tmp_path, digits_root):
    cfg = _config(tmp_path, digits_root)
    main(["fit", "--config", str(cfg), "--run.logger", "csv"])
    run = tmp_path / "runs" / "demo" / "smoke" / "version_0"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "val/loss" in header
    assert (run / "checkpoints" / "last.ckpt").exists() and not list(run.glob("events.out.tfevents.*"))


def test_sample_grids_reach_any_logger_that_takes_images(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger

    from srdd_lightning.callbacks.samples import log_image

    class ImageLogger(CSVLogger):  # the shape of W&B's / Neptune's log_image
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.images = []

        def log_image(self, key, images, step=None, **kw):
            self.images.append((key, images[0].shape, step))

    logger, csv = ImageLogger(tmp_path), CSVLogger(tmp_path)
    log_image(SimpleNamespace(loggers=[csv, logger]), "samples/grid", torch.zeros(3, 10, 12, dtype=torch.uint8), 7)
    assert logger.images == [("samples/grid", (10, 12, 3), 7)]


def test_unknown_command_and_bad_values_are_one_line(tmp_path, digits_root, capsys):
    user_error(capsys, ["fitt"], r"unknown command 'fitt'")
    cfg = _config(tmp_path, digits_root)
    user_error(capsys, ["fit", "--config", str(cfg), "--trainer.max_steps", "x"], r"trainer.max_steps: .*int.*x")
    user_error(capsys, ["fit", "--config", str(tmp_path / "nowhere.yaml")], r"nowhere.yaml")
    user_error(capsys, ["fit", "--config", str(cfg), "--model.init_args.nosuch", "1"], r"nosuch")
