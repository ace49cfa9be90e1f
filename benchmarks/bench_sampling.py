"""Sampling on CPU: markov vs causal time (and the causal KV cache old vs new), decode layouts, peak memory by resolution.

Side by side in one process, same weights, random weights:
  (a) sampling time through the project's ``Sampler`` on the 256 px schedule (V 4096, C 32: var-vae-f16's
      quantizer and phi blends; its conv net thinned to 8 channels so that decoding, timed in (b), does not
      dominate): markov, causal with the preallocated KV cache, and causal with the concatenating cache it
      replaced (kept below as a reference, ``ConcatKVCache``; it must give the same tokens);
  (b) decoding with the full var-vae-f16 network at 256 px: float32 contiguous vs channels-last (time, max abs
      pixel difference); bf16 autocast at a smaller size (on a CPU without bf16 units it is ~100x slower);
  (c) peak memory of the transformer's step-wise pass with CFG (2 rows per image), markov vs causal, at
      256 / 512 / 1024 px (VAR_PATCH_NUMS_256 / _512 / _1024).
Peak memory is the high-water mark of tensor memory allocated during the call, from torch.profiler's CPU memory
events summed in time order (as benchmarks/bench_generator.py); parameters are allocated before and not counted.
Times are median CPU seconds of interleaved runs; the ratios are what matters.

    python benchmarks/bench_sampling.py --help
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from srdd_lightning.models.scales import VAR_PATCH_NUMS_256, VAR_PATCH_NUMS_512, VAR_PATCH_NUMS_1024, num_tokens
from srdd_lightning.models.tokenizer import build_tokenizer
from srdd_lightning.models.transformer import KVCache, VARTransformer, build_generator
from srdd_lightning.sampling import Sampler, SamplingConfig

SCHEDULES = {256: VAR_PATCH_NUMS_256, 512: VAR_PATCH_NUMS_512, 1024: VAR_PATCH_NUMS_1024}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=8, help="transformer blocks, (a) and (c)")
    p.add_argument("--width", type=int, default=256, help="model width of (a)")
    p.add_argument("--mem-width", type=int, default=512, help="model width of (c) (1024 = d16's; CPU time grows ~width²)")
    p.add_argument("--batch", type=int, default=1, help="images per call (2x rows with CFG)")
    p.add_argument("--resolutions", default="256,512,1024", help="resolutions of (c)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of (a) (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--decode-repeats", type=int, default=1, help="timed repetitions of (b) (~10 s each at 256 px)")
    p.add_argument("--decode-size", type=int, default=256, help="image size of the float32 / channels-last decode")
    p.add_argument("--bf16-size", type=int, default=32, help="image size of the bf16 decode (0: skip it)")
    p.add_argument("--skip-decode", action="store_true", help="skip (b)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = stable on a shared box)")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance weight, ramped linearly over scales as VAR")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# ---- the concatenating KV cache this project used before (reference only) ------------------------


class ConcatKVCache(KVCache):
    """The replaced cache: keeps per-scale K/V and concatenates all past scales at every block of every scale."""

    def __init__(self, schedule, attn) -> None:
        super().__init__(schedule, attn)
        self._kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @property
    def cached_scales(self) -> list[int]:
        return sorted(self._kv)

    def _begin(self, si: int) -> None:
        needed = [j for j in self.key_scales(si) if j != si]
        missing = [j for j in needed if j not in self._kv]
        if missing:
            raise RuntimeError(f"ConcatKVCache lacks scales {missing} needed by scale {si}")
        self._kv = {j: kv for j, kv in self._kv.items() if j in needed}
        if self.attn != "markov":
            self._kv[si] = []

    def _attend(self, si: int, block: int):
        past = [self._kv[j][block] for j in self.key_scales(si) if j != si]

        def attend(q, k, v, scale):
            if self.attn != "markov":
                self._kv[si].append((k.contiguous(), v.contiguous()))
            if past:
                k = torch.cat([kp for kp, _ in past] + [k], dim=2)
                v = torch.cat([vp for _, vp in past] + [v], dim=2)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

        return attend


# ---- measuring ------------------------------------------------------------------------------------


def timed(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median CPU seconds per function, run interleaved so load changes hit all alike."""
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(warmup + repeats):
        for name, fn in fns.items():
            c0 = time.process_time()
            fn()
            if rep >= warmup:
                cpu[name].append(time.process_time() - c0)
    return {k: statistics.median(v) for k, v in cpu.items()}


