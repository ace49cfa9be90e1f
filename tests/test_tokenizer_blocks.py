"""Stage-1 building blocks: encoder/decoder, multi-scale quantizer, tokenizer, importer, GAN and LPIPS."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from srdd_lightning.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from srdd_lightning.models.perceptual import build_lpips
from srdd_lightning.models.quantizer import MultiScaleResidualQuantizer, codebook_usage
from srdd_lightning.models.scales import num_tokens
from srdd_lightning.models.tokenizer import (
    TOKENIZER_PRESETS,
    VAR_PATCH_NUMS_256,
    MultiScaleTokenizer,
    TokenizerConfig,
    build_tokenizer,
)
from srdd_lightning.models.vae import num_groups_for
from srdd_lightning.models.var_import import convert_var_vae_state_dict, load_var_vae

VAR10 = VAR_PATCH_NUMS_256
SUBSET6 = (1, 3, 5, 8, 13, 16)


def _quantizer(patch_nums=VAR10, V=64, C=8, **kw) -> MultiScaleResidualQuantizer:
    torch.manual_seed(0)
    return MultiScaleResidualQuantizer(V, C, patch_nums, **kw).eval()


def _random_tokens(patch_nums, B=2, V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (B, p, p), generator=g) for p in patch_nums]


@pytest.fixture(scope="module")
def tiny() -> MultiScaleTokenizer:
    torch.manual_seed(0)
    return build_tokenizer("tiny").eval()


@pytest.fixture(scope="module")
def tok16() -> MultiScaleTokenizer:
    """Tiny network at 64 px -> 16×16 latent, so VAR's 10-scale schedule applies."""
    torch.manual_seed(0)
    return build_tokenizer("tiny", image_size=64, patch_nums=VAR10, vocab_size=64).eval()


def _imgs(B=2, size=32, seed=0):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------
# residual quantization
# ------------------------------------------------------------------------------------------------


def test_residual_identity_quantizer():
    q = _quantizer()
    f = torch.randn(2, 8, 16, 16)
    tokens, fhats = (lambda o: (o.tokens, o.f_hats))(q.quantize(f))
    assert [tuple(t.shape) for t in tokens] == [(2, p, p) for p in VAR10]
    # f_hat is the sum of the per-scale contributions phi_k(up(codebook[r_k])).
    parts = [q.contribution(t, k, 16) for k, t in enumerate(tokens)]
    torch.testing.assert_close(torch.stack(parts).sum(0), fhats[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.tokens_to_fhat(tokens), fhats[-1])
    for a, b in zip(q.tokens_to_fhat(tokens, cumulative=True), fhats):
        torch.testing.assert_close(a, b)
    # the training forward quantizes the same way: same tokens, same f_hat value (straight-through).
    out = q(f)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, tokens))
    torch.testing.assert_close(out.f_hat, fhats[-1], atol=1e-5, rtol=1e-5)


def test_residual_identity_tokenizer(tiny):
    x = _imgs()
    tokens = tiny.img_to_tokens(x)
    f_hat_own = tiny.quantizer(tiny.encode(x)).f_hat
    torch.testing.assert_close(tiny.tokens_to_fhat(tokens), f_hat_own, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiny.tokens_to_img(tokens), tiny.decode(f_hat_own), atol=1e-5, rtol=1e-5)
    assert tiny.tokens_to_img(tokens).abs().max() <= 1.0


def test_quantizer_chooses_the_nearest_code():
    q = _quantizer(patch_nums=(2,), V=5, C=3, phi_mode="none")
    with torch.no_grad():
        q.codebook.weight.copy_(torch.arange(15.0).view(5, 3))
    f = q.codebook.weight[torch.tensor([[4, 1], [0, 3]])].permute(2, 0, 1)[None] + 0.1  # (1, 3, 2, 2)
    (r,) = q.quantize(f).tokens
    assert r.tolist() == [[[4, 1], [0, 3]]]


