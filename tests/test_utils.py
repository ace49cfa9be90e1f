"""The EMA callback (Lightning's WeightAveraging), atomic writes, seeds and image helpers."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from srdd_lightning.callbacks.ema import EMA
from srdd_lightning.utils.images import from_uint8, image_grid, load_png, save_png, to_uint8
from srdd_lightning.utils.io import atomic_write, atomic_write_text
from srdd_lightning.utils.seeding import mix_seed


class _Linear(pl.LightningModule):
    """One linear layer trained by SGD on fixed data: its weights after every step are recorded."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 2)
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def on_train_batch_end(self, *args):
        self.seen.append({n: p.detach().clone() for n, p in self.net.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_formula_of_the_hand_written_ema_it_replaced(tmp_path, warmup):
    """ema_1 = θ_1; ema_t = d_t·ema_{t−1} + (1 − d_t)·θ_t with d_t = min(decay, (1 + n)/(10 + n)), n = updates so far."""
    m, ema = _Linear(), EMA(decay=0.9, warmup=warmup)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[ema],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(m)
    expected = dict(m.seen[0])
    for n, weights in enumerate(m.seen[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        expected = {k: d * expected[k] + (1 - d) * weights[k] for k in expected}
    for k, v in expected.items():
        torch.testing.assert_close(ema.parameter(f"net.{k}"), v)
    # the module keeps its trained weights after fit (the EMA lives in the checkpoint and the callback)
    assert torch.equal(m.net.weight, m.seen[-1]["weight"])
    with ema.swapped(m):
        torch.testing.assert_close(m.net.weight, expected["weight"])
    assert torch.equal(m.net.weight, m.seen[-1]["weight"])
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    torch.testing.assert_close(ckpt["state_dict"]["net.weight"], expected["weight"])
    assert torch.equal(ckpt["current_model_state"]["net.weight"], m.seen[-1]["weight"])


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="ema.decay"):
        EMA(decay=1.0)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "x.txt", "old")
    with pytest.raises(RuntimeError):
        atomic_write(p, lambda f: (f.write(b"partial"), (_ for _ in ()).throw(RuntimeError("disk full"))))
    assert p.read_text() == "old" and os.listdir(p.parent) == ["x.txt"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # readable by others like any file (not mkstemp's 0600)


def test_mix_seed_separates_its_parts():
    assert mix_seed(0, 1, 2) == mix_seed(0, 1, 2)
    assert len({mix_seed(0, 1, 2), mix_seed(0, 2, 1), mix_seed(0, 12), mix_seed(1, 1, 2)}) == 4
    assert 0 <= mix_seed(2**62, 5) < 2**63


def test_uint8_round_trip_and_png(tmp_path):
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(x)), x)
    p = save_png(x[0], tmp_path / "a" / "x.png")
    assert torch.equal(load_png(p), x[0]) and not list(tmp_path.glob("a/.*tmp*"))
    grid = image_grid(from_uint8(x), nrow=2, upscale=2)
    assert grid.dtype == torch.uint8 and grid.shape[1] == 10 + 4  # 2x upscaled height + padding
