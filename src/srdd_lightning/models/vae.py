"""Convolutional encoder and decoder of the stage-1 tokenizer, level by level VAR's ``vae_ch160v4096z32.pth``.

GroupNorm + SiLU ResNet blocks, single-head attention only at the lowest resolution, a Res–Attn–Res middle block,
stride-2 convs down, nearest×2 + conv up; the decoder has ``num_res_blocks + 1`` blocks per level and no output
non-linearity (callers clamp to [-1, 1]).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---- Blocks ----------------------------------------------------------------------------------


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Groups for GroupNorm: ``max_groups`` when it divides ``channels``, else the largest divisor below it
    (VAR's widths are all multiples of 32; small CPU presets use widths such as 16 or 48)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(channels, max_groups), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1×1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, max_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_ch, max_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, max_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions: x + proj(softmax(q kᵀ/√C) v)."""

    def __init__(self, ch: int, max_groups: int = 32):
        super().__init__()
        self.norm = group_norm(ch, max_groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # one 1×1 conv, channels ordered [q | k | v]
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).transpose(-1, -2).unbind(1)  # each (B, hw, C)
        out_BLC = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x_BChw + self.proj(out_BLC.transpose(1, 2).reshape(B, C, h, w))


class Resample(nn.Module):
    """Halve the resolution (zero-pad right/bottom by one, stride-2 3×3 conv) or double it (nearest ×2, 3×3 conv)."""

    def __init__(self, ch: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0) if down else nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        if self.down:
            return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


def mid_block(ch: int, dropout: float, max_groups: int) -> nn.Sequential:
    """Res – Attn – Res at the lowest resolution."""
    return nn.Sequential(OrderedDict(res1=ResnetBlock(ch, ch, dropout, max_groups), attn=AttnBlock(ch, max_groups),
                                     res2=ResnetBlock(ch, ch, dropout, max_groups)))


class Level(nn.Module):
    """One resolution level: ResNet blocks, each followed by attention at the lowest level, then a resampler."""

    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, use_attn: bool, resample: nn.Module | None, dropout: float, max_groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout, max_groups) for i in range(n_blocks))
        self.attns = nn.ModuleList(AttnBlock(out_ch, max_groups) for _ in range(n_blocks)) if use_attn else nn.ModuleList()
        self.resample = resample  # None at the last level

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x_BChw = block(x_BChw)
            if len(self.attns):
                x_BChw = self.attns[i](x_BChw)
        return x_BChw if self.resample is None else self.resample(x_BChw)


# ---- Encoder / Decoder -------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, in_ch, H, W) -> latent (B, z_ch, H/2^(n-1), W/2^(n-1)) with n = len(channel_mults)."""

    def __init__(self, *, channels: int, channel_mults: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, dropout: float = 0.0, max_groups: int = 32):
        super().__init__()
        widths = [channels * m for m in channel_mults]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.levels = nn.ModuleList()
        ch = channels
        for i, out_ch in enumerate(widths):
            last = i == len(widths) - 1
            self.levels.append(Level(ch, out_ch, num_res_blocks, last, None if last else Resample(out_ch, down=True), dropout, max_groups))
            ch = out_ch
        self.mid = mid_block(ch, dropout, max_groups)
        self.norm_out = group_norm(ch, max_groups)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_B3HW)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (B, z_ch, h, w) -> image (B, out_ch, h·2^(n-1), w·2^(n-1)); ``levels`` run lowest resolution first."""

    def __init__(self, *, channels: int, channel_mults: Sequence[int], num_res_blocks: int, z_channels: int,
                 out_channels: int = 3, dropout: float = 0.0, max_groups: int = 32):
        super().__init__()
        widths = [channels * m for m in reversed(channel_mults)]  # processing order: coarse -> fine
        ch = widths[0]
        self.conv_in = nn.Conv2d(z_channels, ch, 3, padding=1)
        self.mid = mid_block(ch, dropout, max_groups)
        self.levels = nn.ModuleList()
        for i, out_ch in enumerate(widths):
            last = i == len(widths) - 1
            # num_res_blocks + 1 blocks per level, as in VAR / LDM.
            self.levels.append(Level(ch, out_ch, num_res_blocks + 1, i == 0, None if last else Resample(out_ch, down=False), dropout, max_groups))
            ch = out_ch
        self.norm_out = group_norm(ch, max_groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv: where the adaptive GAN weight measures gradient norms."""
        return self.conv_out.weight

    def forward(self, f_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(f_BChw))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
