"""Markov (SRDD) vs block-causal (VAR) generator on CPU: step time, sampling time, peak memory.

Side by side in one process, same weights, random inputs (no tokenizer):
  * training step = forward + cross-entropy + backward of one teacher-forced pass over all scales;
  * sampling pass = one step-wise pass over the schedule with classifier-free guidance (2B rows),
    markov without a KV cache, causal with one; inputs of the next scale are random.
Peak memory is the high-water mark of tensor memory allocated during the measured call, above the
level before it, from torch.profiler's CPU memory events (``profile_memory=True``) summed in time
order at operator granularity. Parameters are allocated beforehand and not counted; gradients are.
Numbers that matter are the ratios; absolute times depend on the machine.

    python benchmarks/bench_generator.py --help
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from srdd_lightning.models.scales import num_tokens
from srdd_lightning.models.transformer import VAR_PATCH_NUMS_256, VARTransformer, build_generator


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--width", type=int, default=256, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--batch", type=int, default=8, help="images per step (sampling runs 2x for CFG)")
    p.add_argument("--patch-nums", default=",".join(map(str, VAR_PATCH_NUMS_256)), help="scale schedule")
    p.add_argument("--vocab", type=int, default=4096, help="codebook size V")
    p.add_argument("--latent-dim", type=int, default=32, help="code dimension Cvae")
    p.add_argument("--modes", default="markov,causal", help="attention masks to compare (first = reference)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = stable on a shared box)")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance weight, ramped linearly over scales as VAR")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def make_model(args: argparse.Namespace, attn: str, patch_nums: tuple[int, ...]) -> VARTransformer:
    torch.manual_seed(args.seed)  # identical weights for every mask
    return build_generator(
        "small", attn=attn, depth=args.depth, width=args.width, num_heads=args.heads, patch_nums=patch_nums,
        vocab_size=args.vocab, latent_dim=args.latent_dim, num_classes=10,
    )  # fmt: skip


def train_step(model: VARTransformer, label_B, x_BLC, target_BL) -> None:
    logits_BLV = model(model.drop_labels(label_B), x_BLC)
    F.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten()).backward()


@torch.no_grad()
def sampling_pass(model: VARTransformer, label_B, inputs, cfg: float) -> None:
    B, K = label_B.shape[0], len(model.patch_nums)
    cond_BD = model.embed_condition(label_B, with_null=True)  # 2B rows: cond, then null
    cache = None if model.config.attn == "markov" else model.new_cache()
    for si in range(K):
        x_BlC = None if si == 0 else inputs[si].repeat(2, 1, 1)
        logits_BlV = model.forward_scale(si, cond_BD, x_BlC, cache)
        t = cfg * si / max(K - 1, 1)
        guided_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        torch.multinomial(guided_BlV.softmax(-1).flatten(0, 1), 1)


def timed(fns: dict, repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (CPU seconds, wall seconds) per function, run interleaved so load changes hit all alike."""
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(warmup + repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if rep >= warmup:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in fns}


def peak_bytes(fn) -> int:
    """High-water mark of CPU tensor memory allocated by ``fn`` (profiler memory events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += ev.self_cpu_memory_usage
        peak = max(peak, level)
    return peak


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    pns = tuple(int(p) for p in args.patch_nums.split(","))
    modes = args.modes.split(",")
    B, L = args.batch, num_tokens(pns)
    g = torch.Generator().manual_seed(args.seed)
    label_B = torch.randint(0, 10, (B,), generator=g)
    x_BLC = torch.randn(B, L - pns[0] ** 2, args.latent_dim, generator=g)
    target_BL = torch.randint(0, args.vocab, (B, L), generator=g)
    inputs = [None] + [torch.randn(B, p * p, args.latent_dim, generator=g) for p in pns[1:]]

    models = {mode: make_model(args, mode, pns) for mode in modes}

    def train(model: VARTransformer) -> None:
        model.train()
        train_step(model, label_B, x_BLC, target_BL)
        model.zero_grad(set_to_none=True)

    def sample(model: VARTransformer) -> None:
        model.eval()
        sampling_pass(model, label_B, inputs, args.cfg)

    train_t = timed({m: (lambda m=m: train(models[m])) for m in modes}, args.repeats, args.warmup)
    sample_t = timed({m: (lambda m=m: sample(models[m])) for m in modes}, args.repeats, args.warmup)
    rows = {
        m: {
            "train_s": train_t[m][0], "train_wall": train_t[m][1],
            "sample_s": sample_t[m][0], "sample_wall": sample_t[m][1],
            "train_peak_mb": peak_bytes(lambda m=m: train(models[m])) / 2**20,
            "sample_peak_mb": peak_bytes(lambda m=m: sample(models[m])) / 2**20,
        }  # fmt: skip
        for m in modes
    }

    n_params = sum(p.numel() for p in models[modes[0]].parameters())
    print(
        f"generator depth {args.depth} width {args.width} heads {args.heads} ({n_params / 1e6:.1f}M params), "
        f"schedule {list(pns)} (L={L}), batch {B} (sampling {2 * B} rows with CFG), V={args.vocab}, "
        f"threads {args.threads}, torch {torch.__version__}; times: median CPU seconds of {args.repeats} "
        f"interleaved runs (wall in brackets)"
    )
    ref = modes[0]
    print(f"{'mask':<12} {'train step s':>16} {'sample pass s':>16} {'train peak MiB':>15} {'sample peak MiB':>16}")
    for mode, r in rows.items():
        train_s = f"{r['train_s']:.3f} ({r['train_wall']:.2f})"
        sample_s = f"{r['sample_s']:.3f} ({r['sample_wall']:.2f})"
        print(f"{mode:<12} {train_s:>16} {sample_s:>16} {r['train_peak_mb']:>15.1f} {r['sample_peak_mb']:>16.1f}")
    for mode in modes[1:]:
        r, q = rows[mode], rows[ref]
        print(
            f"ratio {mode}/{ref}: train time {r['train_s'] / q['train_s']:.2f}x, sample time "
            f"{r['sample_s'] / q['sample_s']:.2f}x, train peak mem {r['train_peak_mb'] / q['train_peak_mb']:.2f}x, "
            f"sample peak mem {r['sample_peak_mb'] / q['sample_peak_mb']:.2f}x"
        )
    pairs = {"markov": sum(p**4 for p in pns), "causal (dense mask, as computed)": L * L}
    pairs["causal (block-causal, needed)"] = sum(p * p * num_tokens(pns[: i + 1]) for i, p in enumerate(pns))
    print("attention query-key pairs per head and block: " + ", ".join(f"{k} {v:,}" for k, v in pairs.items()))


if __name__ == "__main__":
    main()