def peak_bytes(fn) -> int:
    """High-water mark of CPU tensor memory allocated by ``fn`` (profiler memory events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += ev.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def generator(attn: str, depth: int, width: int, patch_nums, seed: int) -> VARTransformer:
    torch.manual_seed(seed)  # identical weights for every mask
    return build_generator("var-d16", attn=attn, depth=depth, width=width, num_heads=max(width // 64, 1),
                           patch_nums=patch_nums, num_classes=10).eval()  # fmt: skip


@torch.no_grad()
def stepwise_pass(model: VARTransformer, label_B, inputs, cfg: float) -> None:
    """One step-wise pass over the schedule with CFG (2B rows), as the sampler runs it without its extras."""
    B, K = label_B.shape[0], len(model.patch_nums)
    cond_BD = model.embed_condition(label_B, with_null=True)
    cache = None if model.config.attn == "markov" else model.new_cache()
    for si in range(K):
        x_BlC = None if si == 0 else inputs[si].repeat(2, 1, 1)
        logits_BlV = model.forward_scale(si, cond_BD, x_BlC, cache)
        t = cfg * si / max(K - 1, 1)
        guided_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        del logits_BlV
        torch.multinomial(guided_BlV.softmax(-1).flatten(0, 1), 1)


# ---- (a) (b) (c) ----------------------------------------------------------------------------------


def bench_sampling(args, rows: list) -> None:
    torch.manual_seed(args.seed)
    tok = build_tokenizer("var-vae-f16", channels=8, norm_groups=8, num_res_blocks=1).eval()
    gens = {m: generator(m, args.depth, args.width, VAR_PATCH_NUMS_256, args.seed) for m in ("markov", "causal")}
    old = generator("causal", args.depth, args.width, VAR_PATCH_NUMS_256, args.seed)
    old.new_cache = lambda schedule=None: ConcatKVCache(old._schedule(schedule)[0], "causal")
    samplers = {"markov": Sampler(gens["markov"], tok), "causal": Sampler(gens["causal"], tok),
                "causal, old concat cache": Sampler(old, tok)}  # fmt: skip
    labels = torch.arange(args.batch) % 10
    config = SamplingConfig(cfg=args.cfg, top_k=900, top_p=0.96)
    outs = {}

    def run(name):
        outs[name] = samplers[name].sample(labels, config, seeds=args.seed).tokens

    t = timed({n: (lambda n=n: run(n)) for n in samplers}, args.repeats, args.warmup)
    same = all(torch.equal(a, b) for a, b in zip(outs["causal"], outs["causal, old concat cache"]))
    for n in samplers:
        rows.append((f"(a) Sampler 256 px, {n}", f"{t[n]:.3f} s", f"{t[n] / t['markov']:.2f}x markov"))
    rows.append(("(a) causal new / old cache", f"{t['causal'] / t['causal, old concat cache']:.2f}x time",
                 f"tokens identical: {same}"))  # fmt: skip


def bench_decode(args, rows: list) -> None:
    def tokenizer(size):
        torch.manual_seed(args.seed)
        sched = SCHEDULES.get(size) or tuple(p for p in (1, 2, 4, 8, 16) if p <= size // 16)
        return build_tokenizer("var-vae-f16", image_size=size, patch_nums=sched).eval()

    tok = tokenizer(args.decode_size)
    f_hat = torch.randn(args.batch, 32, tok.latent_size, tok.latent_size)
    res = {}
    with torch.no_grad():
        fns = {"fp32": lambda: res.__setitem__("fp32", tok.decode(f_hat, clamp=False)),
               "channels_last": lambda: res.__setitem__("channels_last", tok.decode(f_hat, clamp=False, channels_last=True))}
        t = timed(fns, args.decode_repeats, 0)
    diff = (res["channels_last"] - res["fp32"]).abs().max().item()
    rows.append((f"(b) decode {args.decode_size} px fp32", f"{t['fp32']:.2f} s", "reference"))
    rows.append((f"(b) decode {args.decode_size} px channels_last", f"{t['channels_last']:.2f} s",
                 f"{t['channels_last'] / t['fp32']:.2f}x time, max|diff| {diff:.1e}"))  # fmt: skip
    if args.bf16_size:
        tok = tokenizer(args.bf16_size)
        f_hat = torch.randn(args.batch, 32, tok.latent_size, tok.latent_size)
        with torch.no_grad():
            c0 = time.process_time()
            ref = tok.decode(f_hat, clamp=False)
            c1 = time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf = tok.decode(f_hat, clamp=False).float()
            c2 = time.process_time()
        rows.append((f"(b) decode {args.bf16_size} px bf16 autocast", f"{c2 - c1:.2f} s",
                     f"{(c2 - c1) / (c1 - c0):.1f}x fp32 time, max|diff| {(bf - ref).abs().max().item():.1e}"))  # fmt: skip


def bench_memory(args, rows: list) -> None:
    for size in (int(r) for r in args.resolutions.split(",")):
        pns = SCHEDULES[size]
        g = torch.Generator().manual_seed(args.seed)
        label_B = torch.arange(args.batch) % 10
        inputs = [None] + [torch.randn(args.batch, p * p, 32, generator=g) for p in pns[1:]]
        peak = {}
        for attn in ("markov", "causal"):
            model = generator(attn, args.depth, args.mem_width, pns, args.seed)
            peak[attn] = peak_bytes(lambda: stepwise_pass(model, label_B, inputs, args.cfg)) / 2**20
            del model
        rows.append((f"(c) peak {size} px (L={num_tokens(pns)}) markov / causal", f"{peak['markov']:.0f} / {peak['causal']:.0f} MiB",
                     f"{peak['markov'] / peak['causal']:.2f}x"))  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str, str]] = []
    bench_sampling(args, rows)
    if not args.skip_decode:
        bench_decode(args, rows)
    bench_memory(args, rows)
    print(f"sampling benchmark: depth {args.depth}, width {args.width} for (a), {args.mem_width} for (c), V 4096, batch "
          f"{args.batch} (x2 rows with CFG {args.cfg}), threads {args.threads}, torch {torch.__version__}; (a) median CPU s "
          f"of {args.repeats} interleaved runs, top-k 900 / top-p 0.96")  # fmt: skip
    w = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{w}}  {'value':>18}  ratio / note")
    for name, value, note in rows:
        print(f"{name:<{w}}  {value:>18}  {note}")


if __name__ == "__main__":
    main()
