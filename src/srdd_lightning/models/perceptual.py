"""LPIPS (Zhang et al. 2018, VGG16) as torchmetrics implements it, with the VGG backbone from a local file.

torchmetrics ships LPIPS' heads but downloads the VGG16 backbone; nothing may download here, so this builds its
``_NoTrainLpips`` with a random backbone and loads torchvision's ``vgg16-397923af.pth`` from ``lpips_vgg_path``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

VGG_FILE = "vgg16-397923af.pth"
VGG_OPTION = "model.init_args.loss.lpips_vgg_path"
VGG_ENV = "SRDD_LPIPS_VGG_PATH"
# torchmetrics' Vgg16 splits VGG16's ``features`` after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)


def resolve_vgg_weights(path: str | os.PathLike | None) -> Path:
    """The VGG16 weights file from the option or the environment; the error names the file and the option."""
    raw = path if path is not None else os.environ.get(VGG_ENV)
    if raw is None:
        raise FileNotFoundError(f"LPIPS needs torchvision's VGG16 weights ({VGG_FILE}): set {VGG_OPTION} (or the "
                                f"environment variable {VGG_ENV}); nothing is downloaded")  # fmt: skip
    p = Path(raw).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"LPIPS VGG16 weights not found: {str(p)!r} (set by {VGG_OPTION} or {VGG_ENV}; "
                                f"the file is torchvision's {VGG_FILE})")  # fmt: skip
    return p


def _backbone_state(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """torchvision ``features.<i>.<weight|bias>`` -> torchmetrics ``slice<k>.<i>.<weight|bias>``."""
    out, bad = {}, []
    for key, value in sd.items():
        m = re.fullmatch(r"(?:features\.)?(\d+)\.(weight|bias)", key)
        if m and int(m[1]) < _SLICE_ENDS[-1]:
            k = next(j for j, end in enumerate(_SLICE_ENDS) if int(m[1]) < end) + 1
            out[f"slice{k}.{m[1]}.{m[2]}"] = value
        elif not key.startswith("classifier.") and not (m and int(m[1]) >= _SLICE_ENDS[-1]):
            bad.append(key)
    if bad:
        raise ValueError(f"{str(path)!r} is not a torchvision VGG16 state dict: unexpected keys {bad[:8]} ({VGG_OPTION})")
    return out


def build_lpips(lpips_vgg_path: str | os.PathLike | None = None) -> nn.Module:
    """torchmetrics' LPIPS-VGG network, frozen, in eval mode: ``net(x, y)`` of images in [-1, 1] -> (B, 1, 1, 1)."""
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    path = resolve_vgg_weights(lpips_vgg_path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{str(path)!r} ({VGG_OPTION}) does not hold a state dict (got {type(sd).__name__})")
    net = _NoTrainLpips(pretrained=True, net="vgg", pnet_rand=True)  # the heads from torchmetrics, no download
    net.net.load_state_dict(_backbone_state(sd, path), strict=True)
    return net.eval().requires_grad_(False)

