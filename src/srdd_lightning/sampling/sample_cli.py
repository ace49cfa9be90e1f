"""``srdd sample``: images from a trained generator into a folder (PNGs, a grid, an npz and the settings used).

Sample ``i`` has class ``labels[i]`` and seed ``seed + i``, whatever the batch size and number of processes. Under
torchrun (torch.distributed's ``env://`` variables) rank 0 checks the folder, every rank draws its share of the
missing samples, and after a collective rank 0 writes grid.png, samples.npz and sampling.json. sampling.json is
written before the first PNG with what the images depend on, so a rerun resumes only the same settings (README
"Sampling and editing" has example commands).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, Union

import numpy as np
import torch

from srdd_lightning.sampling.config import EditSpec, SamplingConfig
from srdd_lightning.utils.images import from_uint8, image_grid, load_png, save_png, to_uint8
from srdd_lightning.utils.io import atomic_write, write_json

EditMode = Literal["inpaint", "outpaint", "superres", "reconstruct"]
UNCONDITIONAL = "uncond"
SAMPLING_JSON = "sampling.json"
# sampling.json's layout. 2: records what the images depend on (RESUME_KEYS), so a rerun can tell whether it may resume.
RECORD_FORMAT = 2
# The record's entries that decide whether a folder's images are the ones a rerun would make, with the option(s)
# that set each. The checkpoint path is not among them: the same weights moved elsewhere still resume.
RESUME_KEYS = {
    "generator_fingerprint": "--ckpt",
    "tokenizer_fingerprint": "--tokenizer_ckpt",
    "ema": "--ema",
    "precision": "--precision",
    "channels_last_decode": "--channels_last_decode",
    "schedule": "--schedule",
    "sampling": None,  # compared field by field, each named as its own option
    "seed": "--seed",
    "label_runs": "--num_per_class/--num_samples/--classes",
    "edit": "--edit/--image/--mask/--keep_box/--keep_scales",
    "policy_fingerprint": "--policy_ckpt",
}
_OUTPUTS = r"\d{6}_c\d+\.png|grid\.png|samples\.npz|sampling\.json|reference\.png"
# our outputs and the temporary files of an interrupted write of one (utils.images.save_png, utils.io.atomic_open)
_OWN_FILE = re.compile(rf"(?:{_OUTPUTS})|\.(?:{_OUTPUTS})\.(?:tmp-\d+|.+\.tmp)")
T = TypeVar("T")


# ---- what to sample ---------------------------------------------------------------------------------


def parse_classes(classes: str | Sequence[int] | int | None, num_classes: int, null_class: int) -> list[int] | None:
    """``"0,3"`` -> [0, 3]; ``"uncond"`` is the null class; every class must lie in [0, num_classes)."""
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    out = []
    for c in [classes] if isinstance(classes, int) else classes:
        if isinstance(c, str) and c.lower() == UNCONDITIONAL:
            out.append(null_class)
            continue
        try:
            value = int(c)
        except ValueError:
            raise ValueError(f"--classes takes comma-separated class indices or '{UNCONDITIONAL}', got {c!r}") from None
        if not 0 <= value < num_classes:
            raise ValueError(f"--classes: class {value} is out of range: the model has {num_classes} classes "
                             f"(0..{num_classes - 1}); use '{UNCONDITIONAL}' for the null (unconditional) class")
        out.append(value)
    if not out:
        raise ValueError("--classes is empty")
    return out


def _check_counts(num_per_class: int | None, num_samples: int | None) -> None:
    if (num_per_class is None) == (num_samples is None):
        raise ValueError("give exactly one of --num_per_class N (N per class) and --num_samples N (N in total)")
    for name, n in (("--num_per_class", num_per_class), ("--num_samples", num_samples)):
        if n is not None and n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")


def plan_labels(num_classes: int, null_class: int, num_per_class: int | None, classes: str | Sequence[int] | None,
                num_samples: int | None) -> list[int]:
    """The class of every sample index: ``num_per_class`` for each class (all, or ``classes``), or ``num_samples``
    in total spread over the classes in contiguous, near-equal blocks."""
    _check_counts(num_per_class, num_samples)
    chosen = parse_classes(classes, num_classes, null_class) or list(range(num_classes))
    if num_per_class is not None:
        return [c for c in chosen for _ in range(num_per_class)]
    return [chosen[i * len(chosen) // num_samples] for i in range(num_samples)]


def label_runs(labels: Sequence[int]) -> list[list[int]]:
    """``[0, 0, 3, 3, 3]`` -> ``[[0, 2], [3, 3]]``: the labels plan in a few numbers (the plans are contiguous blocks)."""
    return [[int(c), len(list(run))] for c, run in itertools.groupby(labels)]


def sample_path(out: Path, index: int, label: int) -> Path:
    return out / f"{index:06d}_c{label}.png"


# ---- processes: one, or a torch.distributed group ---------------------------------------------------


@dataclasses.dataclass
class Ranks:
    """This process's place among the sampling processes; without a process group, rank 0 of 1."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def _group() -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self._group():
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result to every rank. A user error there (ValueError /
        FileNotFoundError) is raised on every rank, so none is left waiting at the next collective."""
        result: Any = None
        error: Exception | None = None
        if self.rank == 0:
            try:
                result = fn()
            except (ValueError, FileNotFoundError) as e:
                error = e
        if self._group():
            box = [result, None if error is None else str(error)]
            torch.distributed.broadcast_object_list(box, src=0)
            result = box[0]
            if box[1] is not None and error is None:
                error = ValueError(box[1])
        if error is not None:
            raise error
        return result


@contextlib.contextmanager
def process_group(device_type: str, timeout: float) -> Iterator[Ranks]:
    """The caller's process group, or one made from torch.distributed's ``env://`` variables (torchrun's WORLD_SIZE,
    RANK, MASTER_ADDR, MASTER_PORT; gloo on the CPU, nccl on CUDA, ``timeout`` seconds a collective; destroyed on the
    way out), or none: one process."""
    dist = torch.distributed
    made = False
    if dist.is_available() and not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout))  # fmt: skip
        made = True
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size()) if Ranks._group() else Ranks()
    finally:
        if made:
            dist.destroy_process_group()


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:<index>, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def _rank_device(dev: torch.device, ranks: Ranks) -> torch.device:
    """``cuda`` without an index means this process's GPU: its node-local rank (torchrun's LOCAL_RANK)."""
    if dev.type != "cuda":
        return dev
    if dev.index is None:
        local = torch.distributed.get_node_local_rank(fallback_rank=ranks.rank) if ranks.world > 1 else 0
        dev = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(dev)  # nccl's object collectives run on the current device
    return dev


# ---- editing inputs ---------------------------------------------------------------------------------


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
    img = _load_image(image, None if edit == "superres" else size, f"the tokenizer ({edit})")
    if edit == "superres":
        if img.shape[-1] > size or img.shape[-2] > size:
            raise ValueError(f"--image {image} ({img.shape[-1]}x{img.shape[-2]} px) is not smaller than the model's {size} px")
        spec = editing.super_resolution(tokenizer, img, keep_scales, patch_nums=schedule)
        record["keep_scales"] = spec.keep_scales
    elif edit == "inpaint":
        if mask is None:
            raise ValueError("--edit inpaint needs --mask PATH (white = region to generate)")
        if not Path(mask).expanduser().is_file():
            raise FileNotFoundError(f"--mask {mask} does not exist")
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
    for key in ("image", "mask"):  # the content hash of the input files: same name, other content must not resume
        if key in record:
            record[f"{key}_sha256"] = hashlib.sha256(Path(record[key]).expanduser().read_bytes()).hexdigest()
    return spec, record, img


# ---- the folder: what is in it, whether a run may resume there --------------------------------------


def own_files(out_dir: Path) -> list[Path]:
    """The files of ``out_dir`` that ``srdd sample`` writes (sample PNGs, grid, npz, record, reference, and
    temporary files of interrupted writes); nothing else in the folder is ever touched."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if p.is_file() and _OWN_FILE.fullmatch(p.name))


