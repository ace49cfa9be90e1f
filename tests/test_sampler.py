"""The sampler: reference loops, guidance, filtering, seeds, schedules, resampling, editing, policy hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_weights

import srdd_lightning.sampling.sampler as sampler_mod
from srdd_lightning.models.scales import num_tokens, scale_slices
from srdd_lightning.models.tokenizer import build_tokenizer
from srdd_lightning.models.transformer import ATTN_MODES, build_generator
from srdd_lightning.sampling import (
    EditSpec,
    Sampler,
    RefineDecision,
    SamplingConfig,
    ScaleStats,
    box_mask,
    draw_tokens,
    filter_logits,
    guided_logits,
    inpaint,
    load_mask,
    outpaint,
    reconstruct,
    sampling_probs,
    super_resolution,
)

PNS = (1, 2, 3, 4)  # tiny-16: 16 px images, 4x4 latents
K = len(PNS)
LABELS = torch.tensor([0, 3, 7, 9])
PLAIN = dict(cfg=0.0, top_k=0, top_p=1.0)  # no guidance, no filtering
GREEDY = dict(cfg=0.0, top_k=1, top_p=1.0)


def _generator(attn: str = "markov", patch_nums=PNS, seed: int = 1, **kw):
    gen = build_generator("tiny", attn=attn, patch_nums=patch_nums, width=64, num_heads=2, **kw)
    randomize_weights(gen, seed, head_gain=3.0)
    return gen.eval()


def _tokenizer(preset: str = "tiny-16"):
    torch.manual_seed(0)
    tok = build_tokenizer(preset)
    with torch.no_grad():  # spread codes so that re-quantization is not trivial
        tok.quantizer.codebook.weight.normal_()
    return tok.eval()


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def gens():
    return {attn: _generator(attn) for attn in ATTN_MODES}


def _tf_logits(gen, tok, labels, tokens, schedule=None):
    """Teacher-forced logits per scale from one parallel pass on ``tokens``."""
    sched = schedule or gen.patch_nums
    with torch.no_grad():
        logits = gen(labels, tok.teacher_forcing_inputs(tokens, sched), schedule=sched)
    return [logits[:, s] for s in scale_slices(sched)]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---- 1. equals a direct reference loop ---------------------------------------------------------


@pytest.mark.parametrize("attn", ATTN_MODES)
def test_greedy_equals_teacher_forced_argmax(tok, gens, attn):
    gen = gens[attn]
    out = Sampler(gen, tok).sample(LABELS, SamplingConfig(**GREEDY), seeds=0)
    assert [tuple(t.shape) for t in out.tokens] == [(4, p, p) for p in PNS]
    assert out.images.shape == (4, 3, 16, 16) and out.images.abs().max() <= 1.0
    for k, logits in enumerate(_tf_logits(gen, tok, LABELS, out.tokens)):
        assert torch.equal(out.tokens[k].flatten(1), logits.argmax(-1)), f"scale {k}"
    assert len(torch.unique(out.tokens[-1])) > 3  # a non-trivial sample


@pytest.mark.parametrize("attn", ["markov", "causal"])
def test_stochastic_draw_equals_inverse_cdf_reference(tok, gens, attn):
    """With each sample's own uniforms (pn² per scale, in order), tokens are the inverse CDF of the
    teacher-forced distribution."""
    gen, seeds = gens[attn], [5, 6, 7, 8]
    out = Sampler(gen, tok).sample(LABELS, SamplingConfig(**PLAIN), seeds=seeds)
    logits = _tf_logits(gen, tok, LABELS, out.tokens)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        for k, pn in enumerate(PNS):
            u = torch.rand(pn * pn, generator=g)
            cdf = logits[k][i].softmax(-1).cumsum(-1)
            ref = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1)
            assert torch.equal(out.tokens[k][i].flatten(), ref), f"sample {i} scale {k}"


# ---- 2. guidance ---------------------------------------------------------------------------------


def test_guided_logits_formula():
    c, u = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    torch.testing.assert_close(guided_logits(c, u, 2.5), 3.5 * c - 2.5 * u)
    torch.testing.assert_close(guided_logits(c, u, 0.0), c)


def test_linear_guidance_leaves_first_scale_unguided(tok, gens):
    sampler = Sampler(gens["markov"], tok)
    plain = sampler.sample(LABELS, SamplingConfig(**GREEDY), seeds=0)
    guided = sampler.sample(LABELS, SamplingConfig(cfg=4.0, cfg_schedule="linear", top_k=1), seeds=0)
    assert torch.equal(plain.tokens[0], guided.tokens[0])
    assert not _same(plain.tokens, guided.tokens)


@pytest.mark.parametrize(
    "schedule,expected",
    [("constant", [2.5] * K), ("linear", [2.5 * k / (K - 1) for k in range(1, K)]), ([0.0, 1.0, 0.0, 3.0], [1.0, 3.0])],
)
def test_guidance_weights_reach_the_formula(tok, gens, monkeypatch, schedule, expected):
    """markov doubles only the scales with t > 0; each passes its own t to guided_logits."""
    seen = []

    def spy(c, u, t):
        seen.append(t)
        return guided_logits(c, u, t)

    monkeypatch.setattr(sampler_mod, "guided_logits", spy)
    Sampler(gens["markov"], tok).sample(LABELS, SamplingConfig(cfg=2.5, cfg_schedule=schedule, top_k=1), seeds=0)
    assert seen == pytest.approx(expected)


def test_constant_guidance_first_scale_is_guided_argmax(tok, gens):
    gen, t = gens["markov"], 2.0
    out = Sampler(gen, tok).sample(LABELS, SamplingConfig(cfg=t, cfg_schedule="constant", top_k=1), seeds=0)
    with torch.no_grad():
        logits = gen.forward_scale(0, gen.embed_condition(LABELS, with_null=True), None, schedule=PNS)
    c, u = logits.chunk(2)
    assert torch.equal(out.tokens[0].flatten(1), ((1 + t) * c - t * u).argmax(-1))


@pytest.mark.parametrize("attn", ["markov", "causal"])
def test_guidance_doubles_the_batch_only_where_needed(tok, gens, attn):
    sampler, L = Sampler(gens[attn], tok), num_tokens(PNS)
    assert sampler.sample(LABELS, SamplingConfig(**PLAIN)).cost.tokens == L
    assert sampler.sample(LABELS, SamplingConfig(cfg=0.0, cfg_schedule="constant", top_k=0)).cost.tokens == L
    linear = sampler.sample(LABELS, SamplingConfig(cfg=1.5, top_k=0)).cost.tokens
    # markov skips the doubling at the unguided first scale; causal's cache needs one batch size throughout
    assert linear == (2 * L - 1 if attn == "markov" else 2 * L)


# ---- 3. top-k / top-p / temperature -----------------------------------------------------------------


def test_top_k_keeps_exactly_k():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    kept = torch.isfinite(filter_logits(logits, top_k=5))
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(kept, logits >= logits.topk(5, dim=-1).values[..., -1:])
    assert torch.equal(filter_logits(logits, top_k=0), logits) and torch.equal(filter_logits(logits, top_k=50), logits)


@pytest.mark.parametrize("p", [0.3, 0.7, 0.96])
def test_top_p_keeps_the_minimal_nucleus(p):
    logits = torch.randn(4, 6, 40, generator=torch.Generator().manual_seed(1)) * 2
    probs = logits.softmax(-1)
    kept = torch.isfinite(filter_logits(logits, top_p=p))
    mass = (probs * kept).sum(-1)
    assert (mass >= p - 1e-6).all()
    # dropping the least likely kept token leaves less than p: the nucleus is minimal
    smallest = torch.where(kept, probs, torch.inf).amin(-1)
    assert (mass - smallest < p).all()
    assert (kept.sum(-1) < 40).all()
    assert torch.equal(filter_logits(logits, top_p=1.0), logits) and torch.equal(filter_logits(logits, top_p=0.0), logits)


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.tensor([[[5.0, 0.0, 0.0, 0.0]]])
    assert torch.isfinite(filter_logits(logits, top_p=1e-6)).sum() == 1


def test_draw_never_returns_a_removed_token():
    probs = sampling_probs(torch.randn(3, 8, 30, generator=torch.Generator().manual_seed(2)), top_k=4)
    for u in (0.0, 0.5, 1.0 - 1e-7, 0.9999999):
        idx = draw_tokens(probs, torch.full((3, 8), u))
        assert (probs.gather(-1, idx.unsqueeze(-1)) > 0).all()


def test_temperature_to_zero_approaches_argmax(tok, gens):
    logits = torch.randn(2, 5, 30, generator=torch.Generator().manual_seed(3))
    cold = sampling_probs(logits, temperature=1e-3)
    assert torch.equal(cold.argmax(-1), logits.argmax(-1)) and (cold.amax(-1) > 0.999).all()
    assert torch.equal(sampling_probs(logits, temperature=0.0), F.one_hot(logits.argmax(-1), 30).float())
    hot = sampling_probs(logits, temperature=10.0)
    assert hot.amax(-1).max() < sampling_probs(logits).amax(-1).max()
    sampler = Sampler(gens["markov"], tok)
    greedy = sampler.sample(LABELS, SamplingConfig(**GREEDY), seeds=1).tokens
    for temp in (0.0, 1e-4):
        assert _same(sampler.sample(LABELS, SamplingConfig(**PLAIN, temperature=temp), seeds=1).tokens, greedy)


# ---- 4. per-sample seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["markov", "causal"])
def test_a_seed_gives_the_same_sample_in_any_batch(tok, gens, attn):
    sampler = Sampler(gens[attn], tok)
    config = SamplingConfig(cfg=2.0, top_k=50, top_p=0.9, resample="mask", refine_steps=1, p_resample=0.3)
    labels, seeds = torch.tensor([3, 1, 4, 1, 5]), [10, 11, 12, 13, 14]
    batch = sampler.sample(labels, config, seeds=seeds)
    alone = sampler.sample(labels[3:4], config, seeds=[13])
    assert _same([t[3:4] for t in batch.tokens], alone.tokens)
    torch.testing.assert_close(batch.images[3:4], alone.images, atol=1e-5, rtol=1e-5)
    # same label, different seed: a different sample; the same seeds again: the same batch
    assert not torch.equal(batch.tokens[-1][1], batch.tokens[-1][3])
    assert _same(batch.tokens, sampler.sample(labels, config, seeds=seeds).tokens)


def test_no_seeds_uses_the_global_rng(tok, gens):
    sampler = Sampler(gens["markov"], tok)
    torch.manual_seed(123)
    a = sampler.sample(LABELS, SamplingConfig(**PLAIN)).tokens
    b = sampler.sample(LABELS, SamplingConfig(**PLAIN)).tokens
    torch.manual_seed(123)
    assert _same(a, sampler.sample(LABELS, SamplingConfig(**PLAIN)).tokens) and not _same(a, b)


# ---- 5. schedule subsets -----------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["markov", "causal"])
def test_subset_schedule_tiny16(tok, gens, attn):
    out = Sampler(gens[attn], tok).sample(LABELS, SamplingConfig(schedule=[1, 3, 4], **GREEDY), seeds=0)
    assert [tuple(t.shape[1:]) for t in out.tokens] == [(1, 1), (3, 3), (4, 4)]
    assert out.schedule == (1, 3, 4)
    assert out.cost.tokens == 1 + 9 + 16 < num_tokens(PNS) and out.cost.forward_passes == 3
    # greedy tokens are consistent with the teacher-forced pass on the same subset schedule
    for k, logits in enumerate(_tf_logits(gens[attn], tok, LABELS, out.tokens, schedule=(1, 3, 4))):
        assert torch.equal(out.tokens[k].flatten(1), logits.argmax(-1))


def test_subset_schedule_of_the_digits_preset():
    tok32 = _tokenizer("tiny")
    gen = _generator("markov", patch_nums=(1, 2, 3, 4, 6, 8))
    out = Sampler(gen, tok32).sample(LABELS[:2], SamplingConfig(schedule=[1, 3, 6, 8], cfg=1.0, top_k=20), seeds=0)
    assert [tuple(t.shape[1:]) for t in out.tokens] == [(p, p) for p in (1, 3, 6, 8)]
    assert out.images.shape == (2, 3, 32, 32)
    assert out.cost.tokens == 1 + 2 * (9 + 36 + 64)  # linear guidance: the first scale is not doubled
    with pytest.raises(ValueError, match="not among the trained scales"):
        Sampler(gen, tok32).sample(LABELS[:2], SamplingConfig(schedule=[1, 5, 8]))


@pytest.mark.parametrize("bad,match", [([1, 2, 3], "must end"), ([1, 2, 5, 4], "strictly increasing")])
def test_bad_schedule_errors(tok, gens, bad, match):
    with pytest.raises(ValueError, match=match):
        Sampler(gens["markov"], tok).sample(LABELS, SamplingConfig(schedule=bad))


def test_bad_settings_error(tok, gens):
    sampler = Sampler(gens["markov"], tok)
    with pytest.raises(ValueError, match="top_k has 2 entries"):
        sampler.sample(LABELS, SamplingConfig(top_k=[1, 2]))
    with pytest.raises(ValueError, match="resample must be one of"):
        sampler.sample(LABELS, SamplingConfig(resample="sometimes"))
    with pytest.raises(ValueError, match="top_p"):
        sampler.sample(LABELS, SamplingConfig(top_p=1.5))


# ---- 6. resampling -----------------------------------------------------------------------------------


def _refine_at(k: int, mode: str = "simple", steps: int = 1, **kw) -> SamplingConfig:
    modes = ["none"] * K
    modes[k] = mode
    return SamplingConfig(resample=modes, refine_steps=steps, **{**PLAIN, **kw})


def _p_of(probs_BlV, tokens_Bhw):
    return probs_BlV.gather(-1, tokens_Bhw.flatten(1).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("attn", ATTN_MODES)
@pytest.mark.parametrize("mode", ["simple", "mask", "pc"])
def test_cheap_modes_keep_the_state_and_reuse_the_prediction(tok, gens, attn, mode):
    """simple / mask / pc redraw scale k from p(. | I_(k-1)): no pass, the coarse tokens are left alone, and the
    scales after k follow the refined tokens (the causal cache holds the unchanged coarse scales)."""
    gen, k = gens[attn], 2
    sampler = Sampler(gen, tok)
    base = sampler.sample(LABELS, SamplingConfig(**PLAIN), seeds=0)
    out = sampler.sample(LABELS, _refine_at(k, mode, steps=2, p_resample=0.5), seeds=0)
    assert out.cost == base.cost
    assert _same(out.tokens[:k], base.tokens[:k])
    assert not torch.equal(out.tokens[k], base.tokens[k])
    greedy = sampler.sample(LABELS, _refine_at(k, mode, steps=2, p_resample=0.5, top_k=1), seeds=0)
    logits = _tf_logits(gen, tok, LABELS, greedy.tokens)
    for j in range(k + 1, K):
        assert torch.equal(greedy.tokens[j].flatten(1), logits[j].argmax(-1)), f"scale {j}"


def test_mask_resampling_keeps_the_likely_tokens(tok, gens):
    gen, sampler, last = gens["markov"], Sampler(gens["markov"], tok), K - 1
    first = sampler.sample(LABELS, SamplingConfig(**PLAIN), seeds=3).tokens  # the first draw (same uniforms)
    probs = _tf_logits(gen, tok, LABELS, first)[last].softmax(-1)  # p_k given the unchanged coarse tokens
    p_cur = _p_of(probs, first[last])
    p_res = p_cur.median().item()
    keep = p_cur >= p_res
    assert keep.any() and (~keep).any()

    out = sampler.sample(LABELS, _refine_at(last, "mask", p_resample=p_res), seeds=3).tokens
    assert _same(out[:last], first[:last])
    final, before = out[last].flatten(1), first[last].flatten(1)
    assert torch.equal(final[keep], before[keep])
    assert (final[~keep] != before[~keep]).any()

    unchanged = sampler.sample(LABELS, _refine_at(last, "mask", p_resample=0.0), seeds=3).tokens
    assert _same(unchanged, first)
    like_simple = sampler.sample(LABELS, _refine_at(last, "mask", p_resample=1.0), seeds=3).tokens
    assert _same(like_simple, sampler.sample(LABELS, _refine_at(last, "simple"), seeds=3).tokens)


def test_mask_resampling_converges_as_steps_grow(tok, gens):
    """Each step redraws only tokens below the threshold, so the share of them falls geometrically with R."""
    gen, sampler, last = gens["markov"], Sampler(gens["markov"], tok), K - 1
    labels = torch.arange(64) % 10
    low = []
    for steps in (0, 1, 4, 16):
        out = sampler.sample(labels, _refine_at(last, "mask", steps=steps, p_resample=0.05), seeds=0).tokens
        probs = _tf_logits(gen, tok, labels, out)[last].softmax(-1)
        low.append((_p_of(probs, out[last]) < 0.05).float().mean().item())
    assert low[0] > 0.05 and low[0] > low[1] > low[2] >= low[3]


def test_predictor_corrector_only_raises_token_probabilities(tok, gens):
    gen, sampler, last = gens["markov"], Sampler(gens["markov"], tok), K - 1
    first = sampler.sample(LABELS, SamplingConfig(**PLAIN), seeds=5).tokens
    out = sampler.sample(LABELS, _refine_at(last, "pc", steps=3), seeds=5).tokens
    probs = _tf_logits(gen, tok, LABELS, first)[last].softmax(-1)
    p0, p1 = _p_of(probs, first[last]), _p_of(probs, out[last])
    changed = first[last].flatten(1) != out[last].flatten(1)
    assert changed.any() and (p1[changed] > p0[changed]).all() and torch.equal(p1[~changed], p0[~changed])


@pytest.mark.parametrize("attn", ATTN_MODES)
def test_renoise_requantizes_the_completed_sample(tok, gens, attn):
    """Greedy renoise at scale k: the completion of I_k is the greedy sample itself, so the new coarse tokens are
    M(k-1) of its latent, scale k is re-predicted from them, and the rest follows teacher forcing."""
    gen, k = gens[attn], 2
    sampler = Sampler(gen, tok)
    base = sampler.sample(LABELS, SamplingConfig(**GREEDY), seeds=0)
    out = sampler.sample(LABELS, _refine_at(k, "renoise", steps=1, top_k=1), seeds=0)
    coarse = tok.quantizer.quantize(tok.tokens_to_fhat(base.tokens), PNS, num_scales=k).tokens
    assert _same(out.tokens[:k], coarse) and not _same(coarse, base.tokens[:k])
    logits = _tf_logits(gen, tok, LABELS, out.tokens)
    for j in range(k, K):
        assert torch.equal(out.tokens[j].flatten(1), logits[j].argmax(-1)), f"scale {j}"


@pytest.mark.parametrize("attn,k,replay", [("causal", 3, 2), ("causal", 1, 0), ("markov_prev", 3, 3), ("markov_prev", 1, 1),
                                          ("markov", 3, 0), ("markov", 1, 0)])
def test_renoise_cost_counts_completion_replay_and_repass(tok, gens, attn, k, replay):
    """One renoise step at scale k: the scales after k (completion), the coarse scales whose K/V changed or that
    the completion evicted (causal 1..k-1, markov_prev 0..k-1) and scale k again."""
    sampler = Sampler(gens[attn], tok)
    base = sampler.sample(LABELS, SamplingConfig(**PLAIN), seeds=0).cost
    cost = sampler.sample(LABELS, _refine_at(k, "renoise"), seeds=0).cost
    completion = K - 1 - k
    assert cost.per_scale_passes[k] == 1 + completion + replay + 1
    replayed = {"causal": range(1, k), "markov_prev": range(0, k), "markov": range(0)}[attn]
    extra = sum(PNS[j] ** 2 for j in range(k + 1, K)) + sum(PNS[j] ** 2 for j in replayed) + PNS[k] ** 2
    assert cost.tokens == base.tokens + extra


def test_refine_temperature_anneals_the_redraws(tok, gens):
    gen, sampler, last = gens["markov"], Sampler(gens["markov"], tok), K - 1
    out = sampler.sample(LABELS, _refine_at(last, "simple", refine_temperature=0.0), seeds=0).tokens
    assert torch.equal(out[last].flatten(1), _tf_logits(gen, tok, LABELS, out)[last].argmax(-1))


@pytest.mark.parametrize("mode", ["simple", "mask", "renoise"])
def test_zero_refine_steps_is_no_refinement(tok, gens, mode):
    sampler = Sampler(gens["causal"], tok)
    base = sampler.sample(LABELS, SamplingConfig(cfg=1.5, top_k=30), seeds=4)
    zero = sampler.sample(LABELS, SamplingConfig(cfg=1.5, top_k=30, resample=mode, refine_steps=0), seeds=4)
    assert _same(base.tokens, zero.tokens) and torch.equal(base.images, zero.images)
    assert base.cost == zero.cost


def test_first_scale_refinement_reuses_its_prediction(tok, gens):
    """At scale 0 the input is the start token: every mode (renoise too) redraws without another pass."""
    sampler = Sampler(gens["markov"], tok)
    for mode in ("simple", "renoise"):
        out = sampler.sample(LABELS, _refine_at(0, mode, steps=3, temperature=5.0), seeds=0)
        assert out.cost.per_scale_passes == [1] * K
        assert out.images.shape[-1] == tok.image_size and out.cost.forward_passes == K


# ---- 7. editing --------------------------------------------------------------------------------------


def _images(n: int = 2, size: int = 16, seed: int = 0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _keep_at(spec: EditSpec, pn: int, batch: int = 2):
    keep = F.interpolate(spec.mask_Bhw[:, None].float(), size=(pn, pn), mode="area")[:, 0] >= 0.5
    return keep.expand(batch, pn, pn)


REFINE_ALL = dict(cfg=1.0, top_k=20, resample="mask", refine_steps=2, p_resample=0.5)


@pytest.mark.parametrize("attn", ["markov", "causal"])
def test_inpainting_keeps_the_known_region_at_every_scale(tok, gens, attn):
    img = _images()
    hole = box_mask(16, (4, 4, 12, 12), batch=2)
    spec = inpaint(tok, img, hole)
    expected = torch.ones(4, 4)
    expected[1:3, 1:3] = 0
    assert torch.equal(spec.mask_Bhw, expected.expand(2, 4, 4))  # latent cells 1..2 contain hole pixels
    assert _keep_at(spec, 2).all() and _keep_at(spec, 1).all()
    out = Sampler(gens[attn], tok).sample(torch.tensor([10, 10]), SamplingConfig(**REFINE_ALL), seeds=0, edit=spec)
    for k, pn in enumerate(PNS):
        keep = _keep_at(spec, pn)
        assert torch.equal(out.tokens[k][keep], spec.tokens[k][keep]), f"scale {k}"
    assert not torch.equal(out.tokens[-1], spec.tokens[-1])  # the hole was generated


def test_outpainting_keeps_the_box(tok, gens):
    img = _images()
    spec = outpaint(tok, img, keep_box=(4, 4, 12, 12))
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = 1
    assert torch.equal(spec.mask_Bhw, expected[None])  # one mask for the whole batch
    out = Sampler(gens["markov"], tok).sample(torch.tensor([1, 2]), SamplingConfig(**REFINE_ALL), seeds=1, edit=spec)
    for k, pn in enumerate(PNS):
        keep = _keep_at(spec, pn)
        assert torch.equal(out.tokens[k][keep], spec.tokens[k][keep])
    assert torch.equal(out.tokens[-1][:, 1:3, 1:3], spec.tokens[-1][:, 1:3, 1:3])
    assert not torch.equal(out.tokens[-1], spec.tokens[-1])


@pytest.mark.parametrize("attn", ["markov", "causal"])
def test_super_resolution_forces_the_coarse_scales(tok, gens, attn):
    low = _images(size=8)  # 8 px -> latent 2 with the f4 tokenizer: scales 1 and 2 are known
    spec = super_resolution(tok, low)
    assert spec.keep_scales == 2 and spec.mask_Bhw is None
    config = SamplingConfig(cfg=1.0, top_k=20, resample="simple", refine_steps=2)
    out = Sampler(gens[attn], tok).sample(torch.tensor([4, 5]), config, seeds=0, edit=spec)
    assert _same(out.tokens[:2], spec.tokens[:2])
    assert not torch.equal(out.tokens[-1], spec.tokens[-1])
    assert out.cost.per_scale_passes[:2] == ([0, 0] if attn == "markov" else [1, 1])  # known scales: no prediction
    with pytest.raises(ValueError, match="keep_scales"):
        super_resolution(tok, _images(size=2))


@pytest.mark.parametrize("attn", ["markov", "causal"])
def test_reconstruction_forces_the_first_scales(tok, gens, attn):
    img = _images(1)
    spec = reconstruct(tok, img, n_scales=3)
    sampler = Sampler(gens[attn], tok)
    out = sampler.sample(torch.tensor([1, 2, 3]), SamplingConfig(cfg=0.0, top_k=20, resample="simple", refine_steps=1), seeds=[0, 1, 2], edit=spec)
    assert _same([t.expand(3, -1, -1) for t in spec.tokens[:3]], out.tokens[:3])  # one reference, three samples
    # simple refinement reuses the prediction: markov runs scale 3 only; causal also feeds its cache with 0, 1, 2
    assert out.cost.forward_passes == (1 if attn == "markov" else 3 + 1)
    with pytest.raises(ValueError, match="n_scales"):
        reconstruct(tok, img, n_scales=5)
    with pytest.raises(ValueError, match="scales"):
        sampler.sample(torch.tensor([1]), edit=EditSpec(spec.tokens[:3]))


def test_load_mask_white_is_generated(tmp_path):
    from PIL import Image

    arr = torch.zeros(8, 12, dtype=torch.uint8)
    arr[2:5, 3:9] = 255
    path = tmp_path / "mask.png"
    Image.frombytes("L", (12, 8), bytes(arr.flatten().tolist())).save(path)
    mask = load_mask(path)
    assert mask.shape == (1, 1, 8, 12) and torch.equal(mask[0, 0], (arr > 0).float())
    assert load_mask(path, size=16).shape == (1, 1, 16, 16)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mask(tmp_path / "missing.png")


# ---- 8. mismatched models --------------------------------------------------------------------------------


def test_rejects_a_mismatched_tokenizer(tok):
    with pytest.raises(ValueError, match=r"generator vocab_size=256 vs tokenizer vocab_size=512"):
        Sampler(_generator(vocab_size=256), tok)
    with pytest.raises(ValueError, match=r"latent_dim=8 vs tokenizer latent_dim=16"):
        Sampler(_generator(latent_dim=8), tok)
    with pytest.raises(ValueError, match=r"generator patch_nums=\[1, 2, 3, 4, 6, 8\] is not a subset of tokenizer"):
        Sampler(_generator(patch_nums=(1, 2, 3, 4, 6, 8)), tok)
    with pytest.raises(ValueError, match=r"generator patch_nums=\[1, 2, 3\] is not a subset"):
        Sampler(_generator(patch_nums=(1, 2, 3)), tok)  # does not end at the tokenizer's last scale


def test_fewer_scale_generator_samples_on_a_subset_of_the_tokenizer(tok):
    student = _generator(patch_nums=(1, 2, 4))  # trained on 3 of the tokenizer's 4 scales
    out = Sampler(student, tok).sample(LABELS, SamplingConfig(cfg=1.5, top_k=50), seeds=0)
    assert [tuple(t.shape[1:]) for t in out.tokens] == [(1, 1), (2, 2), (4, 4)]
    assert out.images.shape[-1] == tok.image_size and out.cost.forward_passes == 3


# ---- 9. the policy hook ------------------------------------------------------------------------------------


def test_policy_hook_overrides_the_refinement(tok, gens):
    seen: list[ScaleStats] = []

    def last_scale_twice(stats: ScaleStats):
        seen.append(stats)
        return ("renoise", 2, 0.5) if stats.scale == stats.num_scales - 1 else ("none", 0, 0.5)

    sampler = Sampler(gens["markov"], tok)
    config = SamplingConfig(cfg=1.5, top_k=50, resample="renoise", refine_steps=3)  # overridden by the policy
    base = sampler.sample(LABELS, SamplingConfig(cfg=1.5, top_k=50), seeds=0)
    out = sampler.sample(LABELS, config, seeds=0, policy=last_scale_twice)
    assert out.cost.per_scale_passes == [1, 1, 1, 3]
    assert out.cost.forward_passes == base.cost.forward_passes + 2
    assert out.cost.tokens == base.cost.tokens + 2 * 2 * 16  # two guided passes of the 4x4 scale
    assert torch.equal(out.tokens_per_sample, torch.full((4,), out.cost.tokens))
    assert [s.scale for s in seen] == list(range(K))
    for s in seen:
        assert s.entropy_B.shape == (4,) and (s.entropy_B >= 0).all()
        assert ((s.max_prob_B > 0) & (s.max_prob_B <= 1)).all()
        assert ((s.low_prob_share_B >= 0) & (s.low_prob_share_B <= 1)).all()
        assert s.features().shape == (4, 5) and s.probs_BlV.shape == (4, s.pn**2, 512)
        assert (s.x_BlC is None) == (s.scale == 0) and torch.equal(s.labels_B, LABELS)
    assert seen[0].guidance == 0.0 and seen[-1].guidance == pytest.approx(1.5)
    with pytest.raises(ValueError, match="policy returned mode"):
        sampler.sample(LABELS, config, policy=lambda s: ("often", 1, 0.5))


@pytest.mark.parametrize("mode", ["mask", "renoise"])
def test_a_per_sample_decision_changes_only_that_sample(tok, gens, mode):
    """Refinement for sample 1 only: every other sample is exactly the unrefined one (its own seed, untouched),
    and only sample 1 pays for the extra passes."""
    sampler = Sampler(gens["causal"], tok)
    labels = torch.tensor([0, 3, 7])

    def only_sample_1(stats):
        steps = torch.tensor([0, 2, 0]) if stats.scale == 2 else torch.zeros(3, dtype=torch.long)
        return RefineDecision(steps, mode, 0.9)

    base = sampler.sample(labels, SamplingConfig(**PLAIN), seeds=[5, 6, 7])
    out = sampler.sample(labels, SamplingConfig(**PLAIN), seeds=[5, 6, 7], policy=only_sample_1)
    for i in (0, 2):
        assert _same([t[i] for t in out.tokens], [t[i] for t in base.tokens]), i
    assert not _same([t[1] for t in out.tokens], [t[1] for t in base.tokens])
    if mode == "renoise":
        assert out.tokens_per_sample[1] > base.tokens_per_sample[1]
        assert torch.equal(out.tokens_per_sample[[0, 2]], base.tokens_per_sample[[0, 2]])


def test_the_token_critic_decides_what_mask_resampling_redraws(tok, gens):
    sampler, last = Sampler(gens["markov"], tok), K - 1
    first = sampler.sample(LABELS, SamplingConfig(**PLAIN), seeds=2).tokens
    keep_Bl = (torch.arange(16) % 3 == 0).expand(4, 16)  # the critic keeps every third token, whatever p says

    def policy(stats):
        steps = torch.full((4,), 1 if stats.scale == last else 0)
        return RefineDecision(steps, "mask", 0.5, critic=lambda st, tokens_Bl: keep_Bl.float())

    out = sampler.sample(LABELS, SamplingConfig(**PLAIN), seeds=2, policy=policy).tokens
    final, before = out[last].flatten(1), first[last].flatten(1)
    assert torch.equal(final[keep_Bl], before[keep_Bl]) and (final[~keep_Bl] != before[~keep_Bl]).any()


# ---- modes, dtypes, devices --------------------------------------------------------------------------------


def test_restores_training_mode_and_runs_under_autocast(tok):
    gen = _generator("causal")
    gen.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Sampler(gen, tok).sample(LABELS, SamplingConfig(cfg=1.5, top_k=20, resample="mask", refine_steps=1), seeds=0)
    assert gen.training and not tok.training
    assert out.images.dtype == torch.float32 and out.images.abs().max() <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_seeds_and_batch_invariance(tok):
    gen, t = _generator("causal").cuda(), _tokenizer().cuda()
    sampler = Sampler(gen, t)
    config = SamplingConfig(cfg=2.0, top_k=1, resample="mask", refine_steps=1)
    batch = sampler.sample(torch.tensor([1, 2, 3]), config, seeds=[7, 8, 9])
    alone = sampler.sample(torch.tensor([2]), config, seeds=[8])
    assert batch.images.is_cuda and _same([x[1:2] for x in batch.tokens], alone.tokens)
    cpu = Sampler(_generator("causal"), tok).sample(torch.tensor([1, 2, 3]), config, seeds=[7, 8, 9])
    agree = sum((a.cpu() == b).float().mean().item() for a, b in zip(batch.tokens, cpu.tokens)) / K
    assert agree > 0.9
