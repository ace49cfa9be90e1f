"""Exponential moving average of a model's weights, checkpointed with the LightningModule that holds it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies of ``model``'s floating-point parameters, updated as ``ema = d * ema + (1 - d) * param``.

    The shadows are buffers, so they travel with ``state_dict`` (checkpoints) and ``.to(device)``.
    With ``warmup`` the decay ramps as ``min(decay, (1 + n) / (10 + n))`` over the first updates,
    so early averages are not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self._names = [n for n, p in model.named_parameters() if p.dtype.is_floating_point]
        for n, p in model.named_parameters():
            if p.dtype.is_floating_point:
                self.register_buffer(self._key(n), p.detach().clone().float())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _key(name: str) -> str:
        return "shadow__" + name.replace(".", "__")

    def _pairs(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        for n in self._names:
            yield getattr(self, self._key(n)), params[n]

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        shadows, params = zip(*self._pairs(model))
        torch._foreach_lerp_(list(shadows), [p.detach().float() for p in params], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for s, p in self._pairs(model):
            p.copy_(s.to(p.dtype))

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (for validation and sampling)."""
        backup = [p.detach().clone() for _, p in self._pairs(model)]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (_, p), b in zip(self._pairs(model), backup):
                    p.copy_(b)