def _comparable(record: dict) -> dict:
    """The record's RESUME_KEYS; the edit without its file paths (their content hashes decide), the sampling
    settings without ``schedule`` (the resolved schedule is compared)."""
    out = {k: record.get(k) for k in RESUME_KEYS}
    out["channels_last_decode"] = bool(out["channels_last_decode"])  # a record from before the option: the default
    if isinstance(out["edit"], dict):
        out["edit"] = {k: v for k, v in out["edit"].items() if k not in ("image", "mask")}
    if isinstance(out["sampling"], dict):
        out["sampling"] = {k: v for k, v in out["sampling"].items() if k != "schedule"}
    return out


def _labels_text(runs: Any) -> str:
    return (f"{sum(n for _, n in runs)} samples of classes {sorted({c for c, _ in runs})}" if isinstance(runs, list)
            else "not recorded")


def settings_differences(there: dict, now: dict) -> list[str]:
    """How the record of a folder (``there``) and of this run (``now``) differ, each as 'option: there vs now'."""
    if there.get("format") != RECORD_FORMAT:
        return [f"its {SAMPLING_JSON} has format {there.get('format', 1)} (an older srdd sample), not {RECORD_FORMAT}"]
    a, b = _comparable(there), _comparable(now)
    out = []
    for key, option in RESUME_KEYS.items():
        if a[key] == b[key]:
            continue
        if key == "sampling" and isinstance(a[key], dict) and isinstance(b[key], dict):
            out += [f"--{k} {a[key].get(k)!r} there, {b[key].get(k)!r} now"
                    for k in sorted(set(a[key]) | set(b[key])) if a[key].get(k) != b[key].get(k)]  # fmt: skip
        elif key == "generator_fingerprint":
            if a["ema"] == b["ema"]:  # with another --ema the weights differ too; that difference is named once
                out.append(f"--ckpt: other generator weights there ({there.get('checkpoint')}) than now ({now.get('checkpoint')})")
        elif key == "tokenizer_fingerprint":
            out.append(f"--tokenizer_ckpt: another tokenizer there ({there.get('tokenizer')}) than now ({now.get('tokenizer')})")
        elif key == "policy_fingerprint":
            where = lambda r: (r.get("policy") or {}).get("checkpoint", "none")
            out.append(f"--policy_ckpt: another resampling policy there ({where(there)}) than now ({where(now)})")
        elif key == "label_runs":
            out.append(f"{option}: {_labels_text(a[key])} there, {_labels_text(b[key])} now")
        else:
            out.append(f"{option} {a[key]!r} there, {b[key]!r} now")
    return out


