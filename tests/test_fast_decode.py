"""Decoding in the channels-last layout: the default decode is unchanged, the fast one stays within its stated
tolerance of it (var-vae-f16's network and the digits preset), and the sampler can use it."""

from __future__ import annotations

import pytest
import torch

from srdd_lightning.models.tokenizer import CHANNELS_LAST_DECODE_ATOL, build_tokenizer
from srdd_lightning.models.transformer import build_generator
from srdd_lightning.sampling import Sampler, SamplingConfig

# var-vae-f16's network (160 channels, 5 levels, 109 M parameters) at 64 px (4×4 latents) keeps the test fast
PRESETS = {"digits": {}, "var-vae-f16": dict(image_size=64, patch_nums=(1, 2, 4))}


@pytest.mark.parametrize("preset", PRESETS)
def test_channels_last_decode_stays_within_its_tolerance(preset):
    torch.manual_seed(0)
    tok = build_tokenizer(preset, **PRESETS[preset]).eval()
    f_hat = torch.randn(2, tok.latent_dim, tok.latent_size, tok.latent_size)
    with torch.no_grad():
        raw = tok.decoder(tok.post_quant_conv(f_hat))
        default = tok.decode(f_hat, clamp=False)
        fast = tok.decode(f_hat, clamp=False, channels_last=True)
        fast_clamped = tok.decode(f_hat, channels_last=True)
    assert torch.equal(default, raw)  # the default decode is exactly what it was
    assert fast.dtype == torch.float32 and fast.is_contiguous()
    assert fast.abs().max() > 0.1  # a decode that does something (random weights)
    err = (fast - default).abs().max().item()
    assert err <= CHANNELS_LAST_DECODE_ATOL, f"channels-last decode moved pixels by {err:.2e}"
    assert torch.equal(fast_clamped, fast.clamp(-1, 1))


def test_the_sampler_decodes_channels_last_on_request():
    torch.manual_seed(0)
    tok = build_tokenizer("digits").eval()
    gen = build_generator("tiny", width=64, num_heads=2).eval()
    config = SamplingConfig(cfg=1.0, top_k=20)
    base = Sampler(gen, tok).sample(torch.tensor([1, 2]), config, seeds=3)
    fast = Sampler(gen, tok, channels_last_decode=True).sample(torch.tensor([1, 2]), config, seeds=3)
    assert all(torch.equal(a, b) for a, b in zip(base.tokens, fast.tokens))
    assert (fast.images - base.images).abs().max() <= CHANNELS_LAST_DECODE_ATOL
    assert fast.images.is_contiguous()
