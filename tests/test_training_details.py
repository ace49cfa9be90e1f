"""Training details that a run would silently lose (issue 9's list: each change below once survived the tests).

1 LPIPS input normalisation · 2 per-scale loss/accuracy logging · 3 gradient clipping · 4 label smoothing ·
5 EMA weights in validation · 6 SSIM (not PSNR) · 7 optimizer state of restarted codes · 8 DropPath's 1/(1−p) ·
9 data.flip — and the hidden state: micro-batches of one optimizer step draw different dropout masks.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from srdd_lightning.callbacks.ema import EMA
from srdd_lightning.data import ShardDataModule
from srdd_lightning.data.stream import decode_image
from srdd_lightning.utils.images import from_uint8
from srdd_lightning.loading import load_stage
from srdd_lightning.models.transformer import DropPath
from srdd_lightning.stages.generator import SRDDModule, token_cross_entropy, var_loss
from srdd_lightning.stages.tokenizer import GANLosses
from test_generator_stage import SMALL, save_tokenizer_module_ckpt
from test_tokenizer_blocks import reference_lpips
from test_tokenizer_stage import _images, _module


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "runs" / "tok"
    save_tokenizer_module_ckpt(root / "version_0" / "checkpoints" / "last.ckpt")
    return root


def _generator(tok_run: Path, **kw) -> SRDDModule:
    torch.manual_seed(0)
    return SRDDModule(str(tok_run), num_classes=10, image_size=16, architecture=dict(SMALL), **kw)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=1,
                val_check_interval=2, check_val_every_n_epoch=None)  # fmt: skip
    return pl.Trainer(**{**args, **kw})


def _batch(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


# ---- 1. LPIPS sees its inputs normalised the way LPIPS defines it ---------------------------------------------


def test_tokenizer_lpips_term_is_lpips_of_images_in_minus_one_one(lpips_files):
    vgg, _ = lpips_files
    m = _module(loss={"lpips": 1.0, "lpips_vgg_path": str(vgg)})
    x, y = _images(3, seed=0), _images(3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(m._perceptual(x, y), reference_lpips(vgg, x, y), rtol=1e-4, atol=1e-6)


# ---- 2. per-scale loss and accuracy are logged, under the scale's size ---------------------------------------


def test_per_scale_loss_and_accuracy_are_logged(tok_run):
    m = _generator(tok_run)
    logged: dict[str, torch.Tensor] = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)
    m.log_dict = lambda d, **kw: logged.update(d)
    batch = _batch()
    m.validation_step(batch, 0)
    ce_BL, logits_BLV, gt_BL = m._forward_loss(batch, None)
    start = 0
    for pn in m.patch_nums:
        s = slice(start, start + pn * pn)
        start += pn * pn
        torch.testing.assert_close(logged[f"val/loss_{pn}x{pn}"], ce_BL[:, s].mean())
        torch.testing.assert_close(logged[f"val/acc_{pn}x{pn}"], (logits_BLV.argmax(-1) == gt_BL)[:, s].float().mean())
    torch.testing.assert_close(logged["val/loss"], var_loss(ce_BL))


# ---- 3. gradient clipping ---------------------------------------------------------------------------------------


def test_generator_clips_the_global_gradient_norm(tok_run):
    m = _generator(tok_run, optim={"grad_clip": 0.5})
    m.log = lambda *a, **k: None
    params = list(m.generator.parameters())
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    optimizer = torch.optim.AdamW(params)
    m.configure_gradient_clipping(optimizer)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    assert norm == pytest.approx(0.5, rel=1e-4)


def test_tokenizer_clips_both_networks(tmp_path, digits_root, monkeypatch):
    m = _module(optim={"lr": 1e-3, "grad_clip": 0.25})
    calls = []
    monkeypatch.setattr(m, "clip_gradients", lambda opt, gradient_clip_val, gradient_clip_algorithm: calls.append(
        (len(opt.param_groups[0]["params"]), gradient_clip_val, gradient_clip_algorithm)))  # fmt: skip
    _trainer(tmp_path, max_steps=1).fit(m, datamodule=ShardDataModule(str(digits_root), batch_size=8))
    n_tok = len(m.configure_optimizers()[0].param_groups[0]["params"])
    assert [c[1:] for c in calls] == [(0.25, "norm"), (0.25, "norm")] and calls[0][0] == n_tok


# ---- 4. label smoothing ---------------------------------------------------------------------------------------------


def test_label_smoothing_enters_the_training_loss(tok_run):
    m = _generator(tok_run, label_smoothing=0.2).eval()
    batch = _batch()
    with torch.no_grad():
        ce_BL, logits_BLV, gt_BL = m._forward_loss(batch, None)
    B, L, V = logits_BLV.shape
    smooth = F.cross_entropy(logits_BLV.reshape(B * L, V), gt_BL.reshape(-1), reduction="none", label_smoothing=0.2)
    torch.testing.assert_close(ce_BL, smooth.view(B, L))
    assert not torch.allclose(ce_BL, token_cross_entropy(logits_BLV, gt_BL, 0.0))


# ---- 5. validation runs on the EMA weights ---------------------------------------------------------------------------


def test_validation_uses_the_ema_weights(tmp_path, digits_root, tok_run):
    m = _generator(tok_run, optim={"lr": 1e-2})
    seen = {}

    class Grab(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen["loss"] = float(trainer.callback_metrics["val/loss"])

    trainer = _trainer(tmp_path, max_steps=4, val_check_interval=4, callbacks=[EMA(decay=0.5, warmup=False), Grab()])
    dm = ShardDataModule(str(digits_root), batch_size=16, val_batch_size=16)
    trainer.fit(m, datamodule=dm)
    path = tmp_path / "g.ckpt"
    trainer.save_checkpoint(path)
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)  # 8-bit images made float, as in a step
    losses = {}
    for ema in (True, False):
        stage = load_stage(path, ema=ema)
        with torch.no_grad():
            losses[ema] = float(var_loss(stage._forward_loss(batch, None)[0]))
    assert seen["loss"] == pytest.approx(losses[True], rel=1e-5)
    assert abs(losses[True] - losses[False]) > 1e-4  # the two weight sets differ: the check can tell them apart


# ---- 6. SSIM and PSNR are what they say ------------------------------------------------------------------------------


def test_tokenizer_validation_reports_ssim_and_psnr(tmp_path, digits_root):
    m = _module()
    trainer = _trainer(tmp_path)
    dm = ShardDataModule(str(digits_root), batch_size=16, val_batch_size=16)
    metrics = trainer.validate(m, datamodule=dm, verbose=False)[0]
    img = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)[0]  # 8-bit images made float, as in a step
    with torch.no_grad():
        q = m.tokenizer.quantizer(m.tokenizer.encode(img))
        rec = m.tokenizer.decode(q.f_hat).clamp(-1, 1)
    x01, y01 = (rec + 1) / 2, (img + 1) / 2
    assert metrics["val/ssim"] == pytest.approx(float(structural_similarity_index_measure(x01, y01, data_range=1.0)), rel=1e-5)
    assert metrics["val/psnr"] == pytest.approx(
        float(peak_signal_noise_ratio(x01, y01, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()), rel=1e-5)
    assert metrics["val/num_images"] == 16


# ---- 7. a restarted code starts with fresh optimizer moments ----------------------------------------------------------


def test_restarted_codes_reset_their_adam_moments(tmp_path):
    m = _module(restarts={"every": 1})
    m.trainer = _trainer(tmp_path)
    opt_g = m.configure_optimizers()[0]
    for p in m.tokenizer.parameters():
        p.grad = torch.randn_like(p)
    opt_g.step()
    weight = m.tokenizer.quantizer.codebook.weight
    before = {k: v.clone() for k, v in opt_g.state[weight].items() if torch.is_tensor(v) and v.shape == weight.shape}
    assert before and all(v.abs().sum() > 0 for v in before.values())
    K = len(m.patch_nums)
    tokens = [torch.randint(0, 5, (2, pn, pn)) for pn in m.patch_nums]  # only codes 0..4 are hit
    f = torch.randn(2, m.tokenizer.latent_dim, 8, 8)
    out = GANLosses(torch.zeros(()), torch.zeros(()), f, tokens)
    w_before = weight.detach().clone()
    n = int(m._track_and_restart_codes(out, iteration=0, opt_g=opt_g))
    dead = torch.ones(weight.shape[0], dtype=torch.bool)
    dead[:5] = False
    assert n == int(dead.sum()) and K == 6
    for name, v in opt_g.state[weight].items():
        if name in before:
            assert (v[dead] == 0).all(), name
            assert torch.equal(v[~dead], before[name][~dead]), name
    assert not torch.equal(weight[dead], w_before[dead]) and torch.equal(weight[~dead], w_before[~dead])


# ---- 8. DropPath rescales what it keeps ------------------------------------------------------------------------------


def test_drop_path_keeps_the_expectation():
    dp = DropPath(0.25).train()
    x = torch.ones(4000, 3)
    for u_B in (torch.rand(4000, generator=torch.Generator().manual_seed(0)), None):  # the caller's draws, global RNG
        y = dp(x, u_B)
        assert torch.allclose(y.unique(), torch.tensor([0.0, 1 / 0.75]))
        assert y.mean().item() == pytest.approx(1.0, abs=0.03)
    assert torch.equal(dp.eval()(x), x)


# ---- 9. data.flip reaches the training stream ------------------------------------------------------------------------


def test_data_flip_mirrors_training_images(digits_root):
    dm = ShardDataModule(str(digits_root), batch_size=8, flip=True, seed=3)
    stream = dm.train_stream()
    raw = list(islice(stream.raw_samples(0, 0), 64))
    imgs = [from_uint8(img) for img, _ in islice(stream.iterate(worker=0), 64)]  # the stream sends 8-bit pixels
    flipped = [s.flip for s in raw]
    assert 10 < sum(flipped) < 54
    for s, img in zip(raw, imgs):
        plain = decode_image(s.data[0], dm.resolution, False)
        assert torch.equal(img, plain.flip(-1) if s.flip else plain)
    assert any(s.flip and not torch.equal(img, decode_image(s.data[0], dm.resolution, False)) for s, img in zip(raw, imgs))
    assert not any(s.flip for s in islice(ShardDataModule(str(digits_root), flip=False).train_stream().raw_samples(0, 0), 64))


# ---- hidden state: micro-batches of one optimizer step draw their own masks -------------------------------------------


def test_micro_batches_of_one_step_draw_different_masks(tmp_path, digits_root, tok_run):
    m = _generator(tok_run, cond_drop=0.5)
    masks = []
    real = m.generator.drop_labels

    def spy(label_B, p=None, generator=None):
        out = real(label_B, p=p, generator=generator)
        masks.append((m.global_step, out == m.generator.null_class))
        return out

    m.generator.drop_labels = spy
    _trainer(tmp_path, max_steps=2, accumulate_grad_batches=2).fit(m, datamodule=ShardDataModule(str(digits_root), batch_size=16))
    assert [s for s, _ in masks] == [0, 0, 1, 1]
    assert not torch.equal(masks[0][1], masks[1][1]), "two micro-batches of step 0 shared one dropout mask"
    # the same (step, micro-batch) draws the same: a resumed run repeats the uninterrupted one
    a = torch.rand(8, generator=m._step_rng(5))
    assert torch.equal(a, torch.rand(8, generator=m._step_rng(5))) and not torch.equal(a, torch.rand(8, generator=m._step_rng(6)))