def prepare_folder(out_dir: Path, record: dict, labels: Sequence[int], overwrite: bool) -> tuple[list[int], dict | None]:
    """Make ``out_dir`` hold only images of ``record`` and write ``record`` there before any PNG: refuse a folder
    with other samples (or, with ``overwrite``, delete srdd sample's files first). Returns the missing sample
    indices and the folder's earlier record of the same settings (None when starting afresh)."""
    record = json.loads(json.dumps(record))  # compared with what JSON gives back: tuples become lists
    ours = own_files(out_dir)
    previous = None
    if overwrite:
        for p in ours:
            p.unlink(missing_ok=True)
    elif ours:
        what = f"use another --out, or --overwrite true to delete srdd sample's files there ({len(ours)}) and start afresh"
        try:
            previous = json.loads((out_dir / SAMPLING_JSON).read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict):
            state = "an unreadable" if (out_dir / SAMPLING_JSON).exists() else "no"
            raise ValueError(f"--out {out_dir} holds {len(ours)} sample file(s) (e.g. {ours[0].name}) but {state} "
                             f"{SAMPLING_JSON} saying how they were made: {what}")  # fmt: skip
        diff = settings_differences(previous, record)
        if diff:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise ValueError(f"--out {out_dir} holds samples made with other settings: {'; '.join(diff[:3])}{more}. "
                             f"{what[0].upper()}{what[1:]}")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / SAMPLING_JSON, {**record, **_timing_of(previous)})
    missing = [i for i, c in enumerate(labels) if not sample_path(out_dir, i, c).exists()]
    return missing, previous


