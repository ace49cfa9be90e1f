"""Stage 2 (SRDDModule): loading by path, tokenizer pairing, VAR's loss and optimiser, fit/resume through the
CLI, sample grids, ``srdd sample`` (files, resume, seeds, ranks, editing) and the experiment configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml

import dataclasses

from helpers import user_error

from srdd_lightning.cli import main
from srdd_lightning.loading import load_generator, load_tokenizer, resolve_checkpoint
from srdd_lightning.models.tokenizer import build_tokenizer, tokenizer_config
from srdd_lightning.stages.generator import SRDDModule, WarmupLinearDecay, token_cross_entropy, var_loss
from srdd_lightning.utils.images import load_png

REPO = Path(__file__).resolve().parents[1]
SRDD = "srdd_lightning.stages.generator.SRDDModule"
SMALL = {"depth": 1, "width": 64, "num_heads": 2}  # a 1-block generator: seconds per fit on the CPU


# --------------------------------------------------------------------------------------------
# Fixtures: a TokenizerModule-contract checkpoint and a short training run
# --------------------------------------------------------------------------------------------


def save_tokenizer_module_ckpt(path: Path, seed: int = 0, ema_offset: float = 0.01) -> torch.nn.Module:
    """The TokenizerModule checkpoint contract: hyper_parameters.tokenizer (the TokenizerConfig fields), the EMA
    weights as ``state_dict["tokenizer.*"]`` and the trained ones in ``current_model_state`` (they differ by
    ``ema_offset``)."""
    torch.manual_seed(seed)
    tok = build_tokenizer("tiny-16")
    raw = {f"tokenizer.{k}": v for k, v in tok.state_dict().items()}
    ema = {k: v + ema_offset for k, v in raw.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": ema, "current_model_state": raw, "global_step": 7,
                "hyper_parameters": {"tokenizer": dataclasses.asdict(tokenizer_config("tiny-16"))},
                "srdd_stage": "srdd_lightning.stages.tokenizer.TokenizerModule"}, path)  # fmt: skip
    return tok


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    """A tokenizer run folder ``.../runs/tok`` with version_0 (and an empty, newer version_1 without checkpoint)."""
    root = tmp_path_factory.mktemp("tok") / "runs" / "tok"
    save_tokenizer_module_ckpt(root / "version_0" / "checkpoints" / "last.ckpt")
    (root / "version_1").mkdir()
    return root


def module(tok_run: Path, **kw) -> SRDDModule:
    args = {"num_classes": 10, "image_size": 16, "architecture": dict(SMALL), **kw}
    return SRDDModule(str(tok_run), **args)


class StopAt(pl.Callback):
    """Interrupt a run after optimizer step ``step`` (as a crash or preemption would), saving last.ckpt."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def write_config(tmp_path: Path, digits_root: Path, tok_run: Path, max_steps: int = 6, stop_at: int | None = None,
                 trainer: dict | None = None, **model) -> Path:
    cfg = {
        "model": {"class_path": SRDD, "init_args": {"tokenizer_ckpt": str(tok_run), "architecture": dict(SMALL),
                                                     "optim": {"warmup_steps": 2}, **model}},
        "ema": {"decay": 0.9},
        "data": {"root": str(digits_root), "batch_size": 16},
        "trainer": {"accelerator": "cpu", "max_steps": max_steps, "val_check_interval": 3, "check_val_every_n_epoch": None,
                    "limit_val_batches": 2, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1,
                    "callbacks": [{"class_path": "srdd_lightning.callbacks.SampleGrid",
                                   "init_args": {"every_n_steps": 3, "num_per_class": 2, "max_classes": 3,
                                                 "sampling": {"cfg": 1.0, "top_k": 0, "top_p": 1.0}}}]},
        "run": {"root": str(tmp_path / "runs")},
    }  # fmt: skip
    cfg["trainer"].update(trainer or {})
    if stop_at is not None:
        cfg["trainer"]["callbacks"].append({"class_path": f"{__name__}.StopAt", "init_args": {"step": stop_at}})
    path = tmp_path / "experiments" / "gen" / "srdd.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root, tok_run) -> dict:
    """6 steps uninterrupted, and interrupted after 3 steps then resumed to 6, through ``srdd fit`` in-process."""
    ref = tmp_path_factory.mktemp("ref")
    main(["fit", "--config", str(write_config(ref, digits_root, tok_run, max_steps=6))])
    res = tmp_path_factory.mktemp("res")
    cfg = write_config(res, digits_root, tok_run, max_steps=6, stop_at=3)
    main(["fit", "--config", str(cfg)])
    assert _ckpt(res / "runs" / "gen" / "srdd" / "version_0")["global_step"] == 3
    main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    return {"ref": ref / "runs" / "gen" / "srdd" / "version_0", "res": res / "runs" / "gen" / "srdd" / "version_0"}


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_resolve_checkpoint(tmp_path, tok_run):
    last = tok_run / "version_0" / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(last) == last
    assert resolve_checkpoint(tok_run) == last  # newest version *with* a checkpoint
    assert resolve_checkpoint(tok_run / "version_0") == last
    assert resolve_checkpoint(tok_run / "version_0" / "checkpoints") == last
    runs = tmp_path / "runs" / "x"
    for v in (2, 10):
        (runs / f"version_{v}" / "checkpoints").mkdir(parents=True)
        (runs / f"version_{v}" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_checkpoint(runs).parent.parent.name == "version_10"  # numeric, not lexicographic
    with pytest.raises(FileNotFoundError, match="no checkpoint in the run folder .*version_\\*"):
        resolve_checkpoint(tok_run / "version_1")
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt.*does not exist"):
        resolve_checkpoint(tmp_path / "nowhere.ckpt")


def test_load_tokenizer_prefers_ema_and_freezes(tok_run):
    tok, info = load_tokenizer(tok_run)
    raw, raw_info = load_tokenizer(tok_run, ema=False)
    assert info["kind"] == "tokenizer_module" and info["ema"] and not raw_info["ema"]
    assert info["path"].endswith("version_0/checkpoints/last.ckpt") and info["fingerprint"] != raw_info["fingerprint"]
    w, w_raw = tok.quantizer.codebook.weight, raw.quantizer.codebook.weight
    assert torch.allclose(w, w_raw + 0.01)  # the EMA shadows were loaded
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    assert (info["vocab_size"], info["latent_dim"], info["patch_nums"]) == (512, 16, [1, 2, 3, 4])


def test_load_tokenizer_dispatches_var_vae_files(tmp_path, monkeypatch):
    calls = []

    def fake_load_var_vae(sd, **kw):
        calls.append((sorted(sd), kw))
        return build_tokenizer("tiny-16")

    monkeypatch.setattr("srdd_lightning.models.var_import.load_var_vae", fake_load_var_vae)
    path = tmp_path / "vae_ch160v4096z32.pth"
    torch.save({"quantize.embedding.weight": torch.zeros(4, 2), "decoder.conv_in.weight": torch.zeros(1)}, path)
    tok, info = load_tokenizer(path)
    assert info["kind"] == "var_vae" and len(calls) == 1 and calls[0][1]["option"] == "model.init_args.tokenizer_ckpt"
    assert not tok.training


def test_load_tokenizer_errors_name_file_and_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights/vae_ch160v4096z32.pth.*model.init_args.tokenizer_ckpt.*Download"):
        load_tokenizer("weights/vae_ch160v4096z32.pth")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"generator.x": torch.zeros(1)}, "hyper_parameters": {},
                "srdd_stage": "srdd_lightning.stages.generator.SRDDModule"}, other)  # fmt: skip
    with pytest.raises(ValueError, match="neither a TokenizerModule checkpoint .*it holds a SRDDModule checkpoint"):
        load_tokenizer(other)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.ckpt .*is not a PyTorch checkpoint"):
        load_tokenizer(tmp_path / "notes.ckpt")


