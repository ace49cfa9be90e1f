"""Generator transformer: masks, step-wise inference, schedules, VAR import, labels, optimiser groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_weights

from srdd_lightning.models.scales import num_tokens, scale_ids, scale_slices
from srdd_lightning.models.transformer import (
    ATTN_MODES,
    GeneratorConfig,
    InitConfig,
    VARTransformer,
    build_generator,
    generator_config,
)
from srdd_lightning.models.var_import_transformer import load_var_transformer

VAR_PNS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SMALL_PNS = (1, 2, 3, 4, 6)


def _model(attn: str, patch_nums=SMALL_PNS, depth: int = 2, **kw) -> VARTransformer:
    torch.manual_seed(0)
    kw = {"width": 64, "num_heads": 2, "latent_dim": 8, "vocab_size": 32, "num_classes": 10, **kw}
    model = build_generator("tiny", attn=attn, depth=depth, patch_nums=patch_nums, **kw)
    randomize_weights(model)
    return model.eval()


def _inputs(model: VARTransformer, batch: int = 3, schedule=None, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    sched = schedule or model.patch_nums
    label_B = torch.randint(0, model.num_classes, (batch,), generator=g)
    x_BLC = torch.randn(batch, num_tokens(sched) - sched[0] ** 2, model.config.latent_dim, generator=g)
    return label_B, x_BLC


def _stepwise(model: VARTransformer, label_B, x_BLC, schedule=None, use_cache=True):
    sched = tuple(schedule or model.patch_nums)
    cache = model.new_cache(sched) if use_cache else None
    first = sched[0] ** 2
    out = []
    for si, s in enumerate(scale_slices(sched)):
        x_BlC = None if si == 0 else x_BLC[:, s.start - first : s.stop - first]
        out.append(model.forward_scale(si, label_B, x_BlC, cache, schedule=None if use_cache else sched))
    return torch.cat(out, dim=1), cache


# ---- 1. one parallel pass == step-wise passes ---------------------------------------------------


@pytest.mark.parametrize("attn", ATTN_MODES)
def test_parallel_pass_equals_stepwise(attn):
    model = _model(attn)
    label_B, x_BLC = _inputs(model)
    with torch.no_grad():
        parallel_BLV = model(label_B, x_BLC)
        step_BLV, cache = _stepwise(model, label_B, x_BLC, use_cache=attn != "markov")
    assert parallel_BLV.shape == (3, num_tokens(SMALL_PNS), 32)
    torch.testing.assert_close(step_BLV, parallel_BLV, rtol=1e-5, atol=1e-5)
    K = len(SMALL_PNS)
    if attn == "markov":
        assert cache is None
        with torch.no_grad():  # a markov cache, if one is passed anyway, holds nothing
            cache = _stepwise(model, label_B, x_BLC)[1]
        assert cache.cached_scales == []
    elif attn == "causal":
        assert cache.cached_scales == list(range(K))
    else:
        assert cache.cached_scales == [K - 2, K - 1]
        with pytest.raises(ValueError, match="needs a KVCache"):
            model.forward_scale(0, label_B, None)


def test_stepwise_cache_order_and_rerun():
    model = _model("causal")
    label_B, x_BLC = _inputs(model)
    cache = model.new_cache()
    with torch.no_grad():
        model.forward_scale(0, label_B, None, cache)
        with pytest.raises(RuntimeError, match="lacks scales"):
            model.forward_scale(2, label_B, torch.randn(3, 9, 8), cache)
        x1 = x_BLC[:, :4]
        first = model.forward_scale(1, label_B, x1, cache)
        again = model.forward_scale(1, label_B, x1, cache)  # resampling re-runs a scale: same result
    torch.testing.assert_close(again, first)
    assert cache.cached_scales == [0, 1]


# ---- 2. markov has no cross-scale term ----------------------------------------------------------


@pytest.mark.parametrize(
    "attn,depth,changed",
    [
        ("markov", 2, {2}),
        ("markov_prev", 1, {2, 3}),
        ("markov_prev", 2, {2, 3, 4}),  # each block reaches one scale further back
        ("causal", 2, {2, 3, 4}),
    ],
)
def test_cross_scale_dependence(attn, depth, changed):
    model = _model(attn, depth=depth)
    label_B, x_BLC = _inputs(model)
    j, sl = 2, scale_slices(SMALL_PNS)
    x2_BLC = x_BLC.clone()
    x2_BLC[:, sl[j].start - 1 : sl[j].stop - 1] += 1.0  # the inputs of scale j (x omits the start token)
    with torch.no_grad():
        a, b = model(label_B, x_BLC), model(label_B, x2_BLC)
    for k, s in enumerate(sl):
        diff = (a[:, s] - b[:, s]).abs().max().item()
        if k in changed:
            assert diff > 1e-3, f"{attn}: scale {k} should depend on scale {j}"
        else:
            assert diff < 1e-6, f"{attn}: scale {k} must not depend on scale {j} (diff {diff})"


# ---- 3. the markov training path builds no L×L mask ---------------------------------------------


@pytest.mark.parametrize("attn", ["markov", "markov_prev", "causal"])
def test_attention_calls_per_scale(attn, monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model = _model(attn, patch_nums=VAR_PNS, depth=1, width=32).train()
    label_B, x_BLC = _inputs(model, batch=2)
    model(label_B, x_BLC).logsumexp(-1).mean().backward()
    L, sizes = num_tokens(VAR_PNS), [p * p for p in VAR_PNS]
    if attn == "causal":  # sanity: the spy sees VAR's dense mask
        assert calls == [(L, L, (L, L))]
        return
    assert all(mask is None for _, _, mask in calls)
    assert [q for q, _, _ in calls] == sizes
    keys = sizes if attn == "markov" else [sizes[0]] + [a + b for a, b in zip(sizes, sizes[1:])]
    assert [k for _, k, _ in calls] == keys
    if attn == "markov":  # query-key pairs = sum pn⁴ (39 % of VAR's block-causal pairs)
        assert sum(q * k for q, k, _ in calls) == sum(p**4 for p in VAR_PNS) == 110_468


# ---- 4. fewer-scale schedules -------------------------------------------------------------------


def test_subset_schedule_uses_matching_embeddings():
    subset = (1, 3, 5, 8, 13, 16)
    teacher = _model("markov", patch_nums=VAR_PNS, depth=1, width=32)
    label_B, x_BLC = _inputs(teacher, batch=2, schedule=subset)
    # Independent route: a model trained on the subset itself, given the teacher's matching embeddings.
    kw = dict(depth=1, width=32, num_heads=2, latent_dim=8, vocab_size=32, num_classes=10)
    student = build_generator("tiny", attn="markov", patch_nums=subset, **kw).eval()
    state = teacher.state_dict()
    idx = [VAR_PNS.index(p) for p in subset]
    sl = scale_slices(VAR_PNS)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, sl[i]] for i in idx], dim=1)
    state["level_embed.weight"] = state["level_embed.weight"][idx]
    student.load_state_dict(state)
    with torch.no_grad():
        got = teacher(label_B, x_BLC, schedule=subset)
        want = student(label_B, x_BLC)
        step = _stepwise(teacher, label_B, x_BLC, schedule=subset, use_cache=False)[0]
    assert got.shape == (2, num_tokens(subset), 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step, want, rtol=1e-5, atol=1e-5)


def test_bad_schedules_raise():
    model = _model("causal", patch_nums=VAR_PNS, depth=1, width=32)
    with pytest.raises(ValueError, match="not among the trained scales"):
        model.new_cache((1, 3, 7, 16))
    with pytest.raises(ValueError, match="must end at the last trained scale 16"):
        model(torch.zeros(1, dtype=torch.long), torch.zeros(1, num_tokens((1, 3, 5)) - 1, 8), schedule=(1, 3, 5))
    with pytest.raises(ValueError, match=r"x_BLC must have shape"):
        model(torch.zeros(1, dtype=torch.long), torch.zeros(1, 5, 8))


# ---- 5. VAR checkpoint import -------------------------------------------------------------------


def _var_state_dict(depth, C, H, V, Cvae, pns, num_classes, seed=3):
    """Random tensors under the key names and shapes of VAR's models/var.py + basic_var.py."""
    g = torch.Generator().manual_seed(seed)
    L, K = num_tokens(pns), len(pns)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "word_embed.weight": r(C, Cvae), "word_embed.bias": r(C),
        "class_emb.weight": r(num_classes + 1, C),
        "pos_start": r(1, pns[0] ** 2, C), "pos_1LC": r(1, L, C),
        "lvl_embed.weight": r(K, C),
        "lvl_1L": scale_ids(pns).view(1, L),
        "attn_bias_for_masking": torch.zeros(1, 1, L, L),
        "head_nm.ada_lin.1.weight": r(2 * C, C), "head_nm.ada_lin.1.bias": r(2 * C),
        "head.weight": r(V, C), "head.bias": r(V),
    }  # fmt: skip
    for i in range(depth):
        p = f"blocks.{i}."
        temp = torch.rand(1, H, 1, 1, generator=g) * 2 + 0.5
        temp[0, 0] = 5.0  # above the clamp at log 100
        sd.update({
            p + "attn.scale_mul_1H11": temp,
            p + "attn.q_bias": r(C), p + "attn.v_bias": r(C), p + "attn.zero_k_bias": torch.zeros(C),
            p + "attn.mat_qkv.weight": r(3 * C, C),
            p + "attn.proj.weight": r(C, C), p + "attn.proj.bias": r(C),
            p + "ffn.fc1.weight": r(4 * C, C), p + "ffn.fc1.bias": r(4 * C),
            p + "ffn.fc2.weight": r(C, 4 * C), p + "ffn.fc2.bias": r(C),
            p + "ada_lin.1.weight": r(6 * C, C), p + "ada_lin.1.bias": r(6 * C),
        })  # fmt: skip
    return sd


