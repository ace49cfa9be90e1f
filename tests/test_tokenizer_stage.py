"""TokenizerModule: GAN gradients and steps, adaptive weight, checkpoint contract, resume, metrics, CLI and DDP."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml

from srdd_lightning.callbacks.ema import EMA
from srdd_lightning.cli import main
from srdd_lightning.data import ShardDataModule
from srdd_lightning.loading import load_stage, load_tokenizer
from srdd_lightning.models.quantizer import code_hits, codebook_usage, usage_from_hits
from srdd_lightning.models.tokenizer import build_tokenizer, tokenizer_config
from srdd_lightning.stages.tokenizer import TokenizerModule, scale_hits
from test_tokenizer_blocks import var_vae_shapes  # VAR's key/shape table

MODULE = "srdd_lightning.stages.tokenizer.TokenizerModule"
# The digits preset, narrowed for speed: 16 px, 8×8 latent, patch_nums (1, 2, 3, 4, 6, 8).
SMALL = {"channels": 16, "vocab_size": 64}
DIGITS = dataclasses.asdict(tokenizer_config("digits"))
LOSS = {"lpips": 0.0}
DISC = {"layers": 2, "channels": 8}
OPTIM = {"lr": 1e-3}


def _module(tok: dict | None = None, loss: dict | None = None, disc: dict | None = None, optim: dict | None = None,
            **kw) -> TokenizerModule:
    torch.manual_seed(0)
    return TokenizerModule(tokenizer={**DIGITS, **SMALL, **(tok or {})}, loss={**LOSS, **(loss or {})},
                           discriminator={**DISC, **(disc or {})}, optim={**OPTIM, **(optim or {})}, **kw)  # fmt: skip


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.named_parameters() if not torch.equal(before[k], v)]


def test_digits_preset_is_what_the_generator_stage_assumes():
    tok = build_tokenizer("digits")
    assert (tok.image_size, tok.latent_size, tok.vocab_size, tok.latent_dim) == (16, 8, 512, 16)
    assert tok.patch_nums == (1, 2, 3, 4, 6, 8) and sum(p * p for p in tok.patch_nums) == 130


# ------------------------------------------------------------------------------------------------
# GAN losses and steps
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iteration", [0, 3], ids=["before_disc_start", "after_disc_start"])
def test_losses_have_disjoint_gradients_and_leave_no_parameter_without_one(iteration):
    m = _module(loss={"gan_start": 3})
    out = m.gan_losses(_images(), iteration)
    tok, disc = list(m.tokenizer.parameters()), list(m.discriminator.parameters())
    g_tok = torch.autograd.grad(out.loss_g, tok, retain_graph=True, allow_unused=True)
    g_tok_disc = torch.autograd.grad(out.loss_g, disc, retain_graph=True, allow_unused=True)
    d_disc = torch.autograd.grad(out.loss_d, disc, retain_graph=True, allow_unused=True)
    d_tok = torch.autograd.grad(out.loss_d, tok, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_tok_disc), "the generator loss must not train the discriminator"
    assert all(g is None for g in d_tok), "the discriminator loss must not train the tokenizer"
    # every parameter gets a gradient from the single backward: plain DDP needs no find_unused_parameters
    names = [n for n, _ in m.tokenizer.named_parameters()]
    assert [n for n, g in zip(names, g_tok) if g is None] == []
    assert all(g is not None for g in d_disc)


def test_generator_step_changes_only_the_tokenizer_and_discriminator_step_only_the_discriminator():
    m = _module(loss={"gan_start": 0})
    opt_g, opt_d = m.configure_optimizers()
    out = m.gan_losses(_images(), iteration=5)
    assert float(out.logs["gan_weight"]) > 0
    opt_g.zero_grad(), opt_d.zero_grad()
    (out.loss_g + out.loss_d).backward()
    tok0, disc0 = _snapshot(m.tokenizer), _snapshot(m.discriminator)
    opt_g.step()
    assert _changed(disc0, m.discriminator) == []
    assert len(_changed(tok0, m.tokenizer)) == len(tok0), "every tokenizer parameter should move"
    tok1 = _snapshot(m.tokenizer)
    opt_d.step()
    assert _changed(tok1, m.tokenizer) == []
    # every weight moves (the last bias may not: in the hinge's linear region its gradient is ½(−1 + 1) = 0)
    assert {k for k in disc0 if k.endswith("weight")} <= set(_changed(disc0, m.discriminator))


def test_adaptive_weight_switches_on_at_disc_start():
    m = _module(loss={"gan_start": 10, "gan": 0.5, "vq": 2.0})
    img = _images()
    before = m.gan_losses(img, 9)
    assert float(before.logs["gan_weight"]) == 0 and float(before.logs["g_adv"]) == 0
    assert torch.allclose(before.loss_g, before.logs["rec"] + 2.0 * before.logs["vq"])
    after = m.gan_losses(img, 10)
    lam = after.logs["adaptive_weight"]
    assert math.isfinite(float(lam)) and float(lam) > 0
    assert torch.allclose(after.logs["gan_weight"], 0.5 * lam)
    expected = after.logs["rec"] + 2.0 * after.logs["vq"] + 0.5 * lam * after.logs["g_adv"]
    assert torch.allclose(after.loss_g, expected, atol=1e-6)


def test_scale_dropout_mask_is_seeded_by_iteration():
    m = _module(tok={"scale_dropout": 0.9})
    a, b, c = m.scale_keep(64, 7), m.scale_keep(64, 7), m.scale_keep(64, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (~a).any(), "with p = 0.9 some samples drop scales"
    m.eval()
    assert m.scale_keep(64, 7).all()


# ------------------------------------------------------------------------------------------------
# Options and errors
# ------------------------------------------------------------------------------------------------


def test_image_size_disagreeing_with_the_tokenizer_names_both():
    with pytest.raises(ValueError, match=r"image_size=32 .*model.init_args.tokenizer.image_size=16"):
        _module(image_size=32)
    _module(image_size=16)


def test_discriminator_too_deep_for_the_images():
    with pytest.raises(ValueError, match=r"discriminator.layers=3 needs images of at least 24 px"):
        _module(disc={"layers": 3})


def test_bad_option_values_name_the_option():
    with pytest.raises(ValueError, match=r"loss.gan_start must be >= 0"):
        _module(loss={"gan_start": -1})
    with pytest.raises(ValueError, match=r"restarts.every must be >= 0"):
        _module(restarts={"every": -2})


def test_lpips_missing_weights_name_file_and_option(tmp_path, monkeypatch):
    monkeypatch.delenv("SRDD_LPIPS_VGG_PATH", raising=False)
    m = _module(loss={"lpips": 1.0})  # building the module needs no files (a checkpoint can be inspected anywhere)
    with pytest.raises(FileNotFoundError, match=r"model\.init_args\.loss\.lpips_vgg_path"):
        m.setup("fit")
    missing = tmp_path / "vgg16-397923af.pth"
    m = _module(loss={"lpips": 1.0, "lpips_vgg_path": str(missing)})
    with pytest.raises(FileNotFoundError, match=rf"{missing.name}.*model\.init_args\.loss\.lpips_vgg_path"):
        m.setup("fit")
    _module().setup("fit")  # off: nothing is needed


def test_lpips_term_with_stand_in_weights_stays_out_of_the_checkpoint(lpips_files):
    vgg, _ = lpips_files
    m = _module(loss={"lpips": 1.0, "lpips_vgg_path": str(vgg)})
    m.setup("fit")
    out = m.gan_losses(_images(), 0)
    assert float(out.logs["lpips"]) > 0
    rec = 0.2 * out.logs["l1"] + 1.0 * out.logs["l2"] + 1.0 * out.logs["lpips"]
    assert torch.allclose(out.logs["rec"], rec)
    assert not any("lpips" in k or "vgg" in k for k in m.state_dict()), "frozen VGG weights must not be checkpointed"
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in m.tokenizer.parameters()) + sum(
        p.numel() for p in m.discriminator.parameters()
    )


def _contract_checkpoint(path: Path, module: TokenizerModule, ema_offset: float = 0.1) -> dict:
    """A TokenizerModule checkpoint as the EMA callback writes it: EMA weights in state_dict, trained ones beside."""
    raw = {f"tokenizer.{k}": v.clone() for k, v in module.tokenizer.state_dict().items()}
    ema = {k: v + ema_offset for k, v in raw.items()}
    torch.save({"state_dict": ema, "current_model_state": raw, "hyper_parameters": dict(module.hparams),
                "srdd_stage": MODULE}, path)  # fmt: skip
    return ema


def test_init_from_another_tokenizer_checkpoint_uses_its_ema_weights(tmp_path):
    path = tmp_path / "src.ckpt"
    ema = _contract_checkpoint(path, _module())
    m = _module(init_from=str(path))
    m.setup("fit")
    assert all(torch.equal(v, ema[f"tokenizer.{k}"]) for k, v in m.tokenizer.state_dict().items())
    m.setup("validate")  # a second setup (e.g. validate after fit) must not reload over trained weights
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*model\.init_args\.init_from"):
        _module(init_from=str(tmp_path / "nowhere.pth")).setup("fit")


def test_init_from_var_weights(tmp_path):
    shapes = var_vae_shapes(ch=8, z=8, V=32)
    var_sd = {k: torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, (k, s) in enumerate(shapes.items())}
    path = tmp_path / "vae_ch160v4096z32.pth"
    torch.save(var_sd, path)
    m = TokenizerModule(tokenizer={"channels": 8, "latent_dim": 8, "vocab_size": 32, "norm_groups": 8},
                        init_from=str(path), loss=LOSS, discriminator={"channels": 8})  # fmt: skip
    m.setup("fit")
    assert torch.equal(m.tokenizer.quantizer.codebook.weight, var_sd["quantize.embedding.weight"])
    assert torch.equal(m.tokenizer.decoder.conv_out.weight, var_sd["decoder.conv_out.weight"])
    wrong = _module(init_from=str(path))
    with pytest.raises(ValueError, match="does not match the var-vae-f16 preset"):
        wrong.setup("fit")


def test_fp16_mixed_is_refused():
    m = _module()
    m.trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(ValueError, match="trainer.precision=16-mixed .*bf16-mixed"):
        m.setup("fit")


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_usage_from_hits_summed_over_ranks_equals_usage_of_all_tokens():
    V = 16
    g = torch.Generator().manual_seed(0)
    rank0 = [torch.randint(0, 3, (5, 1, 1), generator=g), torch.randint(0, V, (5, 2, 2), generator=g)]
    rank1 = [torch.randint(2, 9, (5, 1, 1), generator=g), torch.randint(0, V, (5, 2, 2), generator=g)]
    rank1[1][0] = -1  # a scale dropped for one sample: not counted
    assert torch.equal(scale_hits(rank0, V), code_hits(rank0, V))
    assert torch.equal(scale_hits(rank1, V), code_hits(rank1, V))
    summed = usage_from_hits(scale_hits(rank0, V) + scale_hits(rank1, V))
    together = codebook_usage([torch.cat([a, b]) for a, b in zip(rank0, rank1)], V)
    assert summed == together
    assert summed[0]["max_possible"] == 10 and summed[1]["max_possible"] == V
    assert summed[0]["used"] == len(set(torch.cat([rank0[0], rank1[0]]).flatten().tolist()))


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def _trainer(tmp_path: Path, max_steps: int, callbacks=None) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0, limit_val_batches=2, callbacks=callbacks,
    )  # fmt: skip


def test_save_load_and_the_checkpoint_contract(tmp_path, digits_root):
    m = _module(loss={"gan_start": 1}, restarts={"every": 2})
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[EMA(decay=0.5)])
    trainer.fit(m, datamodule=ShardDataModule(str(digits_root), batch_size=16))
    assert trainer.global_step == 3 and m.iteration == 3, "one optimizer step per iteration, as the user reads it"
    path = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(path)
    img = _images(6)
    m.eval()
    raw = m.tokenizer.reconstruct(img)

    # The contract other stages read (loading.load_tokenizer): the recorded TokenizerConfig rebuilds the tokenizer,
    # state_dict holds the EMA weights, current_model_state the trained ones.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["srdd_stage"] == MODULE and ckpt["hyper_parameters"]["tokenizer"]["vocab_size"] == 64
    ema_tok, info = load_tokenizer(path)
    raw_tok, _ = load_tokenizer(path, ema=False)
    assert info["ema"] and not ema_tok.training
    assert torch.equal(raw_tok.reconstruct(img), raw)
    assert not torch.equal(ema_tok.reconstruct(img), raw)
    ema_w = ckpt["state_dict"]["tokenizer.quantizer.codebook.weight"]
    assert torch.equal(ema_tok.quantizer.codebook.weight, ema_w)
    # the whole stage, by the class it records
    stage = load_stage(path, ema=False)
    assert isinstance(stage, TokenizerModule) and torch.equal(stage.tokenizer.reconstruct(img), raw)


# ------------------------------------------------------------------------------------------------
# Through the CLI (real datamodule, run folder, TensorBoard) and resume
# ------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, digits_root: Path, model: dict | None = None, **trainer) -> Path:
    init = {"tokenizer": {**DIGITS, **SMALL, "scale_dropout": 0.5}, "loss": {**LOSS, "gan_start": 2},
            "discriminator": DISC, "optim": OPTIM, "restarts": {"every": 2}}
    for k, v in (model or {}).items():
        init[k] = {**init.get(k, {}), **v}
    cfg = {
        "model": {"class_path": MODULE, "init_args": init},
        "ema": {"decay": 0.9},
        "data": {"root": str(digits_root), "batch_size": 16},
        "trainer": {"accelerator": "cpu", "max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1, **trainer},
        "run": {"root": str(tmp_path / "runs")},
    }  # fmt: skip
    path = tmp_path / "experiments" / "demo" / "tokenizer.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0, "images": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
        for tag in ea.Tags()["images"]:
            out.setdefault(tag, []).extend((e.step, 0.0) for e in ea.Images(tag))
    return out


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_cli_fit_logs_metrics_and_resume_continues_exactly(tmp_path, digits_root):
    # uninterrupted: 4 iterations (= optimizer steps), crossing gan_start=2, restarts every 2 iterations
    ref_cfg = _config(tmp_path / "ref", digits_root)
    main(["fit", "--config", str(ref_cfg)])
    ref_dir = tmp_path / "ref" / "runs" / "demo" / "tokenizer" / "version_0"
    ref = _ckpt(ref_dir)
    assert ref["global_step"] == 4
    assert list(ref["hyper_parameters"]["tokenizer"]["patch_nums"]) == [1, 2, 3, 4, 6, 8]
    assert ref["hyper_parameters"]["image_size"] == 16
    logs = _scalars(ref_dir)
    for key in ("train/l1", "train/l2", "train/vq", "train/g_adv", "train/adaptive_weight", "train/loss_d",
                "train/restarted_codes", "lr-AdamW/tokenizer", "lr-AdamW-1/discriminator", "val/psnr", "val/ssim", "val/l2",
                "val/vq", "val_usage/1x1/of_possible", "val_usage/8x8/perplexity", "val_usage/min_of_possible",
                "val/reconstruction"):  # fmt: skip
        assert key in logs, key
    assert [s for s, _ in logs["val/reconstruction"]] == [2, 4]
    assert logs["train/adaptive_weight"][0][1] == 0 and logs["train/adaptive_weight"][-1][1] > 0

    # interrupted after 2 iterations, resumed to 4 in the same run folder
    cfg = _config(tmp_path / "res", digits_root, max_steps=2)
    main(["fit", "--config", str(cfg)])
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    got = _ckpt(tmp_path / "res" / "runs" / "demo" / "tokenizer" / "version_0")
    assert got["global_step"] == 4
    for part in ("state_dict", "current_model_state"):  # the EMA and the trained weights
        diff = [k for k in ref[part] if not torch.equal(ref[part][k], got[part][k])]
        assert diff == [], f"resumed run differs from the uninterrupted one in {part}: {diff[:5]}"


# ------------------------------------------------------------------------------------------------
# Two CPU processes under plain DDP
# ------------------------------------------------------------------------------------------------

RANK_DUMP = '''
import torch
from lightning.pytorch.callbacks import Callback

class DumpState(Callback):
    """Each rank writes its final state dict, so the test can check that the replicas never diverged."""

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        sd = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(sd, f"{self.out}/rank{trainer.global_rank}.pt")
'''


@pytest.mark.parametrize("disc_start", [100, 2], ids=["before_disc_start", "crossing_disc_start"])
def test_ddp_two_cpu_processes_stay_identical(tmp_path, digits_root, disc_start):
    (tmp_path / "rankdump.py").write_text(RANK_DUMP)
    callbacks = [{"class_path": "rankdump.DumpState", "init_args": {"out": str(tmp_path)}}]
    cfg = _config(tmp_path, digits_root, model={"loss": {"gan_start": disc_start}}, devices=2, strategy="ddp",
                  callbacks=callbacks)  # fmt: skip
    srdd = Path(sys.executable).with_name("srdd")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(srdd), "fit", "--config", str(cfg), "--data.num_workers", "1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo" / "tokenizer" / "version_0"
    ckpt = _ckpt(run_dir)
    assert ckpt["global_step"] == 4
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    diff = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert diff == [], f"ranks diverged in {diff[:5]}"
    logs = _scalars(run_dir)
    # metrics and code hits are summed over the whole validation split: 264 images, 132 on each rank
    assert logs["val/num_images"][-1][1] == 264
    assert logs["val_usage/1x1/tokens"][-1][1] == 264 and logs["val_usage/8x8/tokens"][-1][1] == 264 * 64
    assert sum(v for _, v in logs["train/restarted_codes"]) > 0, "restarts ran (identically, see above)"
    if disc_start == 2:
        assert logs["train/adaptive_weight"][-1][1] > 0


@pytest.mark.parametrize("name", ["digits/tokenizer.yaml", "ffhq/tokenizer.yaml"])
def test_shipped_configs_parse(name, digits_root, capsys):
    cfg = Path(__file__).resolve().parents[1] / "experiments" / name
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), "--data.root", str(digits_root), "--print_config"])
    assert e.value.code == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["model"]["class_path"] == MODULE