# --------------------------------------------------------------------------------------------
# Pairing with the tokenizer
# --------------------------------------------------------------------------------------------


def test_generator_sized_by_the_tokenizer(tok_run):
    m = module(tok_run)
    cfg = m.generator.config
    assert (cfg.vocab_size, cfg.latent_dim, cfg.patch_nums, cfg.num_classes) == (512, 16, (1, 2, 3, 4), 10)
    assert m.generator.null_class == 10
    assert m.hparams.tokenizer_ckpt.endswith("version_0/checkpoints/last.ckpt")  # pinned to the resolved file


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"schedule": [1, 2, 3]}, r"schedule \[1, 2, 3\] .*tokenizer_ckpt.*\[1, 2, 3, 4\]"),
        ({"schedule": [1, 5, 4]}, r"patch_nums"),
        ({"schedule": [1, 2, 6]}, r"schedule \[1, 2, 6\].*\[1, 2, 3, 4\]"),
        ({"image_size": 32}, r"image_size=32 .*16 px"),
        ({"num_classes": None}, r"num_classes is unset"),
        ({"optim": {"lr": -1}}, r"optim.lr=-1 is out of range"),
        ({"label_smoothing": 1.5}, r"label_smoothing=1.5"),
    ],
)
def test_mismatch_errors_name_both_sides(tok_run, kw, match):
    with pytest.raises(ValueError, match=match):
        module(tok_run, **kw)