IMPORT_CFG = dict(depth=2, width=64, num_heads=2, vocab_size=48, latent_dim=8, patch_nums=(1, 2, 3, 4), num_classes=5)


def _import_config(**kw):
    return generator_config("tiny", **{**IMPORT_CFG, "attn": "causal", **kw})


def _ref_ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _ref_block(sd, i, x, cond, allowed_LL, H):
    """VAR's block from its equations: AdaLN, cosine attention with clamped temperature, GELU MLP."""
    p, (B, L, C), c = f"blocks.{i}.", x.shape, x.shape[-1] // H
    ada = F.silu(cond) @ sd[p + "ada_lin.1.weight"].T + sd[p + "ada_lin.1.bias"]
    g1, g2, s1, s2, b1, b2 = (ada[:, None, j * C : (j + 1) * C] for j in range(6))
    h = _ref_ln(x) * (1 + s1) + b1
    qkv_bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(C), sd[p + "attn.v_bias"]])  # k has no bias
    qkv = h @ sd[p + "attn.mat_qkv.weight"].T + qkv_bias
    q, k, v = (t.reshape(B, L, H, c).transpose(1, 2) for t in qkv.split(C, dim=-1))
    tau = torch.exp(torch.minimum(sd[p + "attn.scale_mul_1H11"], torch.tensor(math.log(100))))
    scores = (q / q.norm(dim=-1, keepdim=True) * tau) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-1, -2)
    att = torch.softmax(scores.masked_fill(~allowed_LL, float("-inf")), dim=-1) @ v
    x = x + (att.transpose(1, 2).reshape(B, L, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]) * g1
    h = _ref_ln(x) * (1 + s2) + b2
    mlp = _ref_gelu_tanh(h @ sd[p + "ffn.fc1.weight"].T + sd[p + "ffn.fc1.bias"])
    return x + (mlp @ sd[p + "ffn.fc2.weight"].T + sd[p + "ffn.fc2.bias"]) * g2


