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


def user_error(capsys, argv: list[str], match: str, code: int = 2) -> str:
    """Run ``srdd <argv>`` in-process and check it fails as a user's mistake: exit ``code``, one line on stderr
    matching ``match`` (a regex), no traceback. Returns the line."""
    import re

    import pytest

    from srdd_lightning.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("srdd")]
    assert e.value.code == code, (e.value.code, err[-2000:])
    assert lines and re.search(match, lines[-1]), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[-1]
