"""512 px and 1024 px: the schedules end at the latent size, the tokenizer presets build, and a generator on
those schedules runs a teacher-forced pass equal to its step-wise pass."""

from __future__ import annotations

import pytest
import torch

from srdd_lightning.models.scales import VAR_PATCH_NUMS_512, VAR_PATCH_NUMS_1024, as_schedule, num_tokens, scale_slices
from srdd_lightning.models.tokenizer import tokenizer_config, build_tokenizer
from srdd_lightning.models.transformer import build_generator
from srdd_lightning.sampling import Sampler, SamplingConfig


@pytest.mark.parametrize("preset,size,schedule,tokens", [("var-vae-f16-512", 512, VAR_PATCH_NUMS_512, 2240),
                                                         ("var-vae-f16-1024", 1024, VAR_PATCH_NUMS_1024, 10240)])
def test_presets_and_schedules_end_at_the_latent_size(preset, size, schedule, tokens):
    cfg = tokenizer_config(preset)
    base = tokenizer_config("var-vae-f16")
    assert as_schedule(schedule) == schedule and cfg.patch_nums == schedule
    assert cfg.image_size == size and cfg.latent_size == schedule[-1] == size // 16
    assert num_tokens(schedule) == tokens
    # the same network as var-vae-f16: only the image size and the schedule differ
    assert {k: v for k, v in vars(cfg).items() if getattr(base, k) != v}.keys() == {"image_size", "patch_nums"}
    assert VAR_PATCH_NUMS_1024[: len(VAR_PATCH_NUMS_512)] == VAR_PATCH_NUMS_512


@pytest.mark.parametrize("schedule", [VAR_PATCH_NUMS_512, VAR_PATCH_NUMS_1024])
def test_a_generator_on_the_hires_schedule_runs(schedule):
    torch.manual_seed(0)
    gen = build_generator("var-d16", depth=1, width=32, num_heads=2, vocab_size=64, patch_nums=schedule, attn="causal").eval()
    label_B = torch.tensor([3])
    x_BLC = torch.randn(1, num_tokens(schedule) - 1, 32)
    with torch.no_grad():
        logits = gen(label_B, x_BLC)
        cache = gen.new_cache()
        for si, s in enumerate(scale_slices(schedule)):  # x_BLC omits the start token
            last = gen.forward_scale(si, label_B, None if si == 0 else x_BLC[:, s.start - 1 : s.stop - 1], cache)
    assert logits.shape == (1, num_tokens(schedule), 64) and torch.isfinite(logits).all()
    torch.testing.assert_close(last, logits[:, -schedule[-1] ** 2 :], rtol=1e-5, atol=1e-5)


def test_a_512px_tokenizer_samples_with_a_thin_network():
    """The 512 px preset's quantizer and schedule through the real sampler (a thin conv net keeps it CPU-sized)."""
    torch.manual_seed(0)
    tok = build_tokenizer("var-vae-f16-512", channels=8, norm_groups=8, num_res_blocks=1, vocab_size=64).eval()
    gen = build_generator("var-d16", depth=1, width=32, num_heads=2, vocab_size=64, patch_nums=VAR_PATCH_NUMS_512).eval()
    out = Sampler(gen, tok).sample(torch.tensor([0]), SamplingConfig(top_k=8), seeds=0)
    assert out.images.shape == (1, 3, 512, 512) and [t.shape[-1] for t in out.tokens] == list(VAR_PATCH_NUMS_512)