def test_architecture_changes_only_what_it_names(tok_run):
    m = module(tok_run, architecture={"depth": 3, "width": 64, "num_heads": 4, "init_adaln_gate": 0.5})
    cfg = m.generator.config
    assert (cfg.depth, cfg.width, cfg.num_heads, cfg.init.adaln_gate) == (3, 64, 4, 0.5)
    assert cfg.mlp_ratio == 4.0 and cfg.init.head == 0.02  # the preset's
    with pytest.raises(TypeError):
        module(tok_run, architecture={"vocab_size": 10})  # sizes come from the tokenizer: not an architecture option


def test_fewer_scale_schedule_requantizes_tokens(tok_run):
    m = module(tok_run, schedule=[1, 2, 4])
    assert m.generator.patch_nums == (1, 2, 4)
    img = torch.rand(3, 3, 16, 16) * 2 - 1
    gt_BL, x_BLC = m.tokens_and_inputs(img)
    tokens = m.tokenizer.img_to_tokens(img, (1, 2, 4))
    assert gt_BL.shape == (3, 21) and x_BLC.shape == (3, 20, 16)
    assert torch.equal(gt_BL, torch.cat([t.flatten(1) for t in tokens], 1))


# --------------------------------------------------------------------------------------------
# Loss, label dropout, optimiser
# --------------------------------------------------------------------------------------------


def test_loss_is_one_over_L_weighted_cross_entropy(tok_run):
    m = module(tok_run).eval()
    img, label = torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([1, 7])
    with torch.no_grad():
        ce_BL, logits_BLV, gt_BL = m._forward_loss((img, label), None)
        tokens = m.tokenizer.img_to_tokens(img)
        gt = torch.cat([t.flatten(1) for t in tokens], 1)
        logits = m.generator(label, m.tokenizer.teacher_forcing_inputs(tokens))
    L = gt.shape[1]
    by_hand = sum(sum(-torch.log_softmax(logits[b, l], -1)[gt[b, l]] / L for l in range(L)) for b in range(2)) / 2
    assert torch.equal(gt_BL, gt)
    assert torch.allclose(var_loss(ce_BL), by_hand, atol=1e-5)
    # label smoothing is the cross-entropy's own
    smooth = token_cross_entropy(logits, gt, 0.1)
    assert torch.allclose(smooth, F.cross_entropy(logits.transpose(1, 2), gt, reduction="none", label_smoothing=0.1), atol=1e-6)


