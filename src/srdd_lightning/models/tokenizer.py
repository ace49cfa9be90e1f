"""The stage-1 multi-scale tokenizer: encoder -> quant_conv -> residual quantizer -> post_quant_conv -> decoder.

Presets at the bottom: ``var-vae-f16`` is VAR's released VQVAE (``models.var_import.load_var_vae``), ``-512`` /
``-1024`` the same network at 512 / 1024 px; ``digits``, ``tiny`` and ``tiny-16`` are CPU-sized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial

import torch
from torch import nn

from srdd_lightning.models.quantizer import LOOKUPS, PHI_MODES, MultiScaleResidualQuantizer, QuantizerOutput
from srdd_lightning.models.scales import VAR_PATCH_NUMS_256, VAR_PATCH_NUMS_512, VAR_PATCH_NUMS_1024, as_schedule
from srdd_lightning.models.vae import Decoder, Encoder

# ---- Config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerConfig:
    """Architecture and quantizer options of a multi-scale tokenizer (defaults: VAR's released VQVAE)."""

    image_size: int = 256
    """Side of the square training images, in pixels; must equal latent size × 2^(len(channel_mults) − 1)."""
    image_channels: int = 3
    """Channels of the images (3 for RGB)."""
    vocab_size: int = 4096
    """V: number of codes in the single codebook shared by all scales."""
    latent_dim: int = 32
    """C: channels of the latent f and of each code."""
    channels: int = 160
    """Base width of the encoder/decoder; level i has channels × channel_mults[i]."""
    channel_mults: tuple[int, ...] = (1, 1, 2, 2, 4)
    """Width multipliers per resolution level; len − 1 stride-2 stages, so downsampling = 2^(len − 1)."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (the decoder uses num_res_blocks + 1, as VAR)."""
    norm_groups: int = 32
    """GroupNorm groups (fewer, the largest divisor of the width, where a width is not divisible)."""
    dropout: float = 0.0
    """Dropout inside the ResNet blocks."""
    quant_conv_kernel: int = 3
    """Kernel of quant_conv / post_quant_conv (3 in VAR, 1 in taming/LDM)."""
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS_256
    """Trained scale schedule; strictly increasing, last entry = latent size (image_size / downsampling)."""
    phi_mode: str = "partial"
    """Phi conv blend after each scale: none | shared (one) | partial (num_phi, by relative scale position) | per_scale."""
    num_phi: int = 4
    """Number of phi convs with phi_mode='partial' (VAR: 4)."""
    phi_rho: float = 0.5
    """rho in phi(x) = (1 − rho)·x + rho·conv3×3(x)."""
    lookup: str = "l2"
    """Nearest-code rule: l2 (VAR) or cosine (l2-normalised codebook and query; an anti-collapse option)."""
    beta: float = 0.25
    """Commitment weight in the VQ loss beta·‖sg[f_hat] − f‖² + ‖f_hat − sg[f]‖²."""
    scale_dropout: float = 0.0
    """Probability that a training sample keeps only its first K_b < K scales (quantizer dropout)."""

    def __post_init__(self) -> None:
        # jsonargparse / YAML hand lists; store tuples so the config stays hashable and comparable.
        for name in ("channel_mults", "patch_nums"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("image_size", "image_channels", "vocab_size", "latent_dim", "channels", "num_res_blocks", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TokenizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"TokenizerConfig.channel_mults must be positive integers, got {list(self.channel_mults)}")
        as_schedule(self.patch_nums)
        if self.phi_mode not in PHI_MODES:
            raise ValueError(f"TokenizerConfig.phi_mode must be one of {PHI_MODES}, got {self.phi_mode!r}")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"TokenizerConfig.lookup must be one of {LOOKUPS}, got {self.lookup!r}")
        if self.phi_mode == "partial" and self.num_phi < 1:
            raise ValueError(f"TokenizerConfig.num_phi must be >= 1 with phi_mode='partial', got {self.num_phi}")
        if self.quant_conv_kernel < 1 or self.quant_conv_kernel % 2 == 0:
            raise ValueError(f"TokenizerConfig.quant_conv_kernel must be odd, got {self.quant_conv_kernel}")
        if not 0.0 <= self.scale_dropout <= 1.0:
            raise ValueError(f"TokenizerConfig.scale_dropout is a probability, got {self.scale_dropout}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TokenizerConfig.dropout must lie in [0, 1), got {self.dropout}")
        f = self.downsample
        if self.image_size % f:
            raise ValueError(f"TokenizerConfig.image_size={self.image_size} is not a multiple of the downsampling "
                             f"factor {f} set by TokenizerConfig.channel_mults={list(self.channel_mults)} "
                             "(2^(len − 1))")
        if self.patch_nums[-1] != self.latent_size:
            raise ValueError(f"the last entry of TokenizerConfig.patch_nums={list(self.patch_nums)} must equal the "
                             f"latent size {self.latent_size} = TokenizerConfig.image_size={self.image_size} / {f} "
                             "(from channel_mults)")

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor 2^(len(channel_mults) − 1)."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def latent_size(self) -> int:
        """Side h = w of the latent for ``image_size``."""
        return self.image_size // self.downsample


# ---- Model -----------------------------------------------------------------------------------

CHANNELS_LAST_DECODE_ATOL = 2e-4
"""Largest absolute pixel difference of ``decode(..., channels_last=True)`` from the default decode."""


class MultiScaleTokenizer(nn.Module):
    """Encoder + quant_conv + ``MultiScaleResidualQuantizer`` + post_quant_conv + decoder, on images in [-1, 1];
    methods taking ``patch_nums`` accept any subset of the trained schedule ending at its last scale."""

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__()
        cfg = self.config = config or TokenizerConfig()
        arch = dict(channels=cfg.channels, channel_mults=cfg.channel_mults, num_res_blocks=cfg.num_res_blocks,
                    z_channels=cfg.latent_dim, dropout=cfg.dropout, max_groups=cfg.norm_groups)
        self.encoder = Encoder(in_channels=cfg.image_channels, **arch)
        k = cfg.quant_conv_kernel
        self.quant_conv = nn.Conv2d(cfg.latent_dim, cfg.latent_dim, k, padding=k // 2)
        self.quantizer = MultiScaleResidualQuantizer(
            cfg.vocab_size, cfg.latent_dim, cfg.patch_nums, phi_mode=cfg.phi_mode, num_phi=cfg.num_phi,
            phi_rho=cfg.phi_rho, lookup=cfg.lookup, beta=cfg.beta, scale_dropout=cfg.scale_dropout)
        self.post_quant_conv = nn.Conv2d(cfg.latent_dim, cfg.latent_dim, k, padding=k // 2)
        self.decoder = Decoder(out_channels=cfg.image_channels, **arch)

    patch_nums = property(lambda self: self.config.patch_nums)
    vocab_size = property(lambda self: self.config.vocab_size)
    latent_dim = property(lambda self: self.config.latent_dim)
    image_size = property(lambda self: self.config.image_size)
    latent_size = property(lambda self: self.config.latent_size)
    downsample = property(lambda self: self.config.downsample)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight (for the adaptive GAN weight)."""
        return self.decoder.last_layer

    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> continuous latent f (B, C, h, w), before quantization."""
        c, s = self.config.image_channels, self.config.image_size
        if img_B3HW.dim() != 4 or tuple(img_B3HW.shape[1:]) != (c, s, s):
            raise ValueError(f"expected images (B, {c}, {s}, {s}) for this tokenizer (image_size={s}, latent "
                             f"{self.latent_size}, patch_nums {list(self.patch_nums)}), got {tuple(img_B3HW.shape)}")
        return self.quant_conv(self.encoder(img_B3HW))

    def decode(self, f_hat_BChw: torch.Tensor, clamp: bool = True, channels_last: bool = False) -> torch.Tensor:
        """Latent f_hat -> image (contiguous); clamped to [-1, 1] unless ``clamp=False`` (training).

        ``channels_last=True`` runs the decoder in NHWC (cuDNN's and oneDNN's layout, still float32): only the
        summation order changes, by at most ``CHANNELS_LAST_DECODE_ATOL`` (measured 6e-5 on ``var-vae-f16`` at 256 px,
        2e-6 on ``digits``; benchmarks/bench_sampling.py). Not bf16: it moved pixels by 6-9e-2 there (8-11 levels).
        """
        C, h = self.latent_dim, self.latent_size
        if f_hat_BChw.dim() != 4 or tuple(f_hat_BChw.shape[1:]) != (C, h, h):
            raise ValueError(f"expected a latent (B, {C}, {h}, {h}), got {tuple(f_hat_BChw.shape)}")
        if channels_last:  # the layout propagates from the input through conv / GroupNorm / upsampling
            f_hat_BChw = f_hat_BChw.contiguous(memory_format=torch.channels_last)
        img = self.decoder(self.post_quant_conv(f_hat_BChw))
        if channels_last:
            img = img.contiguous()
        return img.clamp(-1.0, 1.0) if clamp else img

    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training pass: (unclamped reconstruction, VQ loss, tokens per scale; −1 where scale dropout cut)."""
        q: QuantizerOutput = self.quantizer(self.encode(img_B3HW))
        return self.decode(q.f_hat, clamp=False), q.vq_loss, q.tokens

    @torch.no_grad()
    def img_to_tokens(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Image -> list of (B, pn, pn) long token maps over ``patch_nums`` (default: the trained schedule)."""
        return self.quantizer.quantize(self.encode(img_B3HW), patch_nums).tokens

    def embed(self, tokens_Bhw: torch.Tensor) -> torch.Tensor:
        """Token map (B, pn, pn) -> code vectors (B, C, pn, pn)."""
        return self.quantizer.embed(tokens_Bhw)

    def tokens_to_fhat(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None, cumulative: bool = False):
        """f_hat = sum_k phi_k(up(codebook[r_k])): the final (B, C, h, w) (contiguous), or the list after each scale."""
        return self.quantizer.tokens_to_fhat(tokens, patch_nums, cumulative)

    def tokens_to_img(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Decode token maps to an image in [-1, 1]."""
        return self.decode(self.tokens_to_fhat(tokens, patch_nums))

    @torch.no_grad()
    def reconstruct(self, img_B3HW: torch.Tensor, patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Image -> tokens -> image in [-1, 1] (evaluation)."""
        return self.tokens_to_img(self.img_to_tokens(img_B3HW, patch_nums), patch_nums)

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Generator inputs x_BLC, (B, L − pn_0², C): scale k ≥ 1 sees area_down(f_hat after scales < k, pn_k)."""
        return self.quantizer.teacher_forcing_inputs(tokens, patch_nums)

    def next_input(self, f_hat_BChw: torch.Tensor, si: int, patch_nums: Sequence[int] | None = None) -> torch.Tensor | None:
        """The generator's input for scale si + 1, area_down(f_hat, pn_{si+1}); None after the last scale."""
        return self.quantizer.next_input(f_hat_BChw, si, patch_nums)

    def next_state(self, si: int, f_hat_BChw: torch.Tensor, tokens_Bhw: torch.Tensor, patch_nums: Sequence[int] | None = None):
        """Sampler step: (f_hat + h_si, input for scale si + 1 (B, C, pn, pn) or None at the last scale); no in-place change."""
        return self.quantizer.next_state(si, f_hat_BChw, tokens_Bhw, patch_nums)


# ---- Presets ---------------------------------------------------------------------------------

# The CPU presets for the built-in digits. 8 norm groups: 32-group GroupNorm on 32 channels would normalise every
# channel on its own.
_DIGITS = dict(vocab_size=512, latent_dim=16, channels=32, num_res_blocks=1, norm_groups=8)
_PRESET_CONFIGS: dict[str, dict] = {
    # VAR's released vae_ch160v4096z32.pth: 108.9 M parameters, 256 px -> 16×16×32, 680 tokens.
    "var-vae-f16": {},
    # The same network at 512 px (32×32 latent, VAR's d36 schedule, 2,240 tokens) and 1024 px (64×64, 10,240 tokens).
    "var-vae-f16-512": dict(image_size=512, patch_nums=VAR_PATCH_NUMS_512),
    "var-vae-f16-1024": dict(image_size=1024, patch_nums=VAR_PATCH_NUMS_1024),
    # 32 px digits: f4 -> 8×8 latent, 130 tokens; ~1 M parameters.
    "tiny": dict(image_size=32, channel_mults=(1, 2, 2), patch_nums=(1, 2, 3, 4, 6, 8), **_DIGITS),
    # The built-in digits at 16 px (the CPU demo and table): f2 -> 8×8 latent, 130 tokens, as the generator
    # stage and the sampler assume. One down-sampling level keeps an 8×8 latent at 16 px; 0.74 M parameters.
    "digits": dict(image_size=16, channel_mults=(1, 2), patch_nums=(1, 2, 3, 4, 6, 8), **_DIGITS),
    # The same network as tiny for 16 px digits: 4×4 latent, 30 tokens.
    "tiny-16": dict(image_size=16, channel_mults=(1, 2, 2), patch_nums=(1, 2, 3, 4), **_DIGITS),
}


def tokenizer_config(preset: str, **overrides) -> TokenizerConfig:
    """The ``TokenizerConfig`` of a named preset with some fields overridden (validated once, as a whole)."""
    if preset not in _PRESET_CONFIGS:
        raise KeyError(f"unknown tokenizer preset {preset!r}; available: {sorted(_PRESET_CONFIGS)}")
    known = {f.name for f in fields(TokenizerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown TokenizerConfig field(s) {unknown}; fields: {sorted(known)}")
    return TokenizerConfig(**{**_PRESET_CONFIGS[preset], **overrides})


def build_tokenizer(preset: str, **overrides) -> MultiScaleTokenizer:
    """Build a tokenizer by preset name (``var-vae-f16``, ``digits``, ``tiny``, ...) with field overrides."""
    return MultiScaleTokenizer(tokenizer_config(preset, **overrides))


TOKENIZER_PRESETS: dict[str, Callable[..., MultiScaleTokenizer]] = {n: partial(build_tokenizer, n)
                                                                    for n in _PRESET_CONFIGS}
