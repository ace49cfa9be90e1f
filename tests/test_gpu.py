"""The fast path on CUDA (``make test-gpu``): flex vs SDPA in bf16, compiled vs eager, no host sync in the training
step, FSDP + bf16-mixed training whose loss falls. Every test here needs a CUDA device; none runs on the CPU."""

from __future__ import annotations

import pytest
import torch

from srdd_lightning.models.scales import num_tokens
from srdd_lightning.models.transformer import ATTN_MODES, build_generator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PNS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's 256 px schedule: the block structure the kernels meet in practice


def _model(attn: str, depth: int = 4, width: int = 256):
    torch.manual_seed(0)
    return build_generator("tiny", attn=attn, depth=depth, width=width, num_heads=4, latent_dim=32, vocab_size=4096,
                           num_classes=10, patch_nums=PNS).cuda()  # fmt: skip


def _inputs(batch: int = 4):
    g = torch.Generator().manual_seed(1)
    label_B = torch.randint(0, 10, (batch,), generator=g).cuda()
    x_BLC = torch.randn(batch, num_tokens(PNS) - 1, 32, generator=g).cuda()
    return label_B, x_BLC


@pytest.mark.parametrize("attn", ATTN_MODES)
def test_flex_and_sdpa_agree_in_bf16_with_gradients(attn):
    """Tolerance: bf16 logits within 3e-2 absolute (bf16 has 8 mantissa bits; the two kernels sum in other orders);
    fp32 logits within 1e-4 and the gradients within 1e-3 relative."""
    results = {}
    for backend in ("sdpa", "flex"):
        model = _model(attn).train()
        model.config.drop_path = 0.0
        for b in model.blocks:
            b.drop_path.p = 0.0
        model.attention = backend
        label_B, x_BLC = _inputs()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(label_B, x_BLC)
        fp32 = model(label_B, x_BLC)
        fp32.square().mean().backward()
        results[backend] = (bf16.detach(), fp32.detach(), model.blocks[0].attn.qkv.weight.grad.clone())
    (b1, f1, g1), (b2, f2, g2) = results["sdpa"], results["flex"]
    torch.testing.assert_close(b2, b1, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(f2, f1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-3)


def test_compiled_and_eager_logits_agree():
    model = _model("markov").eval()
    label_B, x_BLC = _inputs()
    with torch.no_grad():
        eager = model(label_B, x_BLC)
        model.compile(dynamic=False)
        compiled = model(label_B, x_BLC)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)


def test_training_step_has_no_host_sync(tmp_path):
    """Forward, loss, backward, clipping and the fused AdamW step of the generator stage under
    ``torch.cuda.set_sync_debug_mode("error")``: any .item(), bincount, pageable copy or host-side check raises."""
    from test_generator_stage import save_tokenizer_module_ckpt

    from srdd_lightning.stages.generator import SRDDModule, var_loss

    path = tmp_path / "tok.ckpt"
    save_tokenizer_module_ckpt(path)
    m = SRDDModule(str(path), num_classes=10, image_size=16, architecture={"depth": 2, "width": 64, "num_heads": 2,
                   "drop_path": 0.1}).cuda()  # fmt: skip
    opt = torch.optim.AdamW(m.generator.parameters(), lr=1e-4, fused=True)
    img = torch.rand(8, 3, 16, 16, device="cuda") * 2 - 1
    label = torch.randint(0, 10, (8,), device="cuda")
    rng = torch.Generator().manual_seed(0)
    m._forward_loss((img, label), rng)  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            ce_BL, logits_BLV, gt_BL = m._forward_loss((img, label), rng)
            var_loss(ce_BL).backward()
            m._metrics("train", ce_BL, logits_BLV, gt_BL)
            torch.nn.utils.clip_grad_norm_(m.generator.parameters(), 2.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fsdp_bf16_trains_generator_fsdp_and_the_loss_falls(tmp_path, digits_root):
    import lightning.pytorch as pl
    from test_generator_stage import save_tokenizer_module_ckpt

    from srdd_lightning.callbacks.ema import ShardedEMA
    from srdd_lightning.data.datamodule import ShardDataModule
    from srdd_lightning.stages.generator import SRDDModule
    from srdd_lightning.strategies import GeneratorFSDP

    path = tmp_path / "tok.ckpt"
    save_tokenizer_module_ckpt(path)

    class Losses(pl.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    losses = Losses()
    m = SRDDModule(str(path), num_classes=10, image_size=16, architecture={"depth": 2, "width": 128, "num_heads": 2},
                   optim={"lr": 3e-3, "warmup_steps": 2}, attention="flex")  # fmt: skip
    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=GeneratorFSDP(sharding_strategy="SHARD_GRAD_OP"),
                         precision="bf16-mixed", max_steps=40, logger=False, enable_checkpointing=False,
                         limit_val_batches=0, default_root_dir=tmp_path, enable_progress_bar=False,
                         callbacks=[losses, ShardedEMA(decay=0.9)])  # fmt: skip
    trainer.fit(m, datamodule=ShardDataModule(str(digits_root), batch_size=32))
    first, last = sum(losses.values[:5]) / 5, sum(losses.values[-5:]) / 5
    assert last < first - 0.3, (first, last)