def test_label_dropout_rate_and_target(tok_run, monkeypatch):
    m = module(tok_run, cond_drop=0.25)
    seen = {}
    real_forward = m.generator.forward

    def spy(label_B, x_BLC, schedule=None, generator=None):
        seen["labels"] = label_B.clone()
        return real_forward(label_B, x_BLC, schedule, generator)

    monkeypatch.setattr(m.generator, "forward", spy)
    label = torch.arange(2000) % 10
    with torch.no_grad():
        m._forward_loss((torch.zeros(2000, 3, 16, 16), label), torch.Generator().manual_seed(0))
    dropped = seen["labels"] != label
    assert abs(dropped.float().mean().item() - 0.25) < 0.04
    assert torch.all(seen["labels"][dropped] == 10)  # the null class
    with torch.no_grad():
        m._forward_loss((torch.zeros(50, 3, 16, 16), label[:50]), None)
    assert torch.equal(seen["labels"], label[:50])  # no dropout in evaluation


def test_optimizer_groups_and_schedule(tok_run):
    m = module(tok_run, optim={"lr": 3e-4, "weight_decay": 0.05, "warmup_steps": 10, "decay_to": 0.1})
    m.trainer = pl.Trainer(max_steps=110, logger=False, enable_checkpointing=False, accelerator="cpu")
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    decay_ids = {id(p) for p in opt.param_groups[0]["params"]}
    no_decay_ids = {id(p) for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    names = dict(m.generator.named_parameters())
    for n in ("pos_embed", "pos_start", "level_embed.weight", "blocks.0.attn.log_temp",
              "blocks.0.attn.q_bias", "blocks.0.ada.bias", "head.out.bias"):  # fmt: skip
        assert id(names[n]) in no_decay_ids, n
    for n in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "blocks.0.ada.weight", "head.out.weight", "word_embed.weight",
              "class_embed.weight"):  # VAR decays the class embedding
        assert id(names[n]) in decay_ids, n
    assert decay_ids | no_decay_ids == {id(p) for p in m.generator.parameters()}  # nothing of the tokenizer
    assert opt.defaults["betas"] == (0.9, 0.95) and cfg["lr_scheduler"]["interval"] == "step"
    f = sched.lr_lambdas[0]
    assert f(0) == pytest.approx(0.005) and f(10) == 1.0 and f(14) == 1.0  # warmup, then a 5 % hold
    assert f(109) == pytest.approx(0.1) and 0.1 < f(60) < 1.0
    assert WarmupLinearDecay(0, None, 0.1)(10**6) == 1.0


def test_trainer_gradient_clip_is_rejected(tok_run):
    m = module(tok_run)
    m.trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, accelerator="cpu", gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="model.init_args.optim.grad_clip"):
        m.setup("fit")


# --------------------------------------------------------------------------------------------
# Fit, checkpoints, resume, sample grids
# --------------------------------------------------------------------------------------------


def test_checkpoint_has_no_tokenizer_and_reloads_strictly(trained, tok_run):
    ckpt = _ckpt(trained["ref"])
    assert ckpt["global_step"] == 6
    for part in ("state_dict", "current_model_state"):  # the EMA and the trained weights, without the tokenizer
        assert not [k for k in ckpt[part] if k.startswith("tokenizer.")]
        assert any(k.startswith("generator.") for k in ckpt[part])
    assert int(ckpt["averaging_state"]["n_averaged"]) == 6
    assert ckpt["srdd_tokenizer"]["path"].endswith("version_0/checkpoints/last.ckpt")
    assert ckpt["srdd_stage"] == SRDD
    assert all(len(s["params"]) for s in ckpt["optimizer_states"][0]["param_groups"])
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert n_opt == sum(1 for k in ckpt["state_dict"] if k.startswith("generator."))
    SRDDModule.load_from_checkpoint(trained["ref"] / "checkpoints" / "last.ckpt")  # Lightning's strict loading works too
    g = load_generator(trained["ref"])  # run folder -> last.ckpt, EMA weights
    ema_w = ckpt["state_dict"]["generator.head.out.weight"]
    assert torch.equal(g.generator.head.out.weight, ema_w) and not g.training and g.loaded_with_ema
    raw = load_generator(trained["ref"], ema=False)
    assert torch.equal(raw.generator.head.out.weight, ckpt["current_model_state"]["generator.head.out.weight"])
    assert not torch.equal(ema_w, ckpt["current_model_state"]["generator.head.out.weight"])