def _timing_of(record: dict | None) -> dict:
    keys = ("cost_per_image", "seconds_per_image", "timed_images", "seconds_measured_on")
    return {k: record[k] for k in keys if k in record} if record else {}


# ---- sampling into a folder -------------------------------------------------------------------------


def sample_to_folder(
    ckpt: str, out: str, num_per_class: int | None = None, classes: str | None = None, num_samples: int | None = None,
    seed: int = 0, batch_size: int = 32, ema: bool = True, sampling: SamplingConfig | None = None,
    edit: EditMode | None = None, image: str | None = None, mask: str | None = None, keep_box: str | None = None,
    keep_scales: int | None = None, tokenizer_ckpt: str | None = None, device: str = "auto",
    precision: Literal["fp32", "bf16"] = "fp32", channels_last_decode: bool = False, overwrite: bool = False,
    progress: bool = True, timeout: float = 1800.0, policy_ckpt: str | None = None,
) -> Path:  # fmt: skip
    """Sample a generator checkpoint into a folder of PNGs plus grid.png, samples.npz and sampling.json.

    Args:
        ckpt: Generator checkpoint file or run folder (runs/<name> or runs/<name>/version_<k>: its last.ckpt).
        out: Output folder. Samples already there with the same settings are kept and skipped (resume);
            samples made with other settings make it refuse (see --overwrite).
        num_per_class: Samples per class (every class, or those of --classes).
        classes: Comma-separated class indices, e.g. 0,3 ('uncond' = the null class); default: all classes.
        num_samples: Total samples, spread over the classes in contiguous blocks (instead of --num_per_class).
        seed: Sample i uses seed + i (independent of batch size and number of processes).
        batch_size: Samples per sampler call in each process.
        ema: Use the EMA weights of the generator (false: the raw trained weights).
        edit: Zero-shot editing: inpaint (--image, --mask), outpaint (--image, --keep_box), superres (--image, a
            smaller image), reconstruct (--image, --keep_scales).
        image: Reference image (PNG/JPEG...) for --edit; same size as the model's images (smaller for superres).
        mask: Inpainting mask image, same size as --image: white = region to generate.
        keep_box: Outpainting: TOP,LEFT,BOTTOM,RIGHT pixel box of --image that is kept.
        keep_scales: reconstruct: number of coarse scales of --image kept; superres: override the automatic count.
        tokenizer_ckpt: Tokenizer to use instead of the one recorded in the checkpoint (e.g. after moving files).
        device: cuda, cuda:1, cpu, or auto (CUDA when available; each process takes the GPU of its local rank).
        precision: fp32, or bf16 (transformer under bfloat16 autocast on CUDA: faster, not bit-identical).
        channels_last_decode: Decode in the NHWC layout (pays with cuDNN on a GPU; no gain on a CPU): float32,
            pixels within 2e-4 of the default decode before 8-bit rounding.
        overwrite: true: delete srdd sample's own files in --out (PNGs, grid.png, samples.npz, sampling.json,
            reference.png; nothing else) and sample afresh. false: resume the same settings, refuse other settings.
        progress: Show a progress bar and a final line (rank 0).
        timeout: Seconds a process waits for the others at a collective (torch.distributed's timeout).
        policy_ckpt: A stage-3 resampling policy (ResamplingPolicyModule) checkpoint or run folder; its per-sample,
            per-scale decisions replace --resample/--refine_steps/--p_resample. One trained on other generator
            weights (--ckpt with --ema) is refused.
    """
    from tqdm import tqdm

    from srdd_lightning.loading import fingerprint, load_generator, resolve_checkpoint

    # ---- checks that need no model: every process fails alike, before any process group forms
    sampling = sampling or SamplingConfig()
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if not timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {timeout}")
    _check_counts(num_per_class, num_samples)
    if edit is None and any(v is not None for v in (image, mask, keep_box, keep_scales)):
        raise ValueError("--image/--mask/--keep_box/--keep_scales only apply with --edit")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder")
    dev = _device(device)
    ckpt_file = resolve_checkpoint(ckpt, "--ckpt")
    module = load_generator(ckpt_file, ema=ema, tokenizer_ckpt=tokenizer_ckpt)
    generator, tokenizer = module.generator, module.tokenizer
    labels = plan_labels(generator.num_classes, generator.null_class, num_per_class, classes, num_samples)
    policy_module = None
    if policy_ckpt is not None:
        from srdd_lightning.stages.policy import load_policy

        policy_module = load_policy(policy_ckpt, module, option="--policy_ckpt")
    sampler = module.sampler()
    try:
        schedule = sampler.schedule(sampling.schedule)
    except ValueError as e:
        raise ValueError(f"--schedule: {e}") from None
    sampling.check_schedule(schedule)

    with process_group(dev.type, timeout) as ranks:
        rank, world = ranks.rank, ranks.world
        generator_fp = fingerprint(generator) if rank == 0 else None  # only rank 0 keeps the record
        dev = _rank_device(dev, ranks)
        module.to(dev)
        sampler = module.sampler()
        sampler.channels_last_decode = channels_last_decode
        policy = policy_module.to(dev).policy() if policy_module is not None else None
        spec, edit_record, ref = None, None, None
        if edit is not None:
            spec, edit_record, ref = build_edit(edit, tokenizer, schedule, image, mask, keep_box, keep_scales)
        record = {
            "format": RECORD_FORMAT, "complete": False,  # True once every PNG, the grid and the npz are written
            "checkpoint": str(ckpt_file), "generator_fingerprint": generator_fp,
            "tokenizer": module.tokenizer_info["path"], "tokenizer_fingerprint": module.tokenizer_info["fingerprint"],
            "ema": ema, "attn": generator.config.attn,
            "num_samples": len(labels), "num_classes": generator.num_classes, "classes": sorted(set(labels)),
            "labels": "samples.npz['labels']; file {index:06d}_c{class}.png", "label_runs": label_runs(labels),
            "seed": seed, "seeds": "seed + index",
            "sampling": sampling.to_dict(), "schedule": list(schedule), "edit": edit_record,
            "precision": precision, "channels_last_decode": channels_last_decode,
            "batch_size": batch_size, "world_size": world,
            "policy": None if policy_module is None else {
                "checkpoint": policy_module.checkpoint_path, "objective": policy_module.hparams.objective,
                "sampling_trained": policy_module.sampling.to_dict(),
                "replaces": "resample, refine_steps, p_resample (per sample and scale)"},
            "policy_fingerprint": None if policy_module is None else policy_module.fingerprint(),
        }  # fmt: skip

        def prepare() -> tuple[list[int], dict | None]:
            missing, previous = prepare_folder(out_dir, record, labels, overwrite)
            if ref is not None:
                save_png(to_uint8(ref)[0], out_dir / "reference.png")
            return missing, previous

        missing, previous = ranks.on_rank0(prepare)
        todo = missing[rank::world]  # the missing ones, not i ≡ rank: a resumed run stays balanced
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and dev.type == "cuda" else None
        seconds, costs = 0.0, []
        bar = tqdm(total=len(missing), desc=f"srdd sample ({world} process{'es' if world > 1 else ''})",
                   disable=not progress or rank != 0)  # fmt: skip
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            t0 = time.perf_counter()
            with amp if amp is not None else contextlib.nullcontext():
                result = sampler.sample([labels[i] for i in idx], sampling, seeds=[seed + i for i in idx], edit=spec,
                                        policy=policy)  # fmt: skip
            images = to_uint8(result.images).cpu()
            seconds += time.perf_counter() - t0
            costs.append((len(idx), result.cost.to_dict()))
            for i, img in zip(idx, images):
                save_png(img, sample_path(out_dir, i, labels[i]))
            bar.update(min(len(idx) * world, bar.total - bar.n))  # rank 0 stands for all: the shares are equal
        bar.close()
        stats = ranks.gather({"images": len(todo), "seconds": seconds, "cost_per_image": _average_cost(costs),
                              "device": str(dev)})  # fmt: skip

        def finish() -> None:
            absent = [i for i in missing if not sample_path(out_dir, i, labels[i]).exists()]
            if absent:
                raise ValueError(f"--out {out_dir}: {len(absent)} samples written by other processes "
                                 f"(e.g. {sample_path(out_dir, absent[0], labels[absent[0]]).name}) are not visible to "
                                 f"rank 0; --out must be a folder every process sees (a shared file system)")  # fmt: skip
            if missing or not ((out_dir / "samples.npz").is_file() and (out_dir / "grid.png").is_file()):
                write_outputs(out_dir, labels)
            write_json(out_dir / SAMPLING_JSON, {**record, **_timing(previous, stats), "complete": True})
            if progress:
                print(f"srdd sample: {len(labels)} samples in {out_dir} ({len(missing)} drawn now)")

        ranks.on_rank0(finish)
    return out_dir