def test_lookup_l2_vs_cosine():
    # x = (0.5, 1): nearest in l2 is e0; best aligned is e2 (a raw dot product would pick e1).
    books = torch.tensor([[1.0, 0.0], [100.0, 0.0], [0.0, 3.0]])
    x = torch.tensor([[0.5, 1.0]])
    l2, cos = _quantizer((1,), V=3, C=2, lookup="l2"), _quantizer((1,), V=3, C=2, lookup="cosine")
    for q in (l2, cos):
        with torch.no_grad():
            q.codebook.weight.copy_(books)
    assert l2.nearest(x).item() == 0 and cos.nearest(x).item() == 2
    for lookup in ("l2", "cosine"):
        tok = build_tokenizer("tiny-16", lookup=lookup)
        recon, loss, tokens = tok(_imgs(size=16))
        assert recon.shape == (2, 3, 16, 16) and torch.isfinite(loss) and len(tokens) == 4


def test_quantizer_follows_design_equations():
    """One step by hand (DESIGN §2.1): area-down the rest, nearest code, bicubic-up, phi, accumulate."""
    q = _quantizer(patch_nums=(1, 2, 4), V=16, C=3, num_phi=3, phi_rho=0.3)
    f = torch.randn(2, 3, 4, 4)
    tokens, fhats = (lambda o: (o.tokens, o.f_hats))(q.quantize(f))
    e = q.codebook.weight.detach()

    def nearest(z_BChw):
        d = ((z_BChw.permute(0, 2, 3, 1)[..., None, :] - e) ** 2).sum(-1)
        return d.argmin(-1)

    def phi(k, x):
        return 0.7 * x + 0.3 * F.conv2d(x, q.phis[k].conv.weight, q.phis[k].conv.bias, padding=1)

    phi_of = {0: 0, 1: 1, 2: 2}  # 3 scales, 3 ticks (1/9, 1/2, 8/9): relative positions 0, 0.5, 1
    rest, f_hat = f.clone(), torch.zeros_like(f)
    for k, pn in enumerate((1, 2, 4)):
        z = F.avg_pool2d(rest, 4 // pn)  # area downsampling by an integer factor = average pooling
        assert torch.equal(tokens[k], nearest(z)), k
        code = e[tokens[k]].permute(0, 3, 1, 2)
        up = F.interpolate(code, size=(4, 4), mode="bicubic", align_corners=False) if pn != 4 else code
        h = phi(phi_of[k], up)
        f_hat, rest = f_hat + h, rest - h
        torch.testing.assert_close(fhats[k], f_hat, atol=1e-5, rtol=1e-5)


def test_vq_loss_gradients_go_where_they_belong():
    """beta·MSE(sg[f_hat], f) trains the encoder only; MSE(f_hat, sg[f]) trains the codebook and phi only."""
    q = _quantizer(patch_nums=(1, 2, 4), V=16, C=3, beta=0.25).train()
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    q(f).vq_loss.backward()
    tokens, fhats = (lambda o: (o.tokens, o.f_hats))(q.quantize(f.detach()))
    torch.testing.assert_close(f.grad, sum(0.25 * 2 * (f.detach() - fh) / f.numel() for fh in fhats) / 3)
    got = q.codebook.weight.grad.clone()
    q.zero_grad()
    ref = sum(F.mse_loss(fh, f.detach()) for fh in q.tokens_to_fhat(tokens, cumulative=True)) / 3
    ref.backward()
    torch.testing.assert_close(got, q.codebook.weight.grad)


def test_straight_through_output():
    q = _quantizer(patch_nums=(1, 2, 4), V=16, C=3).train()
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = q(f)
    (out.f_hat * torch.arange(96.0).view(2, 3, 4, 4)).sum().backward()
    torch.testing.assert_close(f.grad, torch.arange(96.0).view(2, 3, 4, 4))  # d f_hat / d f = identity
    assert q.codebook.weight.grad is None  # codes learn only from the VQ loss


def test_training_forward_gradients():
    tok = build_tokenizer("tiny-16").train()
    recon, vq_loss, _ = tok(_imgs(size=16))
    (F.mse_loss(recon, _imgs(size=16)) + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "quantizer.codebook.weight", "quantizer.phis.0.conv.weight", "decoder.conv_out.weight"):
        g = tok.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert tok.last_layer is tok.decoder.conv_out.weight


def test_quantizer_runs_in_fp32_under_autocast():
    tok = build_tokenizer("tiny-16").train()
    x = _imgs(size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, vq_loss, tokens = tok(x)
        f = tok.encode(x)
        assert tok.tokens_to_fhat(tok.img_to_tokens(x)).dtype == torch.float32
    assert f.dtype == torch.bfloat16 and vq_loss.dtype == torch.float32 and torch.isfinite(recon).all()


def test_vq_loss_formula():
    q = _quantizer(patch_nums=(1, 2, 4), beta=0.25).train()
    f = torch.randn(3, 8, 4, 4)
    out = q(f)
    _, fhats = (lambda o: (o.tokens, o.f_hats))(q.quantize(f))
    expect = sum(1.25 * F.mse_loss(fh, f) for fh in fhats) / 3  # beta·mse + mse on the cumulative f_hat
    torch.testing.assert_close(out.vq_loss, expect, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# phi selection
# ------------------------------------------------------------------------------------------------


def _phi_used(q: MultiScaleResidualQuantizer, patch_nums=None) -> list[int]:
    """Which phi each scale applies, read off tokens_to_fhat with phi_k(x) = 0.5·x + 0.5·(k + 1) and a zero codebook."""
    with torch.no_grad():
        q.codebook.weight.zero_()
        for k, phi in enumerate(q.phis):
            phi.conv.weight.zero_()
            phi.conv.bias.fill_(k + 1.0)
    pns = patch_nums or q.patch_nums
    fhats = q.tokens_to_fhat([torch.zeros(1, p, p, dtype=torch.long) for p in pns], patch_nums, cumulative=True)
    steps = [fhats[0]] + [b - a for a, b in zip(fhats, fhats[1:])]
    return [round(s.mean().item() / 0.5) - 1 for s in steps]


def test_phi_partial_mapping_var_10_scales():
    q = _quantizer(phi_mode="partial", num_phi=4)
    assert _phi_used(q) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # {0,1} {2,3,4} {5,6} {7,8,9}
    # a subset schedule keeps each scale's phi from the FULL trained schedule (trained indices 0,2,4,6,8,9)
    assert _phi_used(q, SUBSET6) == [0, 1, 1, 2, 3, 3]


def test_phi_modes():
    assert _phi_used(_quantizer(phi_mode="per_scale")) == list(range(10))
    assert _phi_used(_quantizer(phi_mode="shared")) == [0] * 10
    q = _quantizer(phi_mode="none")
    assert len(q.phis) == 0
    (t,) = _random_tokens((16,), V=64)[:1]
    torch.testing.assert_close(q.contribution(t, 9, 16), q.embed(t))


# ------------------------------------------------------------------------------------------------
# teacher forcing, sampler step, schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch_nums", [None, SUBSET6])
def test_teacher_forcing_equals_next_state_iteration(tok16, patch_nums):
    pns = patch_nums or VAR10
    tokens = tok16.img_to_tokens(_imgs(size=64), patch_nums)
    x_BLC = tok16.teacher_forcing_inputs(tokens, patch_nums)
    assert x_BLC.shape == (2, num_tokens(pns) - 1, tok16.latent_dim)
    f_hat = torch.zeros(2, tok16.latent_dim, 16, 16)
    chunks = []
    for si in range(len(pns)):
        before = f_hat.clone()
        f_new, nxt = tok16.next_state(si, f_hat, tokens[si], patch_nums)
        assert torch.equal(f_hat, before)  # no in-place update of the caller's state
        if si == len(pns) - 1:
            assert nxt is None
        else:
            assert nxt.shape == (2, tok16.latent_dim, pns[si + 1], pns[si + 1])
            chunks.append(nxt.flatten(2).transpose(1, 2))
        f_hat = f_new
    torch.testing.assert_close(x_BLC, torch.cat(chunks, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(f_hat, tok16.tokens_to_fhat(tokens, patch_nums), atol=1e-6, rtol=1e-5)
    # and it is the coarsened cumulative f_hat, not the previous scale's tokens
    cum = tok16.tokens_to_fhat(tokens, patch_nums, cumulative=True)
    k = 3
    start = num_tokens(pns[1:k]) if k > 1 else 0
    expect = F.interpolate(cum[k - 1], size=(pns[k], pns[k]), mode="area").flatten(2).transpose(1, 2)
    torch.testing.assert_close(x_BLC[:, start : start + pns[k] ** 2], expect, atol=1e-6, rtol=1e-5)


def test_subset_schedules(tok16):
    x = _imgs(size=64)
    tokens = tok16.img_to_tokens(x, SUBSET6)
    assert [t.shape[-1] for t in tokens] == list(SUBSET6)
    assert tok16.tokens_to_img(tokens, SUBSET6).shape == (2, 3, 64, 64)
    assert tok16.teacher_forcing_inputs(tokens, SUBSET6).shape == (2, 524 - 1, tok16.latent_dim)
    with pytest.raises(ValueError, match="not among the trained scales"):
        tok16.img_to_tokens(x, (1, 3, 7, 16))
    with pytest.raises(ValueError, match="must end at the last trained scale"):
        tok16.img_to_tokens(x, (1, 2, 3))
    with pytest.raises(ValueError, match="token maps"):
        tok16.tokens_to_fhat(tokens)  # 6 maps for the 10-scale schedule


def test_any_schedule_ending_at_latent_size():
    tok = build_tokenizer("tiny", patch_nums=(2, 5, 8))
    x = _imgs()
    assert tok.reconstruct(x).shape == x.shape
    assert tok.teacher_forcing_inputs(tok.img_to_tokens(x)).shape == (2, 25 + 64, 16)
    one = build_tokenizer("tiny", patch_nums=(8,))
    assert one.teacher_forcing_inputs(one.img_to_tokens(x)).shape == (2, 0, 16)


def test_bad_inputs_raise(tiny):
    with pytest.raises(ValueError, match="image_size=32"):
        tiny.encode(_imgs(size=16))
    tokens = tiny.img_to_tokens(_imgs())
    with pytest.raises(ValueError, match=r"token map 2 must have shape \(2, 3, 3\)"):
        tiny.tokens_to_fhat(tokens[:2] + [tokens[2][:, :2]] + tokens[3:])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        tiny.tokens_to_fhat([t + 512 for t in tokens])
    with pytest.raises(ValueError, match="pn=3"):
        tiny.next_state(2, torch.zeros(2, 16, 8, 8), tokens[1])
    with pytest.raises(ValueError, match="latent"):
        tiny.decode(torch.zeros(2, 16, 4, 4))


def test_config_validation_names_both_fields():
    with pytest.raises(ValueError, match=r"patch_nums.*image_size"):
        TokenizerConfig(image_size=64, channel_mults=(1, 2, 2), patch_nums=(1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"image_size=30.*channel_mults"):
        TokenizerConfig(image_size=30, channel_mults=(1, 2, 2), patch_nums=(1, 7))
    with pytest.raises(ValueError, match="phi_mode"):
        TokenizerConfig(phi_mode="half")
    with pytest.raises(KeyError, match="unknown tokenizer preset"):
        build_tokenizer("nope")
    with pytest.raises(TypeError, match="unknown TokenizerConfig field"):
        build_tokenizer("tiny", chanels=8)
    assert TokenizerConfig(channel_mults=[1, 1, 2, 2, 4], patch_nums=list(VAR10)) == TokenizerConfig()
    assert {"var-vae-f16", "tiny", "tiny-16"} <= set(TOKENIZER_PRESETS)


def test_group_norm_fallback():
    assert num_groups_for(160) == 32 and num_groups_for(64) == 32
    assert num_groups_for(16) == 16 and num_groups_for(48) == 24 and num_groups_for(32, 8) == 8


def test_state_dict_roundtrip(tiny):
    buf = io.BytesIO()
    torch.save(tiny.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    other = MultiScaleTokenizer(tiny.config).eval()
    x = _imgs()
    assert not torch.allclose(other.reconstruct(x), tiny.reconstruct(x))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(other.img_to_tokens(x), tiny.img_to_tokens(x)))
    assert torch.equal(other.reconstruct(x), tiny.reconstruct(x))


# ------------------------------------------------------------------------------------------------
# anti-collapse tools
# ------------------------------------------------------------------------------------------------


def test_codebook_usage_hand_built():
    tokens = [
        torch.tensor([[[3]], [[3]]]),  # 1×1, B=2: one code, at most 2 reachable
        torch.tensor([[[0, 1], [2, 3]], [[0, 1], [2, 3]]]),  # 2×2: 4 codes evenly, at most 8 reachable
        torch.tensor([[[5, -1], [-1, -1]]]),  # ids < 0 (dropped scales) are ignored
    ]
    u = codebook_usage(tokens, vocab_size=16)
    assert u[0] == {"used": 1.0, "usage": 1 / 16, "max_possible": 2.0, "usage_of_possible": 0.5, "perplexity": pytest.approx(1.0)}
    assert u[1]["used"] == 4 and u[1]["usage"] == 0.25 and u[1]["max_possible"] == 8 and u[1]["usage_of_possible"] == 0.5
    assert u[1]["perplexity"] == pytest.approx(4.0)
    assert u[2]["used"] == 1 and u[2]["max_possible"] == 1 and u[2]["usage_of_possible"] == 1.0
    big = codebook_usage([torch.arange(40).view(1, 1, 40) % 8], vocab_size=8)  # 40 tokens, V = 8 caps it
    assert big[0]["max_possible"] == 8 and big[0]["usage_of_possible"] == 1.0 and big[0]["perplexity"] == pytest.approx(8.0)


def test_scale_dropout_truncates():
    q = _quantizer(patch_nums=(1, 2, 4, 8), scale_dropout=1.0).train()
    f = torch.randn(16, 8, 8, 8)
    torch.manual_seed(1)
    out = q(f)
    _, fhats = (lambda o: (o.tokens, o.f_hats))(q.quantize(f))
    n_keep = out.keep_BK.sum(1)
    assert (n_keep >= 1).all() and (n_keep < 4).all() and len(set(n_keep.tolist())) > 1
    for b in range(16):
        k = int(n_keep[b])
        assert out.keep_BK[b, :k].all() and not out.keep_BK[b, k:].any()  # a prefix of the scales
        assert all((t[b] >= 0).all() for t in out.tokens[:k]) and all((t[b] == -1).all() for t in out.tokens[k:])
        torch.testing.assert_close(out.f_hat[b], fhats[k - 1][b], atol=1e-5, rtol=1e-5)  # truncated f_hat
    assert q.eval()(f).keep_BK.all()  # never in eval
    assert _quantizer(patch_nums=(1, 2, 4, 8)).train()(f).keep_BK.all()  # p = 0


def test_dead_code_restart_replaces_only_dead_codes():
    q = _quantizer(patch_nums=(1, 2), V=8, C=4)
    before = q.codebook.weight.detach().clone()
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[2, 5]] = True
    candidates = 100 + torch.randn(3, 4, 2, 2)  # (B, C, h, w) encoder outputs, far from the codebook
    n = q.restart_dead_codes(dead, candidates, generator=torch.Generator().manual_seed(0))
    after = q.codebook.weight.detach()
    assert n == 2
    assert torch.equal(after[~dead], before[~dead])
    assert (after[dead] > 90).all()  # drawn from the candidates
    assert q.restart_dead_codes(torch.zeros(8, dtype=torch.bool), candidates) == 0
    with pytest.raises(ValueError, match="dead_V"):
        q.restart_dead_codes(torch.zeros(7, dtype=torch.bool), candidates)


# ------------------------------------------------------------------------------------------------
# VAR's released tokenizer: architecture and importer
# ------------------------------------------------------------------------------------------------


def var_vae_shapes(ch=160, mults=(1, 1, 2, 2, 4), n_res=2, z=32, V=4096, n_phi=4, K=10) -> dict[str, tuple]:
    """Every key of VAR's ``vae_ch160v4096z32.pth`` with its shape, written from reading VAR's models/*.py."""
    s: dict[str, tuple] = {}

    def conv(name, cin, cout, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3), norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c), conv(f"{name}.qkv", c, 3 * c, 1), conv(f"{name}.proj_out", c, c, 1)

    def mid(side, c):
        res(f"{side}.mid.block_1", c, c), attn(f"{side}.mid.attn_1", c), res(f"{side}.mid.block_2", c, c)

    last = len(mults) - 1
    conv("encoder.conv_in", 3, ch, 3)
    cin = ch
    for i, m in enumerate(mults):
        for j in range(n_res):
            res(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i == last:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    mid("encoder", cin)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z, 3)
    cin = ch * mults[-1]
    conv("decoder.conv_in", z, cin, 3)
    mid("decoder", cin)
    for i in reversed(range(len(mults))):
        for j in range(n_res + 1):
            res(f"decoder.up.{i}.block.{j}", cin, ch * mults[i])
            cin = ch * mults[i]
            if i == last:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
    conv("quant_conv", z, z, 3), conv("post_quant_conv", z, z, 3)
    s["quantize.embedding.weight"] = (V, z)
    for k in range(n_phi):
        conv(f"quantize.quant_resi.qresi_ls.{k}", z, z, 3)  # Phi subclasses nn.Conv2d: no ".conv." level
    s["quantize.ema_vocab_hit_SV"] = (K, V)
    return s


@pytest.fixture(scope="module")
def var_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in var_vae_shapes().items()}


def test_var_vae_f16_matches_var_architecture():
    model = build_tokenizer("var-vae-f16")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 108.9e6) < 0.05e6, n
    n_var = sum(torch.Size(s).numel() for k, s in var_vae_shapes().items() if k != "quantize.ema_vocab_hit_SV")
    assert n == n_var
    assert model.latent_size == 16 and model.downsample == 16 and num_tokens(model.patch_nums) == 680


def test_load_var_vae(var_sd, tmp_path):
    path = tmp_path / "vae_ch160v4096z32.pth"
    torch.save(var_sd, path)
    model = load_var_vae(path)  # strict: raises on any missing / unexpected / misshapen key
    assert not model.training
    ours = model.state_dict()
    spot = {  # hand-written correspondences (decoder levels run coarse -> fine; VAR indexes up.* by resolution)
        "decoder.up.4.attn.2.proj_out.weight": "decoder.levels.0.attns.2.proj.weight",
        "decoder.up.1.block.0.nin_shortcut.weight": "decoder.levels.3.blocks.0.shortcut.weight",
        "decoder.up.1.upsample.conv.bias": "decoder.levels.3.resample.conv.bias",
        "decoder.up.0.block.2.conv2.weight": "decoder.levels.4.blocks.2.conv2.weight",
        "encoder.down.3.downsample.conv.weight": "encoder.levels.3.resample.conv.weight",
        "encoder.down.4.attn.1.qkv.weight": "encoder.levels.4.attns.1.qkv.weight",
        "encoder.mid.attn_1.norm.bias": "encoder.mid.attn.norm.bias",
        "decoder.mid.block_2.conv1.weight": "decoder.mid.res2.conv1.weight",
        "quantize.embedding.weight": "quantizer.codebook.weight",
        "quantize.quant_resi.qresi_ls.2.weight": "quantizer.phis.2.conv.weight",
        "quant_conv.weight": "quant_conv.weight",
        "decoder.conv_out.bias": "decoder.conv_out.bias",
    }
    for var_key, our_key in spot.items():
        assert torch.equal(ours[our_key], var_sd[var_key]), var_key
    # every VAR tensor landed somewhere, each exactly once
    ours_flat = {v.sum().item() for v in ours.values()}
    assert len(ours) == len(var_sd) - 1
    assert all(var_sd[k].sum().item() in ours_flat for k in var_sd if k != "quantize.ema_vocab_hit_SV")
    # the same weights serve VAR's 512 px schedule
    m512 = load_var_vae(var_sd, image_size=512, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    assert m512.latent_size == 32 and torch.equal(m512.quantizer.codebook.weight, var_sd["quantize.embedding.weight"])


def test_load_var_vae_errors(var_sd, tmp_path):
    missing = tmp_path / "nowhere" / "vae_ch160v4096z32.pth"
    with pytest.raises(FileNotFoundError, match="vae_ch160v4096z32.pth"):
        load_var_vae(missing)
    model = build_tokenizer("var-vae-f16")
    with pytest.raises(ValueError, match=r"1 unexpected \['encoder.extra.weight'\]"):
        convert_var_vae_state_dict({**var_sd, "encoder.extra.weight": torch.zeros(1)}, model)
    partial = {k: v for k, v in var_sd.items() if k != "decoder.up.2.block.1.norm2.bias"}
    with pytest.raises(ValueError, match=r"1 missing \['decoder.levels.2.blocks.1.norm2.bias'\]"):
        convert_var_vae_state_dict(partial, model)


# ------------------------------------------------------------------------------------------------
# discriminator and LPIPS
# ------------------------------------------------------------------------------------------------


def test_patch_discriminator_and_hinge():
    d = PatchDiscriminator()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in d.modules())
    assert d(_imgs()).shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="too small"):
        d(_imgs(size=16))
    assert PatchDiscriminator(n_layers=2, norm="none")(_imgs(size=16)).shape == (2, 1, 2, 2)
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)
    w = torch.ones(3, requires_grad=True)
    lam = adaptive_gan_weight((4 * w).sum(), (2 * w).sum(), w)  # ‖∇rec‖ / ‖∇g‖ = 2
    assert lam.item() == pytest.approx(2.0, rel=1e-3)