def test_resume_continues_exactly(trained):
    ref, res = _ckpt(trained["ref"]), _ckpt(trained["res"])
    assert res["global_step"] == 6 and (trained["res"] / "config.resume-1.yaml").exists()
    for part in ("state_dict", "current_model_state"):  # the EMA and the trained weights
        assert ref[part].keys() == res[part].keys()
        for k, v in ref[part].items():
            assert torch.equal(v, res[part][k]), (part, k)


def test_logs_and_sample_grids(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(trained["ref"]))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for key in ("train/loss", "train/acc_1x1", "train/loss_4x4", "train/codebook_share", "lr/weights", "train/grad_norm",
                "val/loss", "val/acc_4x4", "val/codebook_share", "train/samples"):  # fmt: skip
        assert key in scalars, key
    assert "samples/grid" in ea.Tags()["images"]
    grid = load_png(trained["ref"] / "samples" / "step_3.png")
    assert (trained["ref"] / "samples" / "step_6.png").exists()
    assert grid.shape[1] == 3 * 18 + 2 and grid.shape[2] == 2 * 18 + 2  # 3 class rows x 2 seeds of 16 px


def test_ddp_two_cpu_processes_bf16(tmp_path, digits_root, tok_run):
    """Plain DDP (find_unused_parameters=False fails on any unused generator parameter) with bf16 autocast."""
    cfg = write_config(tmp_path, digits_root, tok_run, max_steps=4,
                       trainer={"devices": 2, "strategy": "ddp", "precision": "bf16-mixed", "val_check_interval": 2})
    srdd = Path(sys.executable).with_name("srdd")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(srdd), "fit", "--config", str(cfg)], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "gen" / "srdd" / "version_0"
    ckpt = _ckpt(run)
    assert ckpt["global_step"] == 4 and int(ckpt["averaging_state"]["n_averaged"]) == 4
    assert not [k for k in ckpt["state_dict"] if k.startswith("tokenizer.")]
    assert (run / "samples" / "step_4.png").exists()


def test_changed_tokenizer_is_detected(trained, tmp_path):
    ckpt_path = trained["ref"] / "checkpoints" / "last.ckpt"
    other = tmp_path / "tok2" / "last.ckpt"
    save_tokenizer_module_ckpt(other, seed=1)
    with pytest.raises(ValueError, match="trained with the tokenizer .*different weights"):
        SRDDModule.load_from_checkpoint(ckpt_path, tokenizer_ckpt=str(other))


# --------------------------------------------------------------------------------------------
# Experiment configs
# --------------------------------------------------------------------------------------------

PAPER_CONFIGS = ["ffhq.yaml", "miniimagenet.yaml", "sun397.yaml"]


def test_var_config_holds_only_the_mask(capsys):
    var = yaml.safe_load((REPO / "experiments" / "digits" / "var.yaml").read_text())
    assert var == {"model": {"init_args": {"attn": "causal"}}}
    resolved = []
    for configs in (["digits/srdd.yaml"], ["digits/srdd.yaml", "digits/var.yaml"]):
        args = [a for c in configs for a in ("--config", str(REPO / "experiments" / c))]
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        resolved.append(yaml.safe_load(capsys.readouterr().out))
    srdd, var = resolved
    assert srdd["model"]["init_args"].pop("attn") == "markov" and var["model"]["init_args"].pop("attn") == "causal"
    assert srdd == var


@pytest.mark.parametrize("name", ["digits/srdd.yaml", *PAPER_CONFIGS])
def test_configs_print(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "experiments" / name), "--print_config"])
    assert e.value.code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"] == SRDD