def _ref_var_forward(sd, label_B, x_BLC, pns, H, depth):
    """VAR's teacher-forced forward from its equations, with its block-causal mask (level_q >= level_k)."""
    cond = sd["class_emb.weight"][label_B]
    lvl = scale_ids(pns)
    h = torch.cat([cond[:, None] + sd["pos_start"], x_BLC @ sd["word_embed.weight"].T + sd["word_embed.bias"]], dim=1)
    h = h + sd["lvl_embed.weight"][lvl] + sd["pos_1LC"]
    allowed = lvl[:, None] >= lvl[None, :]
    for i in range(depth):
        h = _ref_block(sd, i, h, cond, allowed, H)
    ada = F.silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]
    C = h.shape[-1]
    h = _ref_ln(h) * (1 + ada[:, None, :C]) + ada[:, None, C:]
    return h @ sd["head.weight"].T + sd["head.bias"]


def test_var_import_keys_and_values():
    sd = _var_state_dict(2, 64, 2, 48, 8, (1, 2, 3, 4), 5)
    model = load_var_transformer(sd, _import_config())
    assert not model.training  # eval mode, like load_var_vae
    ours = model.state_dict()
    expected = {  # our name -> VAR name, written out independently of the importer's table
        "word_embed.weight": "word_embed.weight", "class_embed.weight": "class_emb.weight",
        "pos_start": "pos_start", "pos_embed": "pos_1LC", "level_embed.weight": "lvl_embed.weight",
        "head.ada.weight": "head_nm.ada_lin.1.weight", "head.ada.bias": "head_nm.ada_lin.1.bias",
        "head.out.weight": "head.weight", "head.out.bias": "head.bias", "word_embed.bias": "word_embed.bias",
    }  # fmt: skip
    for i in range(2):
        for ours_k, var_k in [
            ("attn.qkv.weight", "attn.mat_qkv.weight"), ("attn.q_bias", "attn.q_bias"), ("attn.v_bias", "attn.v_bias"),
            ("attn.proj.weight", "attn.proj.weight"), ("attn.proj.bias", "attn.proj.bias"),
            ("mlp.fc1.weight", "ffn.fc1.weight"), ("mlp.fc1.bias", "ffn.fc1.bias"),
            ("mlp.fc2.weight", "ffn.fc2.weight"), ("mlp.fc2.bias", "ffn.fc2.bias"),
            ("ada.weight", "ada_lin.1.weight"), ("ada.bias", "ada_lin.1.bias"),
        ]:  # fmt: skip
            expected[f"blocks.{i}.{ours_k}"] = f"blocks.{i}.{var_k}"
        torch.testing.assert_close(ours[f"blocks.{i}.attn.log_temp"], sd[f"blocks.{i}.attn.scale_mul_1H11"].view(-1))
    assert set(ours) == set(expected) | {f"blocks.{i}.attn.log_temp" for i in range(2)}
    for ours_k, var_k in expected.items():
        assert torch.equal(ours[ours_k], sd[var_k]), ours_k
    ignored = {"lvl_1L", "attn_bias_for_masking", "blocks.0.attn.zero_k_bias", "blocks.1.attn.zero_k_bias"}
    assert len(sd) - len(ignored) == len(ours)
    assert not any(p.is_meta for p in model.parameters())


