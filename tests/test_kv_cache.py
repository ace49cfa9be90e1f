"""The preallocated KV cache of step-wise sampling: one buffer per block, slices written once, the same
logits as the teacher-forced pass, re-runs of a scale, and the sampler's memory of one scale (markov)."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_weights

from srdd_lightning.models.scales import num_tokens, scale_slices
from srdd_lightning.models.tokenizer import build_tokenizer
from srdd_lightning.models.transformer import VARTransformer, build_generator
from srdd_lightning.sampling import Sampler, SamplingConfig

PNS = (1, 2, 3, 4, 6)


def _model(attn: str, depth: int = 2) -> VARTransformer:
    torch.manual_seed(0)
    model = build_generator("tiny", attn=attn, depth=depth, patch_nums=PNS, width=64, num_heads=2, latent_dim=8,
                            vocab_size=32, num_classes=10)  # fmt: skip
    randomize_weights(model)
    return model.eval()


def _inputs(batch: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (batch,), generator=g), torch.randn(batch, num_tokens(PNS) - 1, 8, generator=g)


def _x(x_BLC: torch.Tensor, si: int) -> torch.Tensor | None:
    s = scale_slices(PNS)[si]
    return None if si == 0 else x_BLC[:, s.start - 1 : s.stop - 1]


@pytest.mark.parametrize("attn", ["causal", "markov_prev"])
def test_buffers_are_preallocated_once_and_attended_as_views(attn, monkeypatch):
    """Every SDPA call of a block reads keys from the same storage (the block's buffer): no concatenation."""
    model = _model(attn)
    label_B, x_BLC = _inputs()
    storages: list[int] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        storages.append(k.untyped_storage().data_ptr())
        return real_sdpa(q, k, v, **kw)

    cache = model.new_cache()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        for si in range(len(PNS)):
            model.forward_scale(si, label_B, _x(x_BLC, si), cache)
    depth = len(model.blocks)
    per_block = [set(storages[b::depth]) for b in range(depth)]
    assert all(len(s) == 1 for s in per_block), "a block's keys must come from one preallocated buffer"
    assert len(set.union(*per_block)) == depth
    sizes = [p * p for p in PNS]
    T = sum(sizes) if attn == "causal" else sizes[-2] + sizes[-1]  # markov_prev: two scales, not the schedule
    assert [tuple(k.shape) for k in cache._k] == [(3, 2, T, 32)] * depth
    assert cache.nbytes == 2 * depth * 3 * 2 * T * 32 * 4


@pytest.mark.parametrize("attn", ["causal", "markov_prev"])
def test_rerunning_a_scale_overwrites_it_and_invalidates_later_scales(attn):
    """Run all scales, go back to scale 2 with a new input (resampling), then on: logits equal the
    teacher-forced pass on the new inputs (markov_prev replays scale 1 first, as the sampler does)."""
    model = _model(attn)
    label_B, x_BLC = _inputs()
    x2_BLC = x_BLC.clone()
    s2 = scale_slices(PNS)[2]
    x2_BLC[:, s2.start - 1 :] += torch.randn_like(x2_BLC[:, s2.start - 1 :])
    cache = model.new_cache()
    with torch.no_grad():
        want = model(label_B, x2_BLC)
        for si in range(len(PNS)):
            model.forward_scale(si, label_B, _x(x_BLC, si), cache)
        if attn == "markov_prev":
            with pytest.raises(RuntimeError, match="lacks scales"):
                model.forward_scale(2, label_B, _x(x2_BLC, 2), cache)
            model.forward_scale(0, label_B, None, cache)
            model.forward_scale(1, label_B, _x(x2_BLC, 1), cache)
        got = [model.forward_scale(2, label_B, _x(x2_BLC, 2), cache)]
        assert cache.cached_scales == ([0, 1, 2] if attn == "causal" else [1, 2])  # the later scales are stale
        with pytest.raises(RuntimeError, match=r"lacks scales \[3\]"):
            model.forward_scale(4, label_B, _x(x2_BLC, 4), cache)
        got += [model.forward_scale(si, label_B, _x(x2_BLC, si), cache) for si in range(3, len(PNS))]
    assert cache.cached_scales == (list(range(len(PNS))) if attn == "causal" else [len(PNS) - 2, len(PNS) - 1])
    torch.testing.assert_close(torch.cat(got, 1), want[:, s2.start :], rtol=1e-5, atol=1e-5)


def test_batch_size_change_is_an_error_and_a_new_batch_starts_afresh():
    model = _model("causal")
    label_B, x_BLC = _inputs()
    cache = model.new_cache()
    with torch.no_grad():
        model.forward_scale(0, label_B, None, cache)
        with pytest.raises(ValueError, match="batch size changed within one KVCache: 3 -> 2"):
            model.forward_scale(1, label_B[:2], _x(x_BLC, 1)[:2], cache)
        # scale 0 needs no past: a new batch may start there with the same cache
        model.forward_scale(0, label_B[:2], None, cache)
        got = model.forward_scale(1, label_B[:2], _x(x_BLC, 1)[:2], cache)
        want = model(label_B[:2], x_BLC[:2])[:, 1:5]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_cache_refuses_gradients():
    model = _model("causal")
    label_B, _ = _inputs()
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        model.forward_scale(0, label_B, None, model.new_cache())


def _live_tensors() -> list[torch.Tensor]:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated torch.distributed aliases
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter)]


@pytest.mark.parametrize("resample", ["none", "mask"])
def test_markov_sampling_keeps_no_tensor_of_an_earlier_scale(resample, monkeypatch):
    """When scale k's pass starts, no logits/probabilities (·, pn_j², V) nor input (B, C, pn_j, pn_j) of an
    earlier scale j is alive: markov sampling holds one scale at a time (the token maps are the output)."""
    pns = (1, 2, 3, 4, 6, 8)
    tok = build_tokenizer("digits").eval()
    gen = build_generator("tiny", attn="markov", patch_nums=pns, width=64, num_heads=2, vocab_size=509).eval()
    tok.quantizer.codebook = torch.nn.Embedding(509, 16)  # a vocabulary size no other tensor has
    tok.config = dataclasses.replace(tok.config, vocab_size=509)
    real, leaks = gen.forward_scale, []
    before = {id(t) for t in _live_tensors()}  # tensors other tests left alive are not this sampler's

    def spy(si, cond, x_BlC, cache=None, schedule=None):
        for t in (t for t in _live_tensors() if id(t) not in before):
            for j in range(si):
                n = pns[j] ** 2
                if (t.dim() == 3 and t.shape[-2:] == (n, 509)) or (t.dim() == 4 and tuple(t.shape[1:]) == (16, pns[j], pns[j])):
                    leaks.append((si, j, tuple(t.shape)))
        return real(si, cond, x_BlC, cache, schedule)

    monkeypatch.setattr(gen, "forward_scale", spy)
    config = SamplingConfig(cfg=1.5, top_k=50, top_p=0.9, resample=resample, refine_steps=2)
    Sampler(gen, tok).sample(torch.tensor([1, 2]), config, seeds=0)
    assert leaks == []
