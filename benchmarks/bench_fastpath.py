"""The generator's training step, today's path against the fast path, side by side in one process (ratios).

Every variant trains the same weights on the same batch (VAR's 256 px schedule, a d16-like width, random weights,
VAR's tokenizer architecture ``var-vae-f16`` at 256 px): one step = ground-truth tokens -> teacher-forcing inputs
-> teacher-forced forward -> per-token cross-entropy (1/L weights) -> backward -> AdamW step.

  today       images encoded by the frozen tokenizer at every step (fp32), markov as one SDPA call per scale,
              AdamW's default kernel
  cached      tokens read from the token cache (``srdd data tokenize``): no encoder in the step
  +fused      ... and fused AdamW
  +compile    ... and ``torch.compile`` of the generator (inductor; compile time excluded, reported apart)
  +bf16       ... and bf16 autocast (on a CPU without bf16 units this is slower: it is reported, not chosen)
  dense-mask  markov as one SDPA call with a dense L×L boolean mask (the one-call alternative that has a backward
              on the CPU; flex_attention has none there)
  causal      VAR's mask (cached dense block-causal mask)

Then the teacher-forced forward alone (no grad): markov per-scale SDPA vs one compiled flex_attention call vs
causal, where flex can run on the CPU. Times are median CPU seconds of interleaved repeats (wall in brackets).

    python benchmarks/bench_fastpath.py --help
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from srdd_lightning.models.scales import VAR_PATCH_NUMS_256, flatten_tokens, split_tokens
from srdd_lightning.models.tokenizer import build_tokenizer
from srdd_lightning.models.transformer import _flex_attention_plan, build_generator
from srdd_lightning.stages.generator import token_cross_entropy, var_loss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=8, help="transformer blocks")
    p.add_argument("--width", type=int, default=1024, help="model width (d16: 1024)")
    p.add_argument("--heads", type=int, default=16, help="attention heads")
    p.add_argument("--batch", type=int, default=2, help="images per step")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--variants", default="today,cached,+fused,+compile,+bf16,dense-mask,causal",
                   help="training variants to run (first = reference)")
    p.add_argument("--skip-forward", action="store_true", help="skip the forward-only attention comparison")
    return p.parse_args()


def median_times(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU s, wall s) per function; one untimed warm-up each; interleaved so load changes hit all alike."""
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(1 + repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if rep:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pns = VAR_PATCH_NUMS_256
    torch.manual_seed(0)
    tok = build_tokenizer("var-vae-f16").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    img_B3HW = torch.rand(args.batch, 3, 256, 256, generator=g) * 2 - 1
    label_B = torch.randint(0, 10, (args.batch,), generator=g)
    with torch.no_grad():
        cached_BL = flatten_tokens(tok.img_to_tokens(img_B3HW, pns)).to(torch.int16)  # what a token shard holds

    def make(attn: str, attention: str = "sdpa", fused: bool = False, compiled: bool = False):
        torch.manual_seed(1)
        gen = build_generator("var-d16", attn=attn, depth=args.depth, width=args.width, num_heads=args.heads,
                              num_classes=10, patch_nums=pns).train()  # fmt: skip
        gen.attention = attention
        opt = torch.optim.AdamW(gen.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused or None)
        if compiled:
            gen.compile(dynamic=False)
        return gen, opt

    def step(gen, opt, from_images: bool, bf16: bool = False) -> None:
        with torch.no_grad():
            tokens = tok.img_to_tokens(img_B3HW, pns) if from_images else split_tokens(cached_BL.long(), pns)
            x_BLC = tok.teacher_forcing_inputs(tokens, pns)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits_BLV = gen(label_B, x_BLC, generator=torch.Generator().manual_seed(0))
        var_loss(token_cross_entropy(logits_BLV, flatten_tokens(tokens))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    specs = {
        "today": dict(model=("markov",), from_images=True),
        "cached": dict(model=("markov",), from_images=False),
        "+fused": dict(model=("markov", "sdpa", True), from_images=False),
        "+compile": dict(model=("markov", "sdpa", True, True), from_images=False),
        "+bf16": dict(model=("markov", "sdpa", True), from_images=False, bf16=True),
        "dense-mask": dict(model=("markov", "dense"), from_images=False),
        "causal": dict(model=("causal",), from_images=False),
    }
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in specs]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(specs)}")
    fns, compile_s = {}, None
    for name in names:
        spec = specs[name]
        model_args = spec["model"]
        dense = len(model_args) > 1 and model_args[1] == "dense"
        gen, opt = make(model_args[0], *(("sdpa",) if dense else model_args[1:]))
        if dense:
            _use_dense_markov_mask(gen, pns)
        fn = (lambda gen=gen, opt=opt, spec=spec: step(gen, opt, spec["from_images"], spec.get("bf16", False)))
        if name == "+compile":
            t0 = time.perf_counter()
            fn()  # the compile happens here
            compile_s = time.perf_counter() - t0
        fns[name] = fn
    times = median_times(fns, args.repeats)

    n_params = sum(p.numel() for p in make("markov")[0].parameters())
    print(f"generator depth {args.depth} width {args.width} heads {args.heads} ({n_params / 1e6:.0f}M params), schedule "
          f"{list(pns)} (680 tokens), batch {args.batch}, tokenizer var-vae-f16 @256 px (random weights), "
          f"{args.threads} threads, torch {torch.__version__}; median CPU s of {args.repeats} interleaved repeats")
    ref = names[0]
    print(f"| training step | CPU s (wall) | vs {ref} |")
    print("|---|---|---|")
    for name in names:
        c, w = times[name]
        print(f"| {name} | {c:.2f} ({w:.2f}) | {c / times[ref][0]:.2f}x |")
    if compile_s is not None:
        print(f"(+compile: first step incl. compilation {compile_s:.0f} s)")

    if not args.skip_forward:
        forward_only(args, pns, tok, cached_BL, label_B)