def test_fit_help_lists_the_generator_and_tokenizer_options_with_docs(capsys):
    """Every option is typed and documented: no free-form dicts (issue 9)."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "experiments" / "digits" / "srdd.yaml"), "--help"])
    out = capsys.readouterr().out
    for text in ("--ema.decay", "--checkpoint.every_n_train_steps", f"model.class_path: {SRDD}"):
        assert text in out, text
    for text in ("--model.architecture.depth", "Number of transformer blocks", "--model.optim.lr",
                 "Peak learning rate", "--model.attn", "--model.schedule"):  # fmt: skip
        assert text in out, text
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "srdd_lightning.stages.tokenizer.TokenizerModule"])
    out = capsys.readouterr().out
    for text in ("--model.tokenizer.vocab_size", "number of codes in the single codebook",
                 "--model.loss.gan_start", "--model.discriminator.layers",
                 "--model.restarts.every", "--model.optim.grad_clip"):  # fmt: skip
        assert text in out, text
    assert "overrides" not in out and "Dict" not in out


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_fail_clearly_without_data_or_weights(name, tmp_path, monkeypatch, digits_root, capsys):
    monkeypatch.chdir(tmp_path)  # no data/ and no weights/ here
    cfg = str(REPO / "experiments" / name)
    user_error(capsys, ["fit", "--config", cfg], r"dataset folder data/\w+ does not exist; pack one first")
    user_error(capsys, ["fit", "--config", cfg, "--data.root", str(digits_root)],
               r"weights/vae_ch160v4096z32.pth.*model.init_args.tokenizer_ckpt.*Download")


# --------------------------------------------------------------------------------------------
# FSDP (needs CUDA)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fsdp_fit_checkpoint_and_reload(tmp_path, digits_root, tok_run):
    """FSDP with one unit per AdaLNBlock; fp32 master weights (the embeddings and the EMA stay fp32), bf16 compute."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from srdd_lightning.data.datamodule import ShardDataModule
    from srdd_lightning.models.transformer import AdaLNBlock

    from srdd_lightning.callbacks.ema import ShardedEMA

    m = module(tok_run, optim={"warmup_steps": 1})
    fp32 = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
    trainer = pl.Trainer(
        accelerator="cuda", devices=1, strategy=FSDPStrategy(auto_wrap_policy={AdaLNBlock}, mixed_precision=fp32),
        precision="bf16-mixed", max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=2,
        logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
        callbacks=[__import__("srdd_lightning.callbacks", fromlist=["SampleGrid"]).SampleGrid(every_n_steps=2, max_classes=2),
                   ShardedEMA(decay=0.9)],
    )  # fmt: skip
    trainer.fit(m, datamodule=ShardDataModule(str(digits_root), batch_size=16))
    path = tmp_path / "fsdp.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "tokenizer." in k]
    ema_w, raw_w = ckpt["state_dict"]["generator.head.out.weight"], ckpt["current_model_state"]["generator.head.out.weight"]
    assert ema_w.dtype == torch.float32 and not torch.equal(ema_w, raw_w)
    reloaded = load_generator(path).cuda()
    assert all(torch.isfinite(p).all() for p in reloaded.generator.parameters())
    with torch.no_grad():
        out = reloaded.sampler().sample([1, 2], seeds=0)
    assert out.images.shape == (2, 3, 16, 16)


def test_cli_reports_a_missing_tokenizer_plainly(digits_root, tmp_path, capsys):
    user_error(capsys, ["fit", "--config", "experiments/digits/srdd.yaml", "--data.root", str(digits_root),
                        "--model.init_args.tokenizer_ckpt", "weights/nowhere.pth", "--run.root", str(tmp_path)],
               r"weights/nowhere.pth.*model.init_args.tokenizer_ckpt")


def test_generator_fsdp_strategy_is_configured_from_plain_values():
    from srdd_lightning.models.transformer import AdaLNBlock
    from srdd_lightning.strategies import GeneratorFSDP

    s = GeneratorFSDP(sharding_strategy="SHARD_GRAD_OP", activation_checkpointing=True)
    assert s.mixed_precision.param_dtype == torch.float32
    assert s.kwargs["auto_wrap_policy"] is not None and str(s.sharding_strategy).endswith("SHARD_GRAD_OP")
    assert s._activation_checkpointing_kwargs  # block-wise recomputation requested
    assert AdaLNBlock in s.kwargs["auto_wrap_policy"]._module_classes