def _timing(previous: dict | None, stats: list[dict]) -> dict:
    """Cost and seconds per image over every image timed in this folder: this run's ranks plus earlier runs'."""
    before = _timing_of(previous)
    n_before = before.get("timed_images") or 0
    n = n_before + sum(s["images"] for s in stats)
    seconds = (before.get("seconds_per_image") or 0.0) * n_before + sum(s["seconds"] for s in stats)
    cost = (_average_cost([(n_before, before.get("cost_per_image"))] + [(s["images"], s["cost_per_image"]) for s in stats])
            or before.get("cost_per_image"))  # fmt: skip
    devices = set(before.get("seconds_measured_on") or []) | {s["device"] for s in stats if s["images"]}
    return {"cost_per_image": cost, "seconds_per_image": seconds / n if n else None, "timed_images": n,
            "seconds_measured_on": sorted(devices)}  # fmt: skip


def _average_cost(parts: list[tuple[int, dict | None]]) -> dict | None:
    """The cost per image over batches (or ranks, or runs) of n images each; under a resampling policy each
    sample pays for its own decisions, so batches differ."""
    parts = [(n, c) for n, c in parts if n and c]
    if not parts:
        return None
    total = sum(n for n, _ in parts)
    return {key: [sum(n * c[key][i] for n, c in parts) / total for i in range(len(value))]  # per_scale_passes
            if isinstance(value, list) else sum(n * c[key] for n, c in parts) / total
            for key, value in parts[0][1].items()}  # fmt: skip


