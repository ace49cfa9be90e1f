"""The fast path (issue 14): attention backends, the cached masks, compile / fused AdamW options, VAR's bf16
residual stream, drop-path draws in one transfer, the EMA update without host syncs, tokens/s logging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_weights

from srdd_lightning.callbacks.ema import EMA, _ema_update
from srdd_lightning.callbacks.throughput import Throughput
from srdd_lightning.models.scales import num_tokens
from srdd_lightning.models.transformer import ATTN_MODES, VARTransformer, build_generator

PNS = (1, 2, 3, 4, 6)


def _model(attn: str, depth: int = 2, drop_path: float = 0.0) -> VARTransformer:
    torch.manual_seed(0)
    model = build_generator("tiny", attn=attn, depth=depth, width=64, num_heads=2, latent_dim=8, vocab_size=32,
                            num_classes=10, patch_nums=PNS, drop_path=drop_path)  # fmt: skip
    randomize_weights(model)
    return model


def _inputs(model: VARTransformer, batch: int = 3):
    g = torch.Generator().manual_seed(2)
    label_B = torch.randint(0, 10, (batch,), generator=g)
    x_BLC = torch.randn(batch, num_tokens(PNS) - 1, model.config.latent_dim, generator=g)
    return label_B, x_BLC


@pytest.mark.parametrize("attn", ATTN_MODES)
def test_flex_attention_gives_the_sdpa_numbers(attn):
    """One block-sparse flex_attention call == SDPA per scale (markov) / with the dense mask (causal), fp32.
    (flex_attention has no backward on the CPU; the gradients are compared in test_gpu.py.)"""
    outs = {}
    for backend in ("sdpa", "flex"):
        model = _model(attn).eval()
        model.attention = backend
        with torch.no_grad():
            outs[backend] = model(*_inputs(model))
    torch.testing.assert_close(outs["sdpa"], outs["flex"], atol=2e-5, rtol=1e-4)


def test_flex_training_on_the_cpu_is_refused_plainly():
    model = _model("markov").train()
    model.attention = "flex"
    with pytest.raises(ValueError, match="no backward on the CPU.*attention"):
        model(*_inputs(model))


def test_flex_mask_is_the_mask_of_each_mode():
    """The BlockMask keeps exactly the query-key pairs of the mode (a wrong mask_mod changes the logits)."""
    causal, markov = _model("causal").eval(), _model("markov").eval()
    markov.load_state_dict(causal.state_dict())
    label_B, x_BLC = _inputs(causal)
    for m in (causal, markov):
        m.attention = "flex"
    with torch.no_grad():
        assert not torch.allclose(causal(label_B, x_BLC), markov(label_B, x_BLC), atol=1e-3)


def test_attention_plans_are_built_once_per_schedule_and_device():
    model = _model("causal").eval()
    label_B, x_BLC = _inputs(model)
    with torch.no_grad():
        model(label_B, x_BLC)
        plan = model._sequence_attention(PNS, x_BLC.device)
        model(label_B, x_BLC)
    assert model._sequence_attention(PNS, x_BLC.device) is plan and len(model._plans) == 1
    model.attention = "fast"
    with pytest.raises(ValueError, match="attention must be one of"):
        model(label_B, x_BLC)


def test_auto_attention_is_sdpa_on_the_cpu():
    model = _model("markov")
    model._sequence_attention(PNS, torch.device("cpu"))
    assert [k[2] for k in model._plans] == ["sdpa"]


def test_residual_stream_runs_in_the_autocast_dtype_as_var():
    """Under bf16 autocast the blocks receive a bf16 residual stream (VAR casts after the embeddings); the
    embeddings and the logits stay fp32; outside autocast everything is fp32."""
    model = _model("markov").eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, args[1].dtype)))
    label_B, x_BLC = _inputs(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(label_B, x_BLC)
        step = model.forward_scale(0, label_B, None)
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2 and logits.dtype == step.dtype == torch.float32
    seen.clear()
    with torch.no_grad():
        model(label_B, x_BLC)
    assert seen == [(torch.float32, torch.float32)]


def test_drop_path_masks_come_from_the_generator_in_one_draw():
    """Training draws every block's drop-path uniforms at once from the CPU generator: the same seed gives the same
    logits, another seed other masks, and the draws do not touch the global RNG."""
    model = _model("markov", depth=4, drop_path=0.5).train()
    label_B, x_BLC = _inputs(model, batch=8)

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(123)
        return model(label_B, x_BLC, generator=torch.Generator().manual_seed(seed)).detach()

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    state = torch.random.get_rng_state()
    model(label_B, x_BLC, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())


def test_ema_update_without_host_syncs_matches_averaged_models_formula():
    """EMA.on_train_batch_end: first update copies, then lerp with min(decay, (1+n)/(10+n)); n_averaged counts."""

    class Trainer:
        global_step = 0

    class Avg(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
            self.register_buffer("n_averaged", torch.tensor(0))

    cb = EMA(decay=0.9)
    model = torch.nn.Linear(3, 2)
    cb._average_model = Avg(torch.nn.Linear(3, 2))
    cb._latest_update_step = 0
    expected = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer()
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        trainer.global_step = step
        cb.on_train_batch_end(trainer, model, None, None, 0)
        n = step - 1
        if n == 0:
            expected = [p.detach().clone() for p in model.parameters()]
        else:
            d = min(0.9, (1 + n) / (10 + n))
            expected = [e + (1 - d) * (p.detach() - e) for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, cb._average_model.module.parameters()):
        torch.testing.assert_close(p, e)
    assert int(cb._average_model.n_averaged) == 4 and cb._updates == 4
    ema, cur = [torch.zeros(2)], [torch.ones(2)]
    _ema_update(0.5, False)(ema, cur, 3)
    assert torch.allclose(ema[0], torch.full((2,), 0.5))


def test_throughput_counts_tokens_of_the_generator():
    class Stage:
        tokens_per_sample = 130

    cb = Throughput()
    cb.length_fn = None
    try:
        cb.setup(None, Stage(), "fit")
    except AttributeError:  # the base class reads the trainer; what matters is set before it
        pass
    assert cb.length_fn is not None and cb.length_fn((torch.zeros(4, 3, 16, 16), torch.zeros(4))) == 4 * 130

    class Tokenizer:
        pass

    cb2 = Throughput()
    try:
        cb2.setup(None, Tokenizer(), "fit")
    except AttributeError:
        pass
    assert cb2.length_fn is None


# ---- the stage's options -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory):
    from test_generator_stage import save_tokenizer_module_ckpt

    path = tmp_path_factory.mktemp("tok") / "tok.ckpt"
    save_tokenizer_module_ckpt(path)
    return path


def _stage(tok_run, **kw):
    from srdd_lightning.stages.generator import SRDDModule

    return SRDDModule(str(tok_run), num_classes=10, image_size=16, architecture={"depth": 1, "width": 64, "num_heads": 2},
                      **kw)  # fmt: skip


class _FakeTrainer:
    max_steps = 10
    estimated_stepping_batches = 10
    gradient_clip_val = None

    class strategy:  # noqa: N801 - a stand-in for trainer.strategy
        pass


def test_compile_option_compiles_the_generator_in_place(tok_run):
    m = _stage(tok_run, compile=True)
    names = set(m.state_dict())
    m._trainer = _FakeTrainer()
    m.setup("fit")
    assert m.generator._compiled_call_impl is not None and set(m.state_dict()) == names
    plain = _stage(tok_run)
    plain._trainer = _FakeTrainer()
    plain.setup("fit")
    assert plain.generator._compiled_call_impl is None


@pytest.mark.parametrize("fused", [None, True, False])
def test_fused_adamw_option(tok_run, fused):
    m = _stage(tok_run, optim={"fused": fused})
    m._trainer = _FakeTrainer()
    opt = m.configure_optimizers()["optimizer"]
    assert bool(opt.defaults["fused"]) is (fused is True)  # null on the CPU: the default kernel


def test_attention_option_reaches_the_generator(tok_run):
    assert _stage(tok_run, attention="flex").generator.attention == "flex"
    assert _stage(tok_run).generator.attention == "auto"


@pytest.mark.slow
def test_compiled_forward_matches_eager_on_the_cpu():
    """torch.compile (inductor, CPU) of the training forward gives the eager logits (compiling takes ~1 min)."""
    model = _model("markov").eval()
    label_B, x_BLC = _inputs(model)
    with torch.no_grad():
        eager = model(label_B, x_BLC)
        model.compile(dynamic=False)
        compiled = model(label_B, x_BLC)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert F.mse_loss(compiled, eager) < 1e-8
