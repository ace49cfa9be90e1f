"""TokenizerModule: GAN gradients and steps, adaptive weight, checkpoint contract, resume, metrics, CLI and DDP."""

from __future__ import annotations

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

from srdd_lightning.cli import main
from srdd_lightning.data import ShardDataModule
from srdd_lightning.models.quantizer import code_hits, codebook_usage, usage_from_hits
from srdd_lightning.models.tokenizer import build_tokenizer
from srdd_lightning.stages.tokenizer import TokenizerModule, psnr, scale_hits, ssim
from test_tokenizer_blocks import var_vae_shapes  # VAR's key/shape table

MODULE = "srdd_lightning.stages.tokenizer.TokenizerModule"
# The digits preset, narrowed for speed: 16 px, 8×8 latent, patch_nums (1, 2, 3, 4, 6, 8).
SMALL = {"channels": 16, "vocab_size": 64}
SMALL_ARGS = dict(overrides=SMALL, lpips_weight=0.0, disc_layers=2, disc_channels=8, lr=1e-3, ema_decay=0.9)


def _module(**kw) -> TokenizerModule:
    torch.manual_seed(0)
    return TokenizerModule("digits", **{**SMALL_ARGS, **kw})


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
    m = _module(disc_start=3)
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
    m = _module(disc_start=0)
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
    m = _module(disc_start=10, disc_weight=0.5, vq_weight=2.0)
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
    m = _module(overrides={**SMALL, "scale_dropout": 0.9})
    a, b, c = m.scale_keep(64, 7), m.scale_keep(64, 7), m.scale_keep(64, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (~a).any(), "with p = 0.9 some samples drop scales"
    m.eval()
    assert m.scale_keep(64, 7).all()


# ------------------------------------------------------------------------------------------------
# Options and errors
# ------------------------------------------------------------------------------------------------


def test_image_size_disagreeing_with_the_preset_names_both():
    with pytest.raises(ValueError, match=r"image_size=32 .*image_size=16 \(model.init_args.preset='digits'"):
        TokenizerModule("digits", image_size=32, lpips_weight=0.0, disc_layers=2)
    TokenizerModule("digits", image_size=16, lpips_weight=0.0, disc_layers=2)


def test_discriminator_too_deep_for_the_images():
    with pytest.raises(ValueError, match="disc_layers=3 needs images of at least 24 px"):
        TokenizerModule("digits", lpips_weight=0.0, disc_layers=3)


def test_lpips_missing_weights_name_file_and_option(tmp_path, monkeypatch):
    monkeypatch.delenv("SRDD_LPIPS_VGG_PATH", raising=False)
    monkeypatch.delenv("SRDD_LPIPS_HEADS_PATH", raising=False)
    m = _module(lpips_weight=1.0)  # building the module needs no files (a checkpoint can be inspected anywhere)
    with pytest.raises(FileNotFoundError, match=r"model\.init_args\.lpips_vgg_path"):
        m.setup("fit")
    missing = tmp_path / "vgg16-397923af.pth"
    m = _module(lpips_weight=1.0, lpips_vgg_path=str(missing))
    with pytest.raises(FileNotFoundError, match=rf"{missing.name}.*model\.init_args\.lpips_vgg_path"):
        m.setup("fit")
    _module(lpips_weight=0.0).setup("fit")  # off: nothing is needed


def test_lpips_term_with_stand_in_weights_stays_out_of_the_checkpoint(lpips_files):
    vgg, heads = lpips_files
    m = _module(lpips_weight=1.0, lpips_vgg_path=str(vgg), lpips_heads_path=str(heads))
    m.setup("fit")
    out = m.gan_losses(_images(), 0)
    assert float(out.logs["lpips"]) > 0
    rec = 0.2 * out.logs["l1"] + 1.0 * out.logs["l2"] + 1.0 * out.logs["lpips"]
    assert torch.allclose(out.logs["rec"], rec)
    assert not any("lpips" in k or "vgg" in k for k in m.state_dict()), "frozen VGG weights must not be checkpointed"
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in m.tokenizer.parameters()) + sum(
        p.numel() for p in m.discriminator.parameters()
    )


