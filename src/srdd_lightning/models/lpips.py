"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, from local weight files only.

Two files, never downloaded:
- ``lpips_vgg_path`` (option ``model.init_args.lpips_vgg_path``, env ``SRDD_LPIPS_VGG_PATH``): torchvision's
  ImageNet VGG16 state dict (``vgg16-397923af.pth``; ``features.*`` is used, ``classifier.*`` ignored).
- ``lpips_heads_path`` (option ``model.init_args.lpips_heads_path``, env ``SRDD_LPIPS_HEADS_PATH``): the
  standard LPIPS linear heads ``vgg.pth`` (v0.1; keys ``lin{0..4}.model.1.weight`` of shape (1, C, 1, 1)).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

VGG_OPTION, HEADS_OPTION = "model.init_args.lpips_vgg_path", "model.init_args.lpips_heads_path"
VGG_ENV, HEADS_ENV = "SRDD_LPIPS_VGG_PATH", "SRDD_LPIPS_HEADS_PATH"

# VGG16 ``features`` indices: the five slices end after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)
FEATURE_CHANNELS = (64, 128, 256, 512, 512)


def _resolve(path: str | os.PathLike | None, option: str, env: str, what: str) -> Path:
    raw = path if path is not None else os.environ.get(env)
    if raw is None:
        raise FileNotFoundError(f"no file given for the LPIPS {what}: set `{option}` (or the environment variable {env}); nothing is downloaded")
    p = Path(raw).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"LPIPS {what} file not found: {str(p)!r} (set by `{option}` or {env})")
    return p


def _load(p: Path) -> Mapping[str, torch.Tensor]:
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{str(p)!r} does not hold a state dict (got {type(sd).__name__})")
    return sd


class LPIPS(nn.Module):
    """d(x, y) = Σ_l mean_hw ‖w_l ⊙ (n(φ_l(x)) − n(φ_l(y)))‖², n = unit-normalise over channels; returns (B,).

    Inputs are images in [-1, 1]. All parameters are frozen; gradients flow to the inputs only.
    """

    def __init__(self, lpips_vgg_path: str | os.PathLike | None = None, lpips_heads_path: str | os.PathLike | None = None):
        super().__init__()
        vgg_file = _resolve(lpips_vgg_path, VGG_OPTION, VGG_ENV, "VGG16 weights (torchvision vgg16-397923af.pth)")
        heads_file = _resolve(lpips_heads_path, HEADS_OPTION, HEADS_ENV, "linear heads (LPIPS vgg.pth)")
        # torchvision's architecture, built on the meta device (no random init of the unused 120 M classifier).
        with torch.device("meta"):
            features = torchvision.models.vgg16(weights=None).features[: _SLICE_ENDS[-1]]
        features = features.to_empty(device="cpu")
        features.load_state_dict(self._vgg_features(_load(vgg_file), vgg_file), strict=True)
        starts = (0, *_SLICE_ENDS[:-1])
        self.slices = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in zip(starts, _SLICE_ENDS))
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in FEATURE_CHANNELS)
        self.heads.load_state_dict(self._head_weights(_load(heads_file), heads_file), strict=True)
        # LPIPS' input scaling: ImageNet statistics expressed for inputs in [-1, 1].
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False  # slice outputs are reused; keep them intact
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _vgg_features(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        out, bad = {}, []
        for k, v in sd.items():
            m = re.fullmatch(r"(?:features\.)?(\d+)\.(weight|bias)", k)
            if m and int(m[1]) < _SLICE_ENDS[-1]:
                out[f"{m[1]}.{m[2]}"] = v
            elif not k.startswith("classifier."):
                bad.append(k)
        if bad:
            raise ValueError(f"{str(path)!r} is not a torchvision VGG16 state dict: unexpected keys {bad[:8]} (`{VGG_OPTION}`)")
        return out

    @staticmethod
    def _head_weights(sd: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in sd.items():
            m = re.fullmatch(r"lin(\d)\.model\.[01]\.weight", k)
            if m:
                out[f"{m[1]}.weight"] = v
        if sorted(out) != [f"{i}.weight" for i in range(5)]:
            raise ValueError(f"{str(path)!r} is not an LPIPS VGG heads file: expected lin0..lin4.model.1.weight, got {sorted(sd)[:8]} (`{HEADS_OPTION}`)")
        return out

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        if x_B3HW.shape != y_B3HW.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x_B3HW.shape)} vs {tuple(y_B3HW.shape)}")
        B = x_B3HW.shape[0]
        h = (torch.cat([x_B3HW, y_B3HW]) - self.shift) / self.scale  # one VGG pass for both
        dist_B = h.new_zeros(B)
        for sl, head in zip(self.slices, self.heads):
            h = sl(h)
            fx, fy = F.normalize(h[:B], dim=1, eps=1e-10), F.normalize(h[B:], dim=1, eps=1e-10)
            dist_B = dist_B + head((fx - fy).square()).mean(dim=(1, 2, 3))
        return dist_B