def test_var_import_errors(tmp_path):
    sd = _var_state_dict(2, 64, 2, 48, 8, (1, 2, 3, 4), 5)
    with pytest.raises(ValueError, match="unexpected VAR keys.*blocks.0.attn.extra"):
        load_var_transformer({**sd, "blocks.0.attn.extra": torch.zeros(1)}, _import_config())
    missing = dict(sd)
    del missing["blocks.1.ffn.fc2.bias"]
    with pytest.raises(ValueError, match=r"without a value \['blocks.1.mlp.fc2.bias'\]"):
        load_var_transformer(missing, _import_config())
    with pytest.raises(ValueError, match="unexpected VAR keys.*blocks.1"):
        load_var_transformer(sd, _import_config(depth=1))
    with pytest.raises(ValueError, match="set num_classes"):
        load_var_transformer(sd, _import_config(num_classes=7))
    absent = tmp_path / "var_d16.pth"
    with pytest.raises(FileNotFoundError, match="var_d16.pth"):
        load_var_transformer(absent, "var-d16")
    torch.save(sd, absent)
    model = load_var_transformer(absent, "tiny", **IMPORT_CFG)
    assert model.config.attn == "causal"  # a preset name imports VAR's function by default
    assert torch.equal(model.head.out.weight, sd["head.weight"])