def test_init_from_another_tokenizer_checkpoint_uses_its_ema_weights(tmp_path):
    src = _module()
    with torch.no_grad():
        for p in src.tokenizer.parameters():
            p.add_(0.1)
    src.ema.update(src.tokenizer)  # shadows now differ from both the raw weights and a fresh init
    path = tmp_path / "src.ckpt"
    torch.save({"state_dict": src.state_dict(), "hyper_parameters": dict(src.hparams)}, path)
    m = _module(init_from=str(path))
    m.setup("fit")
    with src.ema.swapped(src.tokenizer):
        expected = {k: v.clone() for k, v in src.tokenizer.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in m.tokenizer.state_dict().items())
    assert all(torch.equal(getattr(m.ema, m.ema._key(n)), p) for n, p in m.tokenizer.named_parameters())
    m.setup("validate")  # a second setup (e.g. validate after fit) must not reload over trained weights
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth.*model\.init_args\.init_from"):
        _module(init_from=str(tmp_path / "nowhere.pth")).setup("fit")


def test_init_from_var_weights(tmp_path):
    shapes = var_vae_shapes(ch=8, z=8, V=32)
    var_sd = {k: torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, (k, s) in enumerate(shapes.items())}
    path = tmp_path / "vae_ch160v4096z32.pth"
    torch.save(var_sd, path)
    over = {"channels": 8, "latent_dim": 8, "vocab_size": 32, "norm_groups": 8}
    m = TokenizerModule("var-vae-f16", overrides=over, init_from=str(path), lpips_weight=0.0, disc_channels=8)
    m.setup("fit")
    assert torch.equal(m.tokenizer.quantizer.codebook.weight, var_sd["quantize.embedding.weight"])
    assert torch.equal(m.ema.shadow__decoder__conv_out__weight, var_sd["decoder.conv_out.weight"])
    wrong = TokenizerModule("digits", init_from=str(path), lpips_weight=0.0, disc_layers=2)
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


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # [0, 1] scale: difference 0.05 -> MSE 0.0025 -> 10·log10(400)
    assert torch.allclose(psnr(x, y), torch.full((2,), 10 * math.log10(400.0)))
    assert float(psnr(x, x)[0]) > 100


def test_ssim_properties_and_hand_computed_case():
    x = _images(3)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    # constant images: σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1) on the [0, 1] scale
    a, b, c1 = 0.5, 0.25, 0.01**2
    got = ssim(torch.full((1, 3, 16, 16), 2 * a - 1), torch.full((1, 3, 16, 16), 2 * b - 1))
    assert torch.allclose(got, torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)]), atol=1e-6)
    assert float(ssim(x, _images(3, seed=1)).max()) < 0.2  # unrelated noise


@pytest.mark.parametrize("size", [16, 32])
def test_ssim_matches_torchmetrics(size):
    tm = pytest.importorskip("torchmetrics.functional.image")
    x = _images(4)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear") if size != 16 else x
    y = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    # torchmetrics averages its map over reflect-padded borders too; Wang et al. (and skimage) keep only the
    # windows inside the image, which is its map without the 5-pixel border.
    _, full = tm.structural_similarity_index_measure((y + 1) / 2, (x + 1) / 2, data_range=1.0, return_full_image=True)
    ref = full[..., 5:-5, 5:-5].mean((1, 2, 3))
    assert torch.allclose(ssim(y, x), ref, atol=1e-5), (ssim(y, x), ref)


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


def _trainer(tmp_path: Path, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0, limit_val_batches=2,
    )  # fmt: skip


