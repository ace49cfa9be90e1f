"""Tokenizer throughput: encode, quantize and decode images/s per preset (random weights).

    python benchmarks/bench_tokenizer.py                       # var-vae-f16 @256 and tiny @32, batch 8, CPU
    python benchmarks/bench_tokenizer.py --presets tiny --batch-size 64 --repeats 5

Prints a markdown table; the last column is each preset's decode time relative to its encode time,
a ratio that transfers across machines better than absolute numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

from srdd_lightning.models.tokenizer import TOKENIZER_PRESETS, build_tokenizer


def _time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench(preset: str, batch: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    tok = build_tokenizer(preset).to(device).eval()
    s = tok.image_size
    img = torch.rand(batch, tok.config.image_channels, s, s, device=device) * 2 - 1
    with torch.inference_mode():
        f = tok.encode(img)
        f_hat = tok.tokens_to_fhat(tok.quantizer.quantize(f).tokens)
        t_enc = _time(lambda: tok.encode(img), repeats)
        t_q = _time(lambda: tok.quantizer.quantize(f), repeats)
        t_dec = _time(lambda: tok.decode(f_hat), repeats)
    n_params = sum(p.numel() for p in tok.parameters())
    return dict(preset=preset, size=s, batch=batch, params=n_params, enc=batch / t_enc, quant=batch / t_q, dec=batch / t_dec, ratio=t_dec / t_enc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["var-vae-f16", "tiny"], choices=sorted(TOKENIZER_PRESETS), help="tokenizer presets to measure")
    p.add_argument("--batch-size", type=int, default=8, help="images per call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per operation (median reported), after one warm-up")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, random weights, fp32, inference_mode")
    print("| preset | px | batch | params (M) | encode img/s | quantize img/s | decode img/s | decode/encode time |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        r = bench(preset, args.batch_size, args.repeats, args.device)
        print(
            f"| {r['preset']} | {r['size']} | {r['batch']} | {r['params'] / 1e6:.1f} | {r['enc']:.2f} | {r['quant']:.1f} | {r['dec']:.2f} | {r['ratio']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