def _use_dense_markov_mask(gen, pns) -> None:
    """Markov attention as ONE SDPA call with a dense boolean mask (benchmark-only variant)."""
    import torch.nn.functional as F

    from srdd_lightning.models.scales import scale_ids

    sid_L = scale_ids(pns)
    mask_LL = sid_L[:, None] == sid_L[None, :]

    def attend(q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL, scale=scale)

    gen._plans[(tuple(pns), "cpu", "sdpa")] = attend


@torch.no_grad()
def forward_only(args, pns, tok, cached_BL, label_B) -> None:
    """Teacher-forced forward (eval, no grad): where flex_attention (compiled) can run on the CPU."""
    x_BLC = tok.teacher_forcing_inputs(split_tokens(cached_BL.long(), pns), pns)
    models = {}
    for name, attn, attention in (("markov per-scale sdpa", "markov", "sdpa"), ("markov flex (one call)", "markov", "flex"),
                                  ("causal (dense mask)", "causal", "sdpa")):  # fmt: skip
        torch.manual_seed(1)
        gen = build_generator("var-d16", attn=attn, depth=args.depth, width=args.width, num_heads=args.heads,
                              num_classes=10, patch_nums=pns).eval()  # fmt: skip
        gen.attention = attention
        models[name] = gen
    flex = models["markov flex (one call)"]  # compiled on the CPU too (the framework compiles it on CUDA only)
    flex._plans[(tuple(pns), "cpu", "flex")] = _flex_attention_plan(tuple(pns), "markov", torch.device("cpu"), compile=True)
    t0 = time.perf_counter()
    out_flex = flex(label_B, x_BLC)
    compile_s = time.perf_counter() - t0
    out_ref = models["markov per-scale sdpa"](label_B, x_BLC)
    diff = (out_flex - out_ref).abs().max().item()
    times = median_times({k: (lambda m=m: m(label_B, x_BLC)) for k, m in models.items()}, args.repeats)
    ref = "markov per-scale sdpa"
    print(f"\n| teacher-forced forward (no grad) | CPU s (wall) | vs {ref} |")
    print("|---|---|---|")
    for name, (c, w) in times.items():
        print(f"| {name} | {c:.3f} ({w:.3f}) | {c / times[ref][0]:.2f}x |")
    print(f"(flex compile {compile_s:.0f} s; max |flex - per-scale| logits {diff:.1e})")


if __name__ == "__main__":
    main()