def test_save_load_and_the_checkpoint_contract(tmp_path, digits_root):
    m = _module(disc_start=1, restart_every=2)
    trainer = _trainer(tmp_path, max_steps=6)
    trainer.fit(m, datamodule=ShardDataModule(str(digits_root), batch_size=16))
    assert trainer.global_step == 6 and m.iteration == 3, "two optimizer steps per iteration"
    path = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(path)
    img = _images(6)
    m.eval()
    raw = m.tokenizer.reconstruct(img)
    with m.ema.swapped(m.tokenizer):
        ema = m.tokenizer.reconstruct(img)
    assert not torch.equal(raw, ema)

    loaded = TokenizerModule.load_from_checkpoint(path).eval()
    assert loaded.iteration == 3 and int(loaded.train_iter) == 3
    assert torch.equal(loaded.tokenizer.reconstruct(img), raw)
    with loaded.ema.swapped(loaded.tokenizer):
        assert torch.equal(loaded.tokenizer.reconstruct(img), ema)

    # The contract other stages read: preset + overrides rebuild the tokenizer, EMA shadows are its weights.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp, sd = ckpt["hyper_parameters"], ckpt["state_dict"]
    tok = build_tokenizer(hp["preset"], **(hp["overrides"] or {}))
    state = {k.removeprefix("tokenizer."): v for k, v in sd.items() if k.startswith("tokenizer.")}
    state.update({n: sd["ema.shadow__" + n.replace(".", "__")] for n, _ in tok.named_parameters()})
    tok.load_state_dict(state, strict=True)
    assert torch.equal(tok.eval().reconstruct(img), ema)


# ------------------------------------------------------------------------------------------------
# Through the CLI (real datamodule, run folder, TensorBoard) and resume
# ------------------------------------------------------------------------------------------------


def _config(tmp_path: Path, digits_root: Path, model: dict | None = None, **trainer) -> Path:
    cfg = {
        "model": {"class_path": MODULE, "init_args": {"preset": "digits", **SMALL_ARGS, "disc_start": 2, "restart_every": 2,
                                                       "overrides": {**SMALL, "scale_dropout": 0.5}, **(model or {})}},
        "data": {"root": str(digits_root), "batch_size": 16},
        "trainer": {"accelerator": "cpu", "max_steps": 8, "val_check_interval": 2, "check_val_every_n_epoch": None,
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
    # uninterrupted: 4 iterations = 8 optimizer steps, crossing disc_start=2, restarts every 2 iterations
    ref_cfg = _config(tmp_path / "ref", digits_root)
    main(["fit", "--config", str(ref_cfg)])
    ref_dir = tmp_path / "ref" / "runs" / "demo" / "tokenizer" / "version_0"
    ref = _ckpt(ref_dir)
    assert ref["global_step"] == 8 and int(ref["state_dict"]["train_iter"]) == 4
    assert ref["hyper_parameters"]["preset"] == "digits" and ref["hyper_parameters"]["image_size"] == 16
    logs = _scalars(ref_dir)
    for key in ("train/l1", "train/l2", "train/vq", "train/g_adv", "train/adaptive_weight", "train/loss_d",
                "train/restarted_codes", "lr/tokenizer", "lr/discriminator", "val/psnr", "val/ssim", "val/l2",
                "val/vq", "val_usage/1x1/of_possible", "val_usage/8x8/perplexity", "val_usage/min_of_possible",
                "val/reconstruction"):  # fmt: skip
        assert key in logs, key
    assert [s for s, _ in logs["val/reconstruction"]] == [2, 4]
    assert logs["train/adaptive_weight"][0][1] == 0 and logs["train/adaptive_weight"][-1][1] > 0

    # interrupted after 2 iterations, resumed to 4 in the same run folder
    cfg = _config(tmp_path / "res", digits_root, max_steps=4)
    main(["fit", "--config", str(cfg)])
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "8", "--ckpt_path", "last"])
    got = _ckpt(tmp_path / "res" / "runs" / "demo" / "tokenizer" / "version_0")
    assert got["global_step"] == 8 and int(got["state_dict"]["train_iter"]) == 4
    diff = [k for k in ref["state_dict"] if not torch.equal(ref["state_dict"][k], got["state_dict"][k])]
    assert diff == [], f"resumed run differs from the uninterrupted one in {diff[:5]}"


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
    cfg = _config(tmp_path, digits_root, model={"disc_start": disc_start}, devices=2, strategy="ddp", callbacks=callbacks)
    srdd = Path(sys.executable).with_name("srdd")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(srdd), "fit", "--config", str(cfg), "--data.num_workers", "1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo" / "tokenizer" / "version_0"
    ckpt = _ckpt(run_dir)
    assert ckpt["global_step"] == 8 and int(ckpt["state_dict"]["train_iter"]) == 4
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
    assert out["trainer"]["max_steps"] % 2 == 0, "two optimizer steps per iteration"