def reference_lpips(vgg_path, x_B3HW, y_B3HW) -> torch.Tensor:
    """LPIPS-VGG written out from Zhang et al. (2018), independently of torchmetrics' code: ImageNet scaling of
    inputs in [-1, 1], VGG16 relu1_2..relu5_3, unit-normalised channels, the v0.1 linear heads (the file torchmetrics
    ships), spatial mean, sum over layers."""
    import inspect

    import torchmetrics.functional.image.lpips as tm_lpips
    import torchvision

    heads = torch.load(Path(inspect.getfile(tm_lpips)).parent / "lpips_models" / "vgg.pth", map_location="cpu")
    vgg = torchvision.models.vgg16(weights=None).features[:30]
    vgg.load_state_dict({k.removeprefix("features."): v for k, v in torch.load(vgg_path).items()
                         if k.startswith("features.") and int(k.split(".")[1]) < 30})  # fmt: skip
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy, d = (x_B3HW - shift) / scale, (y_B3HW - shift) / scale, 0
    for i, (a, b) in enumerate(zip((0, 4, 9, 16, 23), (4, 9, 16, 23, 30))):
        hx, hy = vgg[a:b](hx), vgg[a:b](hy)
        nx, ny = hx / (hx.norm(dim=1, keepdim=True) + 1e-10), hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
        d = d + (heads[f"lin{i}.model.1.weight"] * (nx - ny).square()).sum(1).mean((1, 2))
    return d


