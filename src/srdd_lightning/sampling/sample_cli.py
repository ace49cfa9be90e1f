"""``srdd sample``: images from a trained generator into a folder (PNGs, a grid, an npz and the settings used).

    srdd sample --ckpt runs/digits/srdd --out samples/digits --num_per_class 10 --cfg 2 --top_k 0 --top_p 1
    srdd sample --ckpt runs/digits/srdd --out edits/ --classes 3 --num_samples 8 \
        --edit inpaint --image digit.png --mask hole.png
    torchrun --nproc_per_node 8 $(which srdd) sample --ckpt runs/ffhq/version_0 --out fid/ffhq --num_samples 50000

Sample ``i`` has class ``labels[i]`` and seed ``seed + i``, so the result depends neither on the batch size nor
on the number of ranks; under torchrun / SLURM (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``)
rank r takes the indices i ≡ r (mod world size). Existing PNGs are skipped, so an interrupted run resumes;
rank 0 waits for every PNG, then (re)builds ``grid.png``, ``samples.npz`` and ``sampling.json`` from all files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from srdd_lightning.sampling.config import EditSpec, SamplingConfig
from srdd_lightning.utils.images import from_uint8, image_grid, load_png, save_png, to_uint8

EditMode = Literal["inpaint", "outpaint", "superres", "reconstruct"]
UNCONDITIONAL = "uncond"
_STATS_DIR = ".srdd-sample"


# --------------------------------------------------------------------------------------------
# What to sample
# --------------------------------------------------------------------------------------------


def parse_classes(classes: str | Sequence[int] | int | None, num_classes: int, null_class: int) -> list[int] | None:
    """``"0,3"`` -> [0, 3]; ``"uncond"`` is the null class; every class must lie in [0, num_classes)."""
    if classes is None:
        return None
    if isinstance(classes, int):
        items: list = [classes]
    elif isinstance(classes, str):
        items = [c.strip() for c in classes.split(",") if c.strip()]
    else:
        items = list(classes)
    out = []
    for c in items:
        if isinstance(c, str) and c.lower() == UNCONDITIONAL:
            out.append(null_class)
            continue
        try:
            value = int(c)
        except ValueError:
            raise ValueError(f"--classes takes comma-separated class indices or '{UNCONDITIONAL}', got {c!r}") from None
        if not 0 <= value < num_classes:
            raise ValueError(
                f"class {value} is out of range: the model has {num_classes} classes (0..{num_classes - 1}); "
                f"use '{UNCONDITIONAL}' for the null (unconditional) class"
            )
        out.append(value)
    if not out:
        raise ValueError("--classes is empty")
    return out


def plan_labels(
    num_classes: int, null_class: int, num_per_class: int | None, classes: str | Sequence[int] | None, num_samples: int | None
) -> list[int]:
    """The class of every sample index: ``num_per_class`` for each class (all, or ``classes``), or ``num_samples``
    in total spread over the classes in contiguous, near-equal blocks."""
    if (num_per_class is None) == (num_samples is None):
        raise ValueError("give exactly one of --num_per_class N (N per class) and --num_samples N (N in total)")
    chosen = parse_classes(classes, num_classes, null_class) or list(range(num_classes))
    if num_per_class is not None:
        if num_per_class < 1:
            raise ValueError(f"--num_per_class must be >= 1, got {num_per_class}")
        return [c for c in chosen for _ in range(num_per_class)]
    assert num_samples is not None
    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    return [chosen[i * len(chosen) // num_samples] for i in range(num_samples)]


def sample_path(out: Path, index: int, label: int) -> Path:
    return out / f"{index:06d}_c{label}.png"


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) otherwise."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


# --------------------------------------------------------------------------------------------
# Editing inputs
# --------------------------------------------------------------------------------------------


def _load_image(path: str, size: int | None, what: str) -> torch.Tensor:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--image {p} does not exist")
    img = from_uint8(load_png(p))[None]  # (1, 3, H, W) in [-1, 1]
    if size is not None and tuple(img.shape[-2:]) != (size, size):
        raise ValueError(f"--image {p} is {img.shape[-1]}x{img.shape[-2]} px, but {what} needs {size}x{size} px")
    return img


def build_edit(edit: EditMode, tokenizer, schedule: Sequence[int], image: str | None, mask: str | None,
               keep_box: str | None, keep_scales: int | None) -> tuple[EditSpec, dict, torch.Tensor]:
    """The EditSpec (batch 1, broadcast by the sampler), a record of it, and the reference image (1, 3, H, W)."""
    from srdd_lightning.sampling import editing

    if image is None:
        raise ValueError(f"--edit {edit} needs --image PATH")
    size = tokenizer.image_size
    record: dict = {"mode": edit, "image": str(image)}
    if edit == "superres":
        img = _load_image(image, None, "superres")
        if img.shape[-1] > size or img.shape[-2] > size:
            raise ValueError(f"--image {image} ({img.shape[-1]}x{img.shape[-2]} px) is not smaller than the model's {size} px")
        spec = editing.super_resolution(tokenizer, img, keep_scales, patch_nums=schedule)
        record["keep_scales"] = spec.keep_scales
        return spec, record, img
    img = _load_image(image, size, f"the tokenizer ({edit})")
    if edit == "inpaint":
        if mask is None:
            raise ValueError("--edit inpaint needs --mask PATH (white = region to generate)")
        m = editing.load_mask(mask)
        if tuple(m.shape[-2:]) != tuple(img.shape[-2:]):
            raise ValueError(f"--mask {mask} is {m.shape[-1]}x{m.shape[-2]} px but --image {image} is {size}x{size} px")
        spec = editing.inpaint(tokenizer, img, m, patch_nums=schedule)
        record["mask"] = str(mask)
    elif edit == "outpaint":
        if keep_box is None:
            raise ValueError("--edit outpaint needs --keep_box TOP,LEFT,BOTTOM,RIGHT (pixels kept)")
        try:
            box = tuple(int(v) for v in keep_box.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise ValueError(f"--keep_box takes TOP,LEFT,BOTTOM,RIGHT in pixels, got {keep_box!r}")
        spec = editing.outpaint(tokenizer, img, box, patch_nums=schedule)  # type: ignore[arg-type]
        record["keep_box"] = list(box)
    elif edit == "reconstruct":
        if keep_scales is None:
            raise ValueError("--edit reconstruct needs --keep_scales N (scales of the image kept)")
        spec = editing.reconstruct(tokenizer, img, keep_scales, patch_nums=schedule)
        record["keep_scales"] = keep_scales
    else:
        raise ValueError(f"--edit must be one of inpaint, outpaint, superres, reconstruct; got {edit!r}")
    return spec, record, img


# --------------------------------------------------------------------------------------------
# Sampling into a folder
# --------------------------------------------------------------------------------------------


def sample_to_folder(
    ckpt: str,
    out: str,
    num_per_class: int | None = None,
    classes: str | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    ema: bool = True,
    sampling: SamplingConfig | None = None,
    edit: EditMode | None = None,
    image: str | None = None,
    mask: str | None = None,
    keep_box: str | None = None,
    keep_scales: int | None = None,
    tokenizer_ckpt: str | None = None,
    device: str = "auto",
    precision: Literal["fp32", "bf16"] = "fp32",
    progress: bool = True,
    wait_timeout: float = 600.0,
) -> Path:
    """Sample a generator checkpoint into a folder of PNGs plus grid.png, samples.npz and sampling.json.

    Args:
        ckpt: Generator checkpoint file or run folder (runs/<name> or runs/<name>/version_<k>: its last.ckpt).
        out: Output folder; PNGs already there are kept and skipped (resume).
        num_per_class: Samples per class (every class, or those of --classes).
        classes: Comma-separated class indices, e.g. 0,3 ('uncond' = the null class); default: all classes.
        num_samples: Total samples, spread over the classes in contiguous blocks (instead of --num_per_class).
        seed: Sample i uses seed + i (independent of batch size and number of ranks).
        batch_size: Samples per sampler call on each rank.
        ema: Use the EMA weights of the generator (false: the raw trained weights).
        edit: Zero-shot editing: inpaint (--image, --mask), outpaint (--image, --keep_box), superres (--image, a
            smaller image), reconstruct (--image, --keep_scales).
        image: Reference image (PNG/JPEG...) for --edit; same size as the model's images (smaller for superres).
        mask: Inpainting mask image, same size as --image: white = region to generate.
        keep_box: Outpainting: TOP,LEFT,BOTTOM,RIGHT pixel box of --image that is kept.
        keep_scales: reconstruct: number of coarse scales of --image kept; superres: override the automatic count.
        tokenizer_ckpt: Tokenizer to use instead of the one recorded in the checkpoint (e.g. after moving files).
        device: cuda, cuda:1, cpu, or auto (cuda:<local rank> when CUDA is available).
        precision: fp32, or bf16 (transformer under bfloat16 autocast on CUDA: faster, not bit-identical).
        progress: Show a progress bar (rank 0).
        wait_timeout: Rank 0 gives up when no other rank adds a PNG for this many seconds.
    """
    from tqdm import tqdm

    from srdd_lightning.loading import load_generator, resolve_checkpoint

    sampling = sampling or SamplingConfig()
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if edit is None and any(v is not None for v in (image, mask, keep_box, keep_scales)):
        raise ValueError("--image/--mask/--keep_box/--keep_scales only apply with --edit")
    rank, world, local_rank = dist_env()
    dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    ckpt_file = resolve_checkpoint(ckpt, "--ckpt")
    module = load_generator(ckpt_file, ema=ema, tokenizer_ckpt=tokenizer_ckpt).to(dev)
    generator, tokenizer = module.generator, module.tokenizer
    labels = plan_labels(generator.num_classes, generator.null_class, num_per_class, classes, num_samples)
    sampler = module.sampler()
    schedule = sampler.schedule(sampling.schedule)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec, edit_record = None, None
    if edit is not None:
        spec, edit_record, ref = build_edit(edit, tokenizer, schedule, image, mask, keep_box, keep_scales)
        if rank == 0:
            save_png(to_uint8(ref)[0], out_dir / "reference.png")

    todo = [i for i in range(rank, len(labels), world) if not sample_path(out_dir, i, labels[i]).exists()]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and dev.type == "cuda" else None
    seconds, cost = 0.0, None
    bar = tqdm(total=len(todo), desc=f"srdd sample (rank {rank}/{world})", disable=not progress or rank != 0)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        t0 = time.perf_counter()
        with amp if amp is not None else contextlib.nullcontext():
            result = sampler.sample([labels[i] for i in idx], sampling, seeds=[seed + i for i in idx], edit=spec)
        images = to_uint8(result.images).cpu()
        seconds += time.perf_counter() - t0
        cost = result.cost.to_dict()
        for i, img in zip(idx, images):
            save_png(img, sample_path(out_dir, i, labels[i]))
        bar.update(len(idx))
    bar.close()
    if todo:
        _write_json(out_dir / _STATS_DIR / f"rank{rank}.json",
                    {"images": len(todo), "seconds": seconds, "cost_per_image": cost, "device": str(dev)})  # fmt: skip
    if rank != 0:
        return out_dir

    _wait_for_all(out_dir, labels, wait_timeout)
    stats = [json.loads(p.read_text()) for p in sorted((out_dir / _STATS_DIR).glob("rank*.json"))]
    n_timed = sum(s["images"] for s in stats)
    record = {
        "checkpoint": str(ckpt_file),
        "tokenizer": module.tokenizer_info["path"],
        "ema": ema,
        "attn": generator.config.attn,
        "num_samples": len(labels),
        "num_classes": generator.num_classes,
        "classes": sorted(set(labels)),
        "labels": "samples.npz['labels']; file {index:06d}_c{class}.png",
        "seed": seed,
        "seeds": "seed + index",
        "sampling": sampling.to_dict(),
        "schedule": list(schedule),
        "edit": edit_record,
        "precision": precision,
        "cost_per_image": cost if cost is not None else next((s["cost_per_image"] for s in stats if s.get("cost_per_image")), None),
        "seconds_per_image": sum(s["seconds"] for s in stats) / n_timed if n_timed else None,
        "seconds_measured_on": sorted({s["device"] for s in stats}),
        "batch_size": batch_size,
        "world_size": world,
    }
    write_outputs(out_dir, labels)
    _write_json(out_dir / "sampling.json", record)
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _wait_for_all(out_dir: Path, labels: list[int], timeout: float) -> None:
    """Rank 0's barrier: every PNG exists (each is written atomically). Fails after ``timeout`` s without progress."""
    missing = [i for i in range(len(labels)) if not sample_path(out_dir, i, labels[i]).exists()]
    last_change, last_count = time.monotonic(), len(missing)
    while missing:
        time.sleep(1.0)
        missing = [i for i in missing if not sample_path(out_dir, i, labels[i]).exists()]
        if len(missing) < last_count:
            last_change, last_count = time.monotonic(), len(missing)
        elif time.monotonic() - last_change > timeout:
            raise TimeoutError(
                f"{len(missing)} samples (e.g. {sample_path(out_dir, missing[0], labels[missing[0]]).name}) did not appear "
                f"within {timeout:.0f} s: another rank stopped. Rerun the same command to resume"
            )


