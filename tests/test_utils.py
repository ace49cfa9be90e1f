"""EMA and image helpers."""

from __future__ import annotations

import torch
from torch import nn

from srdd_lightning.models.ema import EMA
from srdd_lightning.utils.images import from_uint8, image_grid, load_png, save_png, to_uint8


def test_ema_update_matches_formula_and_round_trips_state_dict():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for n, p in model.named_parameters():
        expected = 0.9 * start[n] + 0.1 * p.detach()
        assert torch.allclose(getattr(ema, EMA._key(n)), expected)
    # the shadows are checkpointed: a fresh EMA loaded from the state dict has the same averages
    other = EMA(nn.Linear(3, 2), decay=0.9, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert int(other.num_updates) == 1
    assert torch.equal(other.shadow__weight, ema.shadow__weight)


def test_ema_swapped_restores_training_weights():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.mul_(3.0)
    trained = model.weight.detach().clone()
    with ema.swapped(model):
        assert torch.equal(model.weight, ema.shadow__weight)
    assert torch.equal(model.weight, trained)


def test_ema_warmup_ramps_decay():
    ema = EMA(nn.Linear(1, 1), decay=0.999, warmup=True)
    assert abs(ema.current_decay() - 0.1) < 1e-9  # (1 + 0) / (10 + 0)
    ema.num_updates.fill_(10_000)
    assert ema.current_decay() == 0.999


def test_uint8_round_trip_and_png(tmp_path):
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(x)), x)
    p = save_png(x[0], tmp_path / "a" / "x.png")
    assert torch.equal(load_png(p), x[0]) and not list(tmp_path.glob("a/.*tmp*"))
    grid = image_grid(from_uint8(x), nrow=2, upscale=2)
    assert grid.dtype == torch.uint8 and grid.shape[1] == 10 + 4  # 2x upscaled height + padding