def write_outputs(out_dir: Path, labels: list[int], max_rows: int = 16, max_cols: int = 8) -> None:
    """(Re)build ``samples.npz`` (uint8 NHWC ``arr_0`` + ``labels``, by index) and ``grid.png`` from the PNGs."""
    first = load_png(sample_path(out_dir, 0, labels[0]))
    arr = np.empty((len(labels), first.shape[1], first.shape[2], 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        arr[i] = load_png(sample_path(out_dir, i, c)).permute(1, 2, 0).numpy()
    atomic_write(out_dir / "samples.npz", lambda f: np.savez(f, arr_0=arr, labels=np.asarray(labels, dtype=np.int64)))

    # grid: one row per class (up to max_rows classes, evenly spread), its first max_cols samples
    order = list(dict.fromkeys(labels))
    if len(order) > max_rows:
        order = [order[round(r * (len(order) - 1) / (max_rows - 1))] for r in range(max_rows)]
    if len(order) == 1:  # one class: fill a square-ish grid
        picks = list(range(min(len(labels), max_rows * max_cols)))
        cols = min(max_cols, len(picks))
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


# ---- command line -----------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    """A type as a user reads it: ``int | list[int]`` -> 'an integer, or a list [a,b,...] of them (one per scale)'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [a for a in args if a is not type(None)]
        optional = " (or null)" if len(parts) < len(args) else ""
        if len(parts) == 2 and typing.get_origin(parts[1]) is list and typing.get_args(parts[1])[0] == parts[0]:
            return f"{_describe(parts[0])}, or a list [a,b,...] of them (one per scale){optional}"
        return " or ".join(_describe(a) for a in parts) + optional
    if origin is list:
        return f"a list [a,b,...] of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _parse_error(e: Exception) -> str:
    """jsonargparse's multi-line report of a bad value -> one line naming the option, the value and what it takes."""
    text = str(e)
    key = re.match(r'Parser key "([^"]+)":\s*', text)
    if key is None:
        text = re.sub(r"(arguments are required: )(.*)", lambda m: m[1] + ", ".join(f"--{a}" for a in m[2].split(", ")), text)
        return f"{text.splitlines()[0]} (srdd sample --help lists the options)"
    given = re.search(r"(?:Given value|Got value): (.*)$", text, re.M)
    if given is None:  # not a type mismatch, e.g. a --config file that does not exist
        return f"--{key.group(1)}: {text[key.end():].splitlines()[0]}"
    tp = {**typing.get_type_hints(sample_to_folder), **typing.get_type_hints(SamplingConfig)}.get(key.group(1))
    expected = f"; it takes {_describe(tp)}" if tp is not None else ""
    return f"--{key.group(1)} {given.group(1)!r} is not valid{expected}"


def _fail(message: str) -> NoReturn:
    print(f"srdd sample: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> Path:
    """``srdd sample`` (``--help`` documents the options). A user's mistake (a bad value, a missing or unreadable file)
    prints one line ``srdd sample: error: ...`` and exits with status 2; ``--debug true`` or SRDD_DEBUG=1: traceback."""
    from argparse import ArgumentError

    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # SamplingConfig's field docs become --help text
    parser = ArgumentParser(prog="srdd sample", exit_on_error=False,  # its errors come back here, reported in one line
                            description="Sample a trained generator into a folder: {index:06d}_c{class}.png, grid.png, "
                            "samples.npz (uint8 NHWC arr_0 + labels) and sampling.json. Resumable (same settings); "
                            "several processes under torchrun. Lists are written [a,b,...].")
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with any of these options.")
    parser.add_function_arguments(sample_to_folder, nested_key=None, skip={"sampling"})
    parser.add_class_arguments(SamplingConfig, nested_key=None)
    parser.add_argument("--debug", type=bool, default=False,
                        help="Show the traceback of an error instead of one line (also: environment SRDD_DEBUG=1).")  # fmt: skip
    try:
        cfg = parser.parse_args(list(argv) if argv is not None else None)
    except ArgumentError as e:
        _fail(_parse_error(e))
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    debug = kwargs.pop("debug") or os.environ.get("SRDD_DEBUG", "") not in ("", "0")
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    try:
        sampling = SamplingConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
        return sample_to_folder(sampling=sampling, **kwargs)
    except (ValueError, FileNotFoundError) as e:  # the project's input errors; anything else is a bug: traceback
        if debug:
            raise
        _fail(str(e))


__all__ = [
    "RECORD_FORMAT", "Ranks", "build_edit", "label_runs", "main", "own_files", "parse_classes", "plan_labels",
    "prepare_folder", "process_group", "sample_path", "sample_to_folder", "settings_differences", "write_outputs",
]  # fmt: skip