def test_var_import_computes_var_function():
    pns, H, depth = (1, 2, 3, 4), 2, 2
    sd = _var_state_dict(depth, 64, H, 48, 8, pns, 5)
    model = load_var_transformer(sd, _import_config()).eval()
    g = torch.Generator().manual_seed(4)
    label_B = torch.tensor([0, 3, 5])  # 5 = null class
    x_BLC = torch.randn(3, num_tokens(pns) - 1, 8, generator=g)
    with torch.no_grad():
        # one block against the block equation
        x_BLd = torch.randn(3, num_tokens(pns), 64, generator=g)
        cond_BD = model.embed_condition(label_B)
        lvl = scale_ids(pns)
        want_block = _ref_block(sd, 0, x_BLd, cond_BD, lvl[:, None] >= lvl[None, :], H)
        got_block = model.blocks[0](x_BLd, cond_BD, model._sequence_attention(pns, x_BLd.device))
        torch.testing.assert_close(got_block, want_block, rtol=1e-4, atol=1e-4)
        # the whole model, in parallel and step by step with the KV cache
        want = _ref_var_forward(sd, label_B, x_BLC, pns, H, depth)
        torch.testing.assert_close(model(label_B, x_BLC), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_stepwise(model, label_B, x_BLC)[0], want, rtol=1e-4, atol=1e-4)


# ---- 6. unconditional models and label dropout --------------------------------------------------