def write_outputs(out_dir: Path, labels: list[int], max_rows: int = 16, max_cols: int = 8) -> None:
    """(Re)build ``samples.npz`` (uint8 NHWC ``arr_0`` + ``labels``, by index) and ``grid.png`` from the PNGs."""
    first = load_png(sample_path(out_dir, 0, labels[0]))
    arr = np.empty((len(labels), first.shape[1], first.shape[2], 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        arr[i] = load_png(sample_path(out_dir, i, c)).permute(1, 2, 0).numpy()
    tmp = out_dir / f".samples.npz.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=arr, labels=np.asarray(labels, dtype=np.int64))
    os.replace(tmp, out_dir / "samples.npz")

    # grid: one row per class (up to max_rows classes, evenly spread), its first max_cols samples
    order = list(dict.fromkeys(labels))
    if len(order) > max_rows:
        order = [order[round(r * (len(order) - 1) / (max_rows - 1))] for r in range(max_rows)]
    if len(order) == 1:  # one class: fill a square-ish grid
        n = min(len(labels), max_rows * max_cols)
        cols = min(max_cols, n)
        picks = list(range(n))
    else:
        cols = min(max_cols, max(labels.count(c) for c in order))
        picks = []
        for c in order:
            idx = [i for i, lab in enumerate(labels) if lab == c][:cols]
            picks += idx + [-1] * (cols - len(idx))
    blank = np.zeros_like(arr[0])
    tiles = torch.from_numpy(np.stack([arr[i] if i >= 0 else blank for i in picks])).permute(0, 3, 1, 2)
    upscale = max(1, math.ceil(64 / tiles.shape[-1]))
    save_png(image_grid(from_uint8(tiles), nrow=cols, upscale=upscale), out_dir / "grid.png")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Path:
    """``srdd sample``: parse the options (``--help`` lists them with their documentation) and sample."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # SamplingConfig's field docs become --help text
    parser = ArgumentParser(
        prog="srdd sample",
        description="Sample a trained generator into a folder: {index:06d}_c{class}.png, grid.png, samples.npz "
        "(uint8 NHWC arr_0 + labels) and sampling.json. Resumable; multi-GPU under torchrun or SLURM.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of these options.")
    parser.add_function_arguments(sample_to_folder, nested_key=None, skip={"sampling"})
    parser.add_class_arguments(SamplingConfig, nested_key=None)
    cfg = parser.parse_args(list(argv) if argv is not None else None)
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    kwargs = {k: v for k, v in cfg.as_dict().items() if k != "config"}
    sampling = SamplingConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    out = sample_to_folder(sampling=sampling, **kwargs)
    if dist_env()[0] == 0:
        print(f"samples in {out}")
    return out


__all__ = ["build_edit", "dist_env", "main", "parse_classes", "plan_labels", "sample_path", "sample_to_folder", "write_outputs"]
