"""Image conversions at the package's edges: [-1, 1] float tensors <-> uint8, grids and PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from srdd_lightning.utils.io import atomic_write


def to_uint8(img_B3HW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 in [0, 255] (the format of PNG files and feature extractors)."""
    return img_B3HW.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(img_B3HW: torch.Tensor) -> torch.Tensor:
    """8-bit pixel values (uint8, or float in [0, 255] after a resize) -> float in [-1, 1]: ``x / 127.5 - 1``."""
    return img_B3HW.float().div(127.5).sub(1)


def image_grid(img_B3HW: torch.Tensor, nrow: int | None = None, upscale: int = 1, padding: int = 2) -> torch.Tensor:
    """A ``(3, H', W')`` uint8 grid of a batch in [-1, 1]; ``upscale`` enlarges tiny images (nearest)."""
    x = img_B3HW.detach().float()
    if upscale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=upscale, mode="nearest")
    nrow = nrow or max(1, int(math.ceil(math.sqrt(x.shape[0]))))
    return to_uint8(make_grid(x, nrow=nrow, padding=padding, pad_value=-1.0))


def save_png(img_3HW_uint8: torch.Tensor, path: str | Path) -> Path:
    """Write one uint8 image atomically (temporary file + rename)."""
    image = Image.fromarray(img_3HW_uint8.permute(1, 2, 0).cpu().numpy())
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def load_png(path: str | Path) -> torch.Tensor:
    """One image file -> ``(3, H, W)`` uint8 RGB."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # np.array: a copy
