"""Helpers shared by several test modules (imported as ``helpers``: pytest puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import torch


def randomize_weights(model: torch.nn.Module, seed: int = 1, std: float = 0.3, head_gain: float = 1.0) -> None:
    """Replace VAR's near-identity init (gates ~1e-5) so that attention visibly shapes peaked logits.

    ``head_gain`` scales the output projection on top, for tests that need confident (low-entropy) predictions.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("log_temp"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        if head_gain != 1.0:
            model.head.out.weight.mul_(head_gain)
