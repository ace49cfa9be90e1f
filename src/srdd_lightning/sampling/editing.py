"""Zero-shot editing: build the :class:`EditSpec` that forces a reference image's tokens where they are known.

Two mask conventions, kept apart by name: a user's *pixel mask* ``mask_B1HW`` marks the region **to generate**
with 1 (white in a mask image, the usual inpainting convention); ``EditSpec.mask_Bhw`` is a latent *keep mask*,
1 = keep the reference token. A latent cell keeps the reference only when none of its pixels is to be generated
(the hole grows to whole cells, so no unknown pixel leaks in); the sampler then area-resizes the keep mask to each
scale's pn×pn grid and keeps a cell where >= 0.5 of it is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from srdd_lightning.models.tokenizer import MultiScaleTokenizer
from srdd_lightning.sampling.config import EditSpec
from srdd_lightning.sampling.sampler import eval_mode

Box = tuple[int, int, int, int]  # (top, left, bottom, right) in pixels, bottom/right exclusive


# ---- masks ------------------------------------------------------------------------------------------


def box_mask(size: int | tuple[int, int], box: Box, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """(batch, 1, H, W) float mask, 1 inside ``box`` = (top, left, bottom, right) pixels (bottom/right exclusive)."""
    H, W = (size, size) if isinstance(size, int) else size
    top, left, bottom, right = (int(v) for v in box)
    if not (0 <= top < bottom <= H and 0 <= left < right <= W):
        raise ValueError(f"box (top, left, bottom, right) = {box} must be a non-empty box inside the {H}x{W} image")
    mask = torch.zeros(batch, 1, H, W, device=device)
    mask[:, :, top:bottom, left:right] = 1.0
    return mask


def keep_mask_from_pixels(generate_B1HW: torch.Tensor, latent_size: int) -> torch.Tensor:
    """Pixel mask (1 = generate) -> latent keep mask (B, h, w), 1 where no pixel of the cell is generated."""
    if generate_B1HW.dim() == 3:
        generate_B1HW = generate_B1HW.unsqueeze(1)
    if generate_B1HW.dim() != 4 or generate_B1HW.shape[1] != 1:
        raise ValueError(f"a pixel mask must be (B, 1, H, W) or (B, H, W), got {tuple(generate_B1HW.shape)}")
    generated = F.interpolate(generate_B1HW.float().clamp(0, 1), size=(latent_size, latent_size), mode="area")
    return (generated[:, 0] <= 0).float()


def load_mask(path: str | Path, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """A mask image as (1, 1, H, W) float, 1 where white (gray >= 128: to generate); ``size`` resizes it (nearest)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask image {path} does not exist")
    img = Image.open(path).convert("L")
    if size is not None:
        H, W = (size, size) if isinstance(size, int) else size
        img = img.resize((W, H), Image.NEAREST)
    gray = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width)
    return (gray >= 128).float()[None, None]


# ---- builders ---------------------------------------------------------------------------------------


def _tokens(tokenizer: MultiScaleTokenizer, image_B3HW: torch.Tensor, patch_nums: Sequence[int] | None) -> list[torch.Tensor]:
    device = next(tokenizer.parameters()).device
    with eval_mode(tokenizer):
        return tokenizer.img_to_tokens(image_B3HW.to(device), patch_nums)


def _keep_spec(tokenizer: MultiScaleTokenizer, image_B3HW, generate_B1HW, patch_nums: Sequence[int] | None) -> EditSpec:
    """The image's tokens, kept where the pixel mask ``generate_B1HW`` has no pixel to generate."""
    tokens = _tokens(tokenizer, image_B3HW, patch_nums)
    return EditSpec(tokens, keep_mask_from_pixels(generate_B1HW.to(tokens[0].device), tokenizer.latent_size))


def inpaint(tokenizer: MultiScaleTokenizer, image_B3HW: torch.Tensor, mask_B1HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> EditSpec:
    """Regenerate the region where ``mask_B1HW`` is 1 (the hole), keeping the rest of ``image_B3HW`` ([-1, 1])."""
    mask = mask_B1HW.unsqueeze(1) if mask_B1HW.dim() == 3 else mask_B1HW
    B, _, H, W = image_B3HW.shape
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B) or tuple(mask.shape[2:]) != (H, W):
        raise ValueError(f"mask must be ({B} or 1, 1, {H}, {W}) like the image, got {tuple(mask.shape)}")
    return _keep_spec(tokenizer, image_B3HW, mask, patch_nums)


def outpaint(tokenizer: MultiScaleTokenizer, image_B3HW: torch.Tensor, keep_box: Box, patch_nums: Sequence[int] | None = None) -> EditSpec:
    """Keep ``keep_box`` = (top, left, bottom, right) pixels of the image and generate everything around it."""
    return _keep_spec(tokenizer, image_B3HW, 1.0 - box_mask(tuple(image_B3HW.shape[-2:]), keep_box), patch_nums)


def super_resolution(tokenizer: MultiScaleTokenizer, low_res_B3hw: torch.Tensor, keep_scales: int | None = None,
                     patch_nums: Sequence[int] | None = None) -> EditSpec:
    """Upsample a low-resolution image (bicubic) to the tokenizer's size, tokenize it and force its coarse
    scales: by default those with pn <= the low-res image's latent size (its side / downsampling)."""
    if low_res_B3hw.dim() != 4:
        raise ValueError(f"low_res_B3hw must be (B, 3, h, w), got {tuple(low_res_B3hw.shape)}")
    pns = tuple(patch_nums) if patch_nums is not None else tuple(tokenizer.patch_nums)
    if keep_scales is None:
        lr_latent = min(low_res_B3hw.shape[-2:]) / tokenizer.downsample
        keep_scales = sum(pn <= lr_latent for pn in pns)
        if keep_scales == 0:
            raise ValueError(f"a {tuple(low_res_B3hw.shape[-2:])} image has a latent of {lr_latent:g} cells, below the "
                             f"first scale {pns[0]} of {list(pns)}: pass keep_scales explicitly")
    size = tokenizer.image_size
    up = F.interpolate(low_res_B3hw.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
    return EditSpec(_tokens(tokenizer, up, patch_nums), None, keep_scales=int(keep_scales))


def reconstruct(tokenizer: MultiScaleTokenizer, image_B3HW: torch.Tensor, n_scales: int, patch_nums: Sequence[int] | None = None) -> EditSpec:
    """SDEdit-like reconstruction: keep the first ``n_scales`` scales of the image (its state M(n)·I_0) and
    generate the rest."""
    pns = tuple(patch_nums) if patch_nums is not None else tuple(tokenizer.patch_nums)
    if not 0 <= n_scales <= len(pns):
        raise ValueError(f"n_scales must lie in [0, {len(pns)}] for the schedule {list(pns)}, got {n_scales}")
    return EditSpec(_tokens(tokenizer, image_B3HW, patch_nums), None, keep_scales=int(n_scales))


__all__ = ["Box", "box_mask", "inpaint", "keep_mask_from_pixels", "load_mask", "outpaint", "reconstruct",
           "super_resolution"]