def test_unconditional_model():
    model = _model("markov", num_classes=1)
    assert model.null_class == 1 and model.class_embed.num_embeddings == 2
    label_B, x_BLC = _inputs(model)
    assert label_B.eq(0).all()
    with torch.no_grad():
        logits = model(label_B, x_BLC)
        cond_BD = model.embed_condition(label_B, with_null=True)  # CFG: cond rows, then null rows
        step = model.forward_scale(0, cond_BD, None)
    assert torch.isfinite(logits).all()
    assert step.shape == (6, 1, 32)
    torch.testing.assert_close(step[:3], logits[:, :1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        model(torch.tensor([0, 2, 0]), x_BLC)


def test_drop_labels_rate():
    model = _model("markov")
    label_B = torch.randint(0, 10, (20_000,))
    g = torch.Generator().manual_seed(0)
    dropped = model.drop_labels(label_B, 0.25, generator=g)
    is_null = dropped == model.null_class
    assert abs(is_null.float().mean().item() - 0.25) < 0.015
    assert torch.equal(dropped[~is_null], label_B[~is_null])
    assert torch.equal(model.drop_labels(label_B, 0.0), label_B)
    assert abs((model.drop_labels(label_B) == 10).float().mean().item() - 0.1) < 0.015  # config.cond_drop


# ---- 7. optimiser parameter groups --------------------------------------------------------------


def test_no_weight_decay_names_cover_norms_embeddings_and_biases():
    model = _model("markov")
    kept = model.no_weight_decay_names()
    names = {n for n, _ in model.named_parameters()}
    assert kept < names
    for name in ["level_embed.weight", "pos_start", "pos_embed", "blocks.0.attn.log_temp",
                 "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.1.mlp.fc1.bias", "head.out.bias"]:  # fmt: skip
        assert name in kept, name
    for name in ["word_embed.weight", "class_embed.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.weight",
                 "blocks.1.ada.weight", "head.ada.weight", "head.out.weight"]:  # fmt: skip  (VAR decays the class embedding)
        assert name not in kept, name


# ---- config, presets, init, gradients -----------------------------------------------------------


def test_config_validation_names_both_fields():
    with pytest.raises(ValueError, match=r"width \(100\) must be divisible by num_heads \(3\)"):
        GeneratorConfig(depth=3, width=100)
    with pytest.raises(ValueError, match="attn must be one of"):
        GeneratorConfig(attn="full")
    with pytest.raises(TypeError, match="unknown GeneratorConfig fields"):
        build_generator("tiny", widht=64)
    with pytest.raises(KeyError, match="unknown generator preset"):
        build_generator("var-d17")


def test_var_preset_sizes():
    cfg = generator_config("var-d16").resolved()
    assert (cfg.width, cfg.num_heads, cfg.vocab_size, len(cfg.patch_nums)) == (1024, 16, 4096, 10)
    assert cfg.drop_path == pytest.approx(0.1 * 16 / 24) and cfg.init.std == pytest.approx(math.sqrt(1 / 3072))
    with torch.device("meta"):  # no memory, no init cost
        model = build_generator("var-d16")
    n = sum(p.numel() for p in model.parameters())
    # per block: qkv 3w² + q/v bias 2w + temps H + proj w²+w + MLP 8w²+5w + AdaLN 6w²+6w
    w, d, V, L = 1024, 16, 4096, 680
    per_block = 18 * w * w + 14 * w + d
    top = 32 * w + w + 1001 * w + w + L * w + 10 * w + (2 * w * w + 2 * w) + (w * V + V)
    assert n == d * per_block + top
    assert 310.0e6 < n < 310.6e6  # VAR's README: 310M


def test_initialisation_follows_var():
    model = build_generator("tiny", depth=3, width=96, num_heads=3, init=InitConfig(adaln_gate=1e-5))
    C, std = 96, math.sqrt(1 / (3 * 96))
    ada = model.blocks[1].ada.weight
    assert ada[: 2 * C].std().item() == pytest.approx(std * 1e-5, rel=0.1)
    assert ada[2 * C :].std().item() == pytest.approx(std * 0.5, rel=0.1)
    assert model.blocks[0].mlp.fc2.weight.std().item() == pytest.approx(std / math.sqrt(6), rel=0.1)
    assert model.head.out.weight.std().item() == pytest.approx(std * 0.02, rel=0.1)
    assert model.pos_embed.std().item() == pytest.approx(std, rel=0.1)
    assert torch.equal(model.blocks[2].attn.log_temp, torch.full((3,), math.log(4.0)))
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.00625, 0.0125])  # 0.1·depth/24, linear
    assert model.blocks[0].ada.bias.abs().max() == 0


def test_every_parameter_gets_a_gradient():
    model = _model("markov").train()  # DDP without find_unused_parameters needs this
    label_B, x_BLC = _inputs(model)
    model(model.drop_labels(label_B), x_BLC).logsumexp(-1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_runs_with_low_precision_parameters_as_fsdp_mixed_precision_casts_them():
    gen = build_generator("tiny", patch_nums=(1, 2, 3), vocab_size=64, latent_dim=8).to(torch.bfloat16)
    x_BLC = torch.randn(2, 4 + 9, 8)  # float32 inputs, as the tokenizer produces them
    logits = gen(torch.tensor([0, 1]), x_BLC)
    assert logits.dtype == torch.float32 and logits.shape == (2, 14, 64) and torch.isfinite(logits).all()
    step = gen.forward_scale(1, torch.tensor([0, 1]), x_BLC[:, :4], cache=gen.new_cache())  # markov: no cache needed
    assert step.shape == (2, 4, 64)