def test_lpips_is_torchmetrics_network_with_the_backbone_from_the_file(lpips_files):
    vgg, _ = lpips_files
    lp = build_lpips(vgg)
    x, y = _imgs(seed=0), _imgs(seed=1)
    assert lp(x, x).abs().max() < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(lp(x, y).flatten(), reference_lpips(vgg, x, y), rtol=1e-4, atol=1e-6)
    y.requires_grad_(True)
    lp(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in lp.parameters())


def test_lpips_missing_or_wrong_file(lpips_files, tmp_path, monkeypatch):
    monkeypatch.delenv("SRDD_LPIPS_VGG_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*model\.init_args\.loss\.lpips_vgg_path"):
        build_lpips(None)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth.*lpips_vgg_path"):
        build_lpips(tmp_path / "absent.pth")
    torch.save({"lin0.model.1.weight": torch.zeros(1)}, tmp_path / "heads.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        build_lpips(tmp_path / "heads.pth")
    monkeypatch.setenv("SRDD_LPIPS_VGG_PATH", str(lpips_files[0]))
    assert build_lpips() is not None


def test_tokens_to_fhat_is_contiguous_and_decodes_like_var():
    """VAR accumulates f_hat in place into a contiguous (B, C, h, w) latent. A channels_last f_hat (what a permuted
    embedding gives) changes the decoder's conv numerics by ~2e-5 on var-vae-f16; ours must stay within 1e-5."""
    torch.manual_seed(0)
    tok = build_tokenizer("var-vae-f16").eval()
    with torch.no_grad():
        for p in tok.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
    q = tok.quantizer
    tokens = _random_tokens(q.patch_nums, B=1, V=q.vocab_size)
    with torch.no_grad():
        f_ours = tok.tokens_to_fhat(tokens)
        f_var = torch.zeros(1, q.dim, 16, 16)  # VAR's layout: code vectors (B, L, C) -> (B, C, pn, pn), added in place
        for k, (t, pn) in enumerate(zip(tokens, q.patch_nums)):
            h = q.codebook.weight[t.reshape(1, -1)].transpose(1, 2).reshape(1, q.dim, pn, pn)
            f_var.add_(q.phi_for(k)(F.interpolate(h, size=(16, 16), mode="bicubic") if pn != 16 else h))
        assert f_ours.is_contiguous() and all(f.is_contiguous() for f in tok.tokens_to_fhat(tokens, cumulative=True))
        assert all(f.is_contiguous() for f in q.quantize(f_var).f_hats)
        torch.testing.assert_close(f_ours, f_var, atol=1e-6, rtol=0)
        diff = (tok.decode(f_ours, clamp=False) - tok.decode(f_var, clamp=False)).abs().max().item()
    assert diff <= 1e-5, diff
