"""``make reproduce-table``: the paper's comparison table, end to end, as markdown + plots + TensorBoard.

    make reproduce-table                        # built-in digits on the CPU (packs, trains, samples, evaluates)
    make reproduce-table DATASET=ffhq           # a paper dataset: experiments/ffhq.yaml, Inception features, GPU
    python -m srdd_lightning.table --help       # every option

Steps (each prints what it does and where its outputs go):

1. data: the packed dataset (``data/<dataset>``; the digits are packed on first use);
2. feature extractor: the digits classifier (trained on first use, val accuracy >= 95 % required) or
   torch-fidelity's Inception weights (``--inception_weights`` / SRDD_INCEPTION_WEIGHTS);
3. stages, via the real ``srdd fit`` commands (finished runs are reused, interrupted ones resumed): the
   tokenizer, then VAR (causal mask) and SDD (Markov mask) under the same budget (their configs may differ
   only in ``attn``; checked), and the fewer-scale student when ``experiments/<dataset>/student.yaml`` exists;
4. rows, each sampled with ``srdd sample``'s machinery and scored like ``srdd evaluate``:
   VAR · SDD · +simple resampling · +mask resampling · +tuned guidance (chosen by a sweep on held-out seeds)
   · student · learned policy (skipped with a note when missing), plus two anchors (real validation images,
   tokenizer reconstructions) and the sweeps behind the plots;
5. ``results/<dataset>/table.md`` (+ ``table.json``), PNG plots (FID vs refinement steps, vs guidance, vs
   cost) and the same in TensorBoard (``runs/<dataset>/table``).

Every row's result is a JSON file keyed by its settings, sample count, seeds, feature extractor, reference
and the SHA-256 of its checkpoint: re-running reuses finished rows and recomputes only what changed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from srdd_lightning.data.index import ShardIndex
from srdd_lightning.evaluation import (
    DEFAULT_CACHE_DIR,
    EvaluationError,
    evaluate_arrays,
    extractor_description,
    extractor_from_options,
    load_samples,
    load_split,
    write_json,
)
from srdd_lightning.sampling.config import SamplingConfig
from srdd_lightning.utils.images import from_uint8, to_uint8

TABLE_FORMAT = "srdd-table-row-v2"  # bump when the metrics change: rows are re-scored, samples reused
DEFAULT_CKPT_EVERY = 500  # cli.py's default checkpoint.every_n_train_steps
PAPER_DATASETS = ("ffhq", "miniimagenet", "sun397")


class TableError(RuntimeError):
    """The pipeline cannot run as configured (missing data, weights or configs): the message says what to do."""


def say(msg: str) -> None:
    print(f"[reproduce-table] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


@dataclass
class TableConfig:
    """Options of ``make reproduce-table`` (``python -m srdd_lightning.table --help``)."""

    dataset: str = "digits"
    """``digits`` (built-in, CPU) or a paper dataset: ffhq, miniimagenet, sun397."""
    data: str | None = None
    """Packed dataset folder (default: data/<dataset>)."""
    experiments: str = "experiments"
    """Folder of the stage configs: <experiments>/<dataset>/{tokenizer,srdd,var,student}.yaml (or <dataset>.yaml)."""
    runs: str = "runs"
    """Run root of ``srdd fit`` (run folders runs/<dataset>/<stage>)."""
    results: str = "results"
    """Outputs go to <results>/<dataset>/: table.md, table.json, plots, rows/, samples/, logs/."""
    extractor: str | None = None
    """Feature extractor (default: digits-classifier for digits, inception-v3-compat otherwise)."""
    classifier: str | None = None
    """Digits classifier checkpoint (default: <runs>/digits/classifier.pt; trained when missing)."""
    inception_weights: str | None = None
    """torch-fidelity's Inception weights (default: the env var SRDD_INCEPTION_WEIGHTS)."""
    cache_dir: str = DEFAULT_CACHE_DIR
    """Cached reference statistics (shared with ``srdd evaluate``)."""
    num_samples: int | None = None
    """Samples per row (default: 2000 for digits, 10000 for the paper datasets)."""
    sweep_samples: int | None = None
    """Samples per point of the held-out guidance sweep (default: num_samples)."""
    seed: int = 0
    """Evaluation seeds: sample i uses seed + i."""
    sweep_seed: int = 1_000_000
    """Held-out seeds of the guidance sweep (sample i uses sweep_seed + i), disjoint from the evaluation seeds."""
    cfg: float = 1.5
    """Guidance of the baseline rows (VAR's FID protocol: 1.5, linear ramp)."""
    top_k: int = 900
    """Top-k of every row (VAR's protocol: 900; at or above the vocabulary size it is off)."""
    top_p: float = 0.96
    """Top-p of every row (VAR's protocol: 0.96)."""
    refine_steps: int = 2
    """Refinement steps R per scale of the resampling rows."""
    p_resample: float = 0.5
    """Mask resampling: tokens with probability >= this are kept."""
    guidance_grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    """Guidance weights of the held-out sweep that picks the +tuned guidance row."""
    refine_grid: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    """Refinement steps of the FID-vs-refinement curves (evaluation seeds; rows use refine_steps)."""
    zero_shot_schedule: list[int] | None = None
    """Also sample SDD on this subset of its scales, without a student (default: the student's schedule, else
    1-2-4-6-8 for digits and 1-3-5-8-13-16 otherwise; [] turns the row off)."""
    batch_size: int | None = None
    """Samples per sampler call (default: 250 for digits, 64 otherwise)."""
    device: str = "auto"
    """Sampling / feature device: cpu, cuda or auto."""
    fit_args: list[str] = field(default_factory=list)
    """Extra options for every ``srdd fit`` (e.g. ["--trainer.accelerator", "gpu"])."""
    smoke_steps: int | None = None
    """Train every stage for only this many steps (warmup cut to a tenth): a quick check of the pipeline, not a table."""
    keep_pngs: bool = False
    """Keep one PNG per sample beside samples.npz (and grid.png) in samples/<key>/."""
    parallel_fits: bool | None = None
    """Train VAR, SDD (and the student) at the same time, one CPU thread each (default: on for digits on the CPU,
    where two single-threaded runs use 2 cores better than one after the other; off for GPU datasets)."""
    min_classifier_accuracy: float = 0.95
    """The digits classifier must reach this validation accuracy."""

    def __post_init__(self) -> None:
        gpu = self.dataset != "digits"
        self.data = self.data or f"data/{self.dataset}"
        self.extractor = self.extractor or ("inception-v3-compat" if gpu else "digits-classifier")
        self.classifier = self.classifier or f"{self.runs}/digits/classifier.pt"
        self.num_samples = self.num_samples or (10_000 if gpu else 2000)
        self.sweep_samples = self.sweep_samples or self.num_samples
        self.batch_size = self.batch_size or (64 if gpu else 250)
        if self.parallel_fits is None:
            self.parallel_fits = not gpu
        if self.num_samples < 2 or self.sweep_samples < 2:
            raise ValueError("num_samples and sweep_samples must be >= 2")
        if self.sweep_seed < self.seed + self.num_samples and self.seed < self.sweep_seed + self.sweep_samples:
            raise ValueError(f"the held-out seeds (sweep_seed={self.sweep_seed}, {self.sweep_samples} samples) overlap the "
                             f"evaluation seeds (seed={self.seed}, num_samples={self.num_samples}); move sweep_seed")  # fmt: skip

    @property
    def out_dir(self) -> Path:
        return Path(self.results) / self.dataset

    def base_sampling(self, **changes) -> SamplingConfig:
        return SamplingConfig(cfg=self.cfg, top_k=self.top_k, top_p=self.top_p, **changes)


# ---------------------------------------------------------------------------------------------
# Rows: specification, key, store, reuse
# ---------------------------------------------------------------------------------------------


@dataclass
class RowSpec:
    """One evaluated configuration: a table row, a sweep point or an anchor."""

    name: str
    """Identifier (e.g. ``sdd_mr``)."""
    label: str
    """What the table shows."""
    stage: str
    """Checkpoint it uses: var, srdd, student, tokenizer (reconstructions) or real (no model)."""
    group: str = "table"
    """table, anchor, refine (FID vs refinement), guidance (held-out sweep)."""
    sampling: SamplingConfig | None = None
    seed: int = 0
    num_samples: int = 0

    def settings(self) -> dict[str, Any]:
        """What determines the result besides the checkpoint and the evaluation context."""
        return {"stage": self.stage, "sampling": self.sampling.to_dict() if self.sampling else None,
                "seed": self.seed, "num_samples": self.num_samples}  # fmt: skip


def row_key(spec: RowSpec, checkpoint_sha: str | None, context: dict[str, Any]) -> str:
    """SHA-256 (16 hex) of the settings, the checkpoint hash and the evaluation context (extractor, reference)."""
    payload = {"format": TABLE_FORMAT, "settings": spec.settings(), "checkpoint": checkpoint_sha, "context": context}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def samples_key(spec: RowSpec, checkpoint_sha: str | None) -> str:
    """What the samples alone depend on (settings + checkpoint): re-scoring them never resamples."""
    payload = {"settings": spec.settings(), "checkpoint": checkpoint_sha}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class RowStore:
    """Finished rows as ``<dir>/<key>.json`` (written atomically, so a half-written row never counts)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def load(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            result = json.loads(p.read_text())
        except json.JSONDecodeError:
            return None
        return result if result.get("format") == TABLE_FORMAT and result.get("key") == key else None

    def save(self, key: str, result: dict[str, Any]) -> None:
        write_json(self.path(key), result)


def run_row(
    spec: RowSpec,
    store: RowStore,
    checkpoint: str | None,
    checkpoint_sha: str | None,
    context: dict[str, Any],
    compute: Callable[[RowSpec, str | None, str], dict[str, Any]],
) -> dict[str, Any]:
    """The row's result: reused from ``store`` when its key is there, else ``compute(spec, checkpoint, key)``."""
    key = row_key(spec, checkpoint_sha, context)
    cached = store.load(key)
    if cached is not None:
        say(f"row {spec.name}: reusing {store.path(key)}")
        return {**cached, "name": spec.name, "label": spec.label, "group": spec.group, "reused": True}
    say(f"row {spec.name} ({spec.label}): computing, result -> {store.path(key)}")
    t0 = time.time()
    result = compute(spec, checkpoint, key)
    result = {"format": TABLE_FORMAT, "key": key, **result, "settings": spec.settings(), "checkpoint": checkpoint,
              "checkpoint_sha256": checkpoint_sha, "context": context, "row_seconds": round(time.time() - t0, 2),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    store.save(key, result)
    m = result["metrics"]
    say(f"row {spec.name}: FID {m['fid']:.3f} on {m['num_samples']} samples ({result['row_seconds']:.0f} s)")
    return {**result, "name": spec.name, "label": spec.label, "group": spec.group, "reused": False}


def file_sha256(path: str | os.PathLike, _cache: dict = {}) -> str:  # noqa: B006 - a per-process memo
    """SHA-256 of a file (memoised by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[memo] = h.hexdigest()
    return _cache[memo]


# ---------------------------------------------------------------------------------------------
# Rendering: markdown and plots
# ---------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def describe_guidance(s: dict | None) -> str:
    if not s:
        return "–"
    sched = s["cfg_schedule"]
    if isinstance(sched, list):
        return "per scale " + ",".join(f"{t:g}" for t in sched)
    return f"{s['cfg']:g} ({sched})" if s["cfg"] > 0 else "none"


def describe_filter(s: dict | None) -> str:
    return "–" if not s else f"{s['top_k']} / {s['top_p']:g}"


def describe_refine(s: dict | None) -> str:
    if not s:
        return "–"
    modes = s["resample"] if isinstance(s["resample"], list) else [s["resample"]]
    steps = s["refine_steps"] if isinstance(s["refine_steps"], list) else [s["refine_steps"]]
    if all(m == "none" for m in modes) or all(r == 0 for r in steps):
        out = "none"
    else:
        mode = "/".join(sorted(set(m for m in modes if m != "none")))
        r = "/".join(str(x) for x in sorted(set(steps)))
        out = f"{mode} ×{r}" + (f", keep p≥{s['p_resample']:g}" if "mask" in mode else "")
    if s.get("schedule"):
        out += f"; scales {'-'.join(map(str, s['schedule']))}"
    return out


def describe_seeds(spec_settings: dict) -> str:
    n, s = spec_settings.get("num_samples"), spec_settings.get("seed")
    return "–" if not n else f"{s}…{s + n - 1}"


TABLE_COLUMNS = ["Row", "FID ↓", "IS ↑", "class acc ↑", "precision ↑", "recall ↑", "s / img", "tokens / img",
                 "attn pairs / img", "N", "seeds", "guidance", "top-k / top-p", "refinement"]  # fmt: skip


def table_line(r: dict[str, Any]) -> list[str]:
    m, cost = r.get("metrics", {}), r.get("cost_per_image") or {}
    s = r["settings"].get("sampling")
    is_ = m.get("inception_score")
    return [
        r["label"], _fmt(m.get("fid")), _fmt(is_, ".2f"), _fmt(m.get("class_accuracy"), ".1%"),
        _fmt(m.get("precision")), _fmt(m.get("recall")), _fmt(r.get("seconds_per_image"), ".4f"),
        _fmt(cost.get("tokens"), "d") if cost else "–", _fmt(cost.get("attention_pairs"), "d") if cost else "–",
        _fmt(m.get("num_samples"), "d"), describe_seeds(r["settings"]) if s else r.get("seeds_note", "–"),
        describe_guidance(s), describe_filter(s), describe_refine(s),
    ]  # fmt: skip


def render_markdown(header: dict[str, Any], rows: Sequence[dict[str, Any]], anchors: Sequence[dict[str, Any]] = (),
                    notes: Sequence[str] = ()) -> str:
    """The table as markdown: a header naming extractor, reference and protocol, the rows, anchors and notes."""
    lines = [f"# SRDD reproduction table: {header['dataset']}", ""]
    for k, v in header.items():
        if k != "dataset":
            lines.append(f"- **{k}**: {v}")
    lines += ["", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(table_line(r)) + " |" for r in rows]
    if anchors:
        lines += ["", "Anchors (the same evaluation, no generator):", "",
                  "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]  # fmt: skip
        lines += ["| " + " | ".join(table_line(r)) + " |" for r in anchors]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _curve(points: Sequence[dict], x_of: Callable[[dict], float]) -> tuple[list[float], list[float]]:
    pts = sorted((x_of(r), r["metrics"]["fid"]) for r in points)
    return [p[0] for p in pts], [p[1] for p in pts]


SHORT_NAMES = {"var": "VAR", "sdd": "SDD", "sdd_sr": "+SR", "sdd_mr": "+MR", "sdd_mr_cfg": "+MR+cfg",
               "student": "student", "sdd_zero_shot": "SDD fewer scales"}  # fmt: skip


def make_figures(results: Sequence[dict[str, Any]], title: str = "") -> dict[str, Any]:
    """matplotlib figures: fid_vs_refinement, fid_vs_guidance, fid_vs_cost (those with data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, Any] = {}
    refine = [r for r in results if r["group"] == "refine"]
    if refine:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode in ("simple", "mask"):
            pts = [r for r in refine if r["name"].startswith(f"refine_{mode}")]
            if len(pts) > 1:
                xs, ys = _curve(pts, lambda r: r["settings"]["sampling"]["refine_steps"])
                ax.plot(xs, ys, marker="o", label=f"{mode} resampling")
        ax.set(xlabel="refinement steps R per scale", ylabel="FID", title=f"{title}FID vs refinement (SDD)")
        ax.legend()
        figs["fid_vs_refinement"] = fig
    sweep = [r for r in results if r["group"] == "guidance"]
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs, ys = _curve(sweep, lambda r: r["settings"]["sampling"]["cfg"])
        ax.plot(xs, ys, marker="o", label="held-out seeds")
        best = min(sweep, key=lambda r: r["metrics"]["fid"])
        ax.axvline(best["settings"]["sampling"]["cfg"], color="grey", ls="--", lw=1, label="chosen")
        ax.set(xlabel="guidance weight (linear ramp)", ylabel="FID", title=f"{title}FID vs guidance (SDD + mask resampling)")
        ax.legend()
        figs["fid_vs_guidance"] = fig
    costed = [r for r in results if r["group"] in ("table", "refine") and r.get("cost_per_image")]
    if costed:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for group, marker in (("refine", "."), ("table", "o")):
            pts = [r for r in costed if r["group"] == group]
            if pts:
                ax.scatter([r["cost_per_image"]["tokens"] for r in pts], [r["metrics"]["fid"] for r in pts],
                           marker=marker, label="table rows" if group == "table" else "refinement sweep")  # fmt: skip
        for r in costed:
            if r["group"] == "table":
                ax.annotate(SHORT_NAMES.get(r["name"], r["name"]), (r["cost_per_image"]["tokens"], r["metrics"]["fid"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set(xlabel="forward tokens per image (guidance doubles)", ylabel="FID", title=f"{title}FID vs cost")
        ax.legend(fontsize=7)
        figs["fid_vs_cost"] = fig
    for fig in figs.values():
        fig.tight_layout()
    return figs


def write_outputs(out_dir: Path, markdown: str, results: Sequence[dict], figures: dict[str, Any],
                  tb_dir: Path | None) -> list[Path]:
    """table.md, table.json, <figure>.png; the same markdown and figures into TensorBoard at ``tb_dir``."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "table.md"]
    tmp = out_dir / ".table.md.tmp"
    tmp.write_text(markdown)
    os.replace(tmp, written[0])
    written.append(write_json(out_dir / "table.json", list(results)))
    for name, fig in figures.items():
        p = out_dir / f"{name}.png"
        fig.savefig(p, dpi=120)
        written.append(p)
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        for old in Path(tb_dir).glob("events.out.tfevents.*"):  # one table per folder: the previous run's goes
            old.unlink()
        with SummaryWriter(str(tb_dir)) as w:
            w.add_text("table", markdown)
            for name, fig in figures.items():
                w.add_figure(f"table/{name}", fig, close=False)
            for r in results:
                if r["group"] in ("table", "anchor"):
                    w.add_scalar(f"table/fid/{r['name']}", r["metrics"]["fid"], 0)
        written.append(tb_dir)
    for fig in figures.values():
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------
# Stages: srdd fit (reused / resumed / trained)
# ---------------------------------------------------------------------------------------------


def _get(d: dict, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def check_same_budget(srdd_cfg: dict, var_cfg: dict, srdd_name: str, var_name: str) -> dict[str, Any]:
    """VAR and SDD must differ only in the attention mask (and run name); returns the shared budget."""
    a, b = copy.deepcopy(srdd_cfg), copy.deepcopy(var_cfg)
    for c in (a, b):
        c.get("model", {}).get("init_args", {}).pop("attn", None)
        c.pop("run", None)
    differ = _diff(a, b)
    if differ:
        raise TableError(f"{var_name} and {srdd_name} must train under the same budget and differ only in "
                         f"model.init_args.attn, but they also differ in: {', '.join(differ)}")  # fmt: skip
    return {"max_steps": _get(srdd_cfg, "trainer.max_steps"), "global batch": _get(srdd_cfg, "data.batch_size", 64),
            "lr": _get(srdd_cfg, "model.init_args.lr", 1e-4), "generator": _get(srdd_cfg, "model.init_args.generator")}  # fmt: skip


@dataclass
class Stage:
    """One ``srdd fit`` run: its config, extra options and run folder."""

    name: str
    config: Path
    run_name: str
    extra: list[str] = field(default_factory=list)

    def yaml(self) -> dict:
        return yaml.safe_load(self.config.read_text()) or {}


def run_dir(runs: str, stage: Stage) -> Path:
    return Path(runs) / stage.run_name


def finished_checkpoint(runs: str, stage: Stage, max_steps: int | None) -> tuple[Path | None, int | None]:
    """(newest last.ckpt of the run, its global_step) or (None, None)."""
    from srdd_lightning.loading import resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(run_dir(runs, stage))
    except FileNotFoundError:
        return None, None

    def step_of(p: Path) -> int:
        try:
            return int(torch.load(p, map_location="cpu", weights_only=False, mmap=True).get("global_step") or -1)
        except Exception:
            return -1

    # A resumed run whose ModelCheckpoint state did not match writes last-v1.ckpt beside the old last.ckpt:
    # take the furthest of them.
    candidates = sorted(ckpt.parent.glob("last*.ckpt"), key=lambda p: (step_of(p), p.stat().st_mtime))
    best = candidates[-1] if candidates else ckpt
    step = step_of(best)
    return best, (step if step >= 0 else None)


def srdd_command() -> list[str]:
    exe = Path(sys.executable).with_name("srdd")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "srdd_lightning.cli"]


def fit_subprocess(args: list[str], log: Path, env: dict[str, str] | None = None, prefix: str = "") -> None:
    """Run ``srdd fit ...``: full output to ``log``; the console gets its lines (after ``prefix``), progress bars
    at most every 30 s. ``env`` adds environment variables."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = srdd_command() + args
    say(f"{prefix}$ {' '.join(cmd)}   (log: {log})")
    last_progress = 0.0
    full_env = {**os.environ, **(env or {})}
    with open(log, "ab") as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env) as proc:
        buf = b""
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            f.write(chunk)
            buf += chunk
            *parts, buf = buf.replace(b"\r", b"\n\r").split(b"\n")
            for part in parts:
                text = part.decode(errors="replace")
                if text.startswith("\r"):  # a progress-bar redraw
                    if time.time() - last_progress > 30:
                        last_progress = time.time()
                        print(f"    {prefix}" + text.strip()[-150:], flush=True)
                elif text.strip():
                    print(f"    {prefix}" + text, flush=True)
        rc = proc.wait()
    if rc != 0:
        raise TableError(f"`{' '.join(cmd)}` failed with exit code {rc}; see {log}")


def ensure_trained(stage: Stage, cfg: TableConfig, fit: Callable[..., None], **fit_kwargs) -> Path:
    """Reuse a finished run, resume an interrupted one, or train from scratch; returns its last.ckpt.

    ``fit(args, log, **fit_kwargs)`` runs ``srdd fit`` (``fit_subprocess``; tests pass a stand-in)."""
    conf = stage.yaml()
    max_steps = _get(conf, "trainer.max_steps")
    smoke: list[str] = []
    if cfg.smoke_steps:
        max_steps = cfg.smoke_steps
        smoke = ["--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(max(1, max_steps // 2))]
        if _get(conf, "model.init_args.warmup_steps") is not None:
            smoke += ["--model.init_args.warmup_steps", str(min(_get(conf, "model.init_args.warmup_steps"), max_steps // 10))]
    # Lightning writes last.ckpt at the end of fit only if it never wrote one before, so a run whose max_steps is
    # not a multiple of checkpoint.every_n_train_steps keeps its last *periodic* checkpoint: save on a divisor.
    every = _get(conf, "checkpoint.every_n_train_steps", DEFAULT_CKPT_EVERY)
    if max_steps and every and max_steps % every:
        smoke += ["--checkpoint.every_n_train_steps", str(math.gcd(max_steps, every))]
    ckpt, step = finished_checkpoint(cfg.runs, stage, max_steps)
    base = ["fit", "--config", str(stage.config), "--run.root", cfg.runs, "--run.name", stage.run_name,
            "--data.root", str(cfg.data), *stage.extra, *smoke, *cfg.fit_args]  # fmt: skip
    log = cfg.out_dir / "logs" / f"{stage.name}.log"
    if ckpt is not None and max_steps is not None and step is not None and step >= max_steps:
        say(f"stage {stage.name}: reusing the finished run {ckpt} (step {step} of {max_steps})")
        return ckpt
    if ckpt is not None:
        say(f"stage {stage.name}: resuming {ckpt} (step {step} of {max_steps}) into {run_dir(cfg.runs, stage)}")
        fit(base + ["--ckpt_path", str(ckpt)], log, **fit_kwargs)
    else:
        say(f"stage {stage.name}: training {stage.config} ({max_steps} steps) into {run_dir(cfg.runs, stage)}/version_*")
        fit(base, log, **fit_kwargs)
    ckpt, step = finished_checkpoint(cfg.runs, stage, max_steps)
    if ckpt is None or (max_steps is not None and (step or 0) < max_steps):
        raise TableError(f"stage {stage.name}: `srdd fit` finished, but {run_dir(cfg.runs, stage)} holds "
                         f"{'no checkpoint' if ckpt is None else f'{ckpt} at step {step}'}, not one at step {max_steps}; "
                         f"see {log}")  # fmt: skip
    say(f"stage {stage.name}: done, checkpoint {ckpt} (step {step})")
    return ckpt


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class TablePipeline:
    """Data → extractor → stages → rows → table. ``fit``/``sample`` are injectable (tests count their calls)."""

    def __init__(self, cfg: TableConfig, fit: Callable[[list[str], Path], None] | None = None,
                 sample: Callable[..., Any] | None = None):
        self.cfg = cfg
        self.fit = fit or fit_subprocess
        if sample is None:
            from srdd_lightning.sampling.sample_cli import sample_to_folder

            sample = sample_to_folder
        self.sample = sample
        self.notes: list[str] = []
        self.header: dict[str, Any] = {}
        self.store = RowStore(cfg.out_dir / "rows")
        self.results: list[dict[str, Any]] = []

    # ---- 0. configs and preflight ----------------------------------------------------------

    def stages(self) -> dict[str, Stage]:
        """The stage configs: <experiments>/<dataset>/<stage>.yaml; a paper dataset may give only <dataset>.yaml
        (the SDD config; VAR is the same with ``attn: causal``)."""
        cfg, ds = self.cfg, self.cfg.dataset
        folder = Path(cfg.experiments) / ds
        out: dict[str, Stage] = {}
        for name in ("tokenizer", "srdd", "var", "student"):
            p = folder / f"{name}.yaml"
            if p.is_file():
                out[name] = Stage(name, p, f"{ds}/{name}")
        if "srdd" not in out and (Path(cfg.experiments) / f"{ds}.yaml").is_file():
            out["srdd"] = Stage("srdd", Path(cfg.experiments) / f"{ds}.yaml", f"{ds}/srdd")
        if "var" not in out and "srdd" in out:
            s = out["srdd"]
            out["var"] = Stage("var", s.config, f"{ds}/var", ["--model.init_args.attn", "causal"])
        return out

    def preflight(self) -> dict[str, Stage]:
        """Everything that can be missing is checked before anything runs; one error lists all of it."""
        cfg, problems = self.cfg, []
        stages = self.stages()
        if cfg.dataset != "digits" and not (Path(cfg.data) / "index.json").is_file():
            problems.append(f"no packed dataset at {cfg.data} ({cfg.data}/index.json missing): download {cfg.dataset} and pack "
                            f"it as data/README.md describes (srdd data folder --src ... --out {cfg.data})")  # fmt: skip
        if cfg.extractor == "inception-v3-compat":
            from srdd_lightning.metrics import resolve_inception_weights

            try:
                resolve_inception_weights(cfg.inception_weights)
            except (FileNotFoundError, ValueError) as e:
                problems.append(str(e))
        for needed in ("srdd", "var"):
            if needed not in stages:
                problems.append(f"no {needed} config: expected {cfg.experiments}/{cfg.dataset}/{needed}.yaml"
                                + (f" or {cfg.experiments}/{cfg.dataset}.yaml" if needed == "srdd" else ""))  # fmt: skip
        if "srdd" in stages and "tokenizer" not in stages:
            tok = _get(stages["srdd"].yaml(), "model.init_args.tokenizer_ckpt")
            if tok is None or not Path(tok).exists():
                problems.append(f"the tokenizer {tok} (model.init_args.tokenizer_ckpt in {stages['srdd'].config}) does not "
                                f"exist and there is no {cfg.experiments}/{cfg.dataset}/tokenizer.yaml to train one")  # fmt: skip
        if problems:
            raise TableError(f"cannot reproduce the table for {cfg.dataset!r}:\n  - " + "\n  - ".join(problems))
        return stages

    # ---- 1. data, 2. extractor ---------------------------------------------------------------

    def prepare_data(self) -> ShardIndex:
        cfg = self.cfg
        if cfg.dataset == "digits" and not (Path(cfg.data) / "index.json").is_file():
            from srdd_lightning.data.pack import pack_digits

            say(f"step 1/5 data: packing the built-in digits into {cfg.data}")
            pack_digits(cfg.data)
        index = ShardIndex.load(cfg.data)
        say(f"step 1/5 data: {index.summary().splitlines()[0]}")
        return index

    def prepare_extractor(self, index: ShardIndex):
        cfg = self.cfg
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        if cfg.extractor == "digits-classifier":
            from srdd_lightning.evaluation import train_classifier
            from srdd_lightning.metrics import load_classifier

            if not Path(cfg.classifier).is_file():
                say(f"step 2/5 extractor: training the digits classifier -> {cfg.classifier}")
                train_classifier(cfg.data, cfg.classifier, min_accuracy=0.0)
            _, meta = load_classifier(cfg.classifier)
            acc = meta.get("val_accuracy")
            say(f"step 2/5 extractor: digits classifier {cfg.classifier}, val accuracy {acc:.2%} on {meta.get('num_val')} images")
            if acc is None or acc < cfg.min_classifier_accuracy:
                raise TableError(f"the digits classifier {cfg.classifier} has val accuracy {acc} < {cfg.min_classifier_accuracy}; "
                                 f"delete it and retrain with more epochs (srdd classifier --epochs 40)")  # fmt: skip
            self.header["digits classifier"] = f"{cfg.classifier}, val accuracy {acc:.2%} ({meta.get('num_val')} validation digits)"
        try:
            ext = extractor_from_options(cfg.extractor, cfg.classifier, cfg.inception_weights, dev)
        except EvaluationError as e:
            raise TableError(str(e)) from None
        say(f"step 2/5 extractor: {ext.cache_key} on {dev}")
        return ext

    # ---- 4. rows ---------------------------------------------------------------------------

    def _evaluate_images(self, images, labels) -> dict[str, Any]:
        return evaluate_arrays(images, labels, self.index, self.extractor, self.cfg.cache_dir, None, self.cfg.batch_size)

    def compute_row(self, spec: RowSpec, checkpoint: str | None, key: str) -> dict[str, Any]:
        """Sample (``srdd sample`` machinery) or reconstruct, then evaluate like ``srdd evaluate``."""
        cfg = self.cfg
        if spec.stage in ("var", "srdd", "student"):
            out = cfg.out_dir / "samples" / samples_key(spec, file_sha256(checkpoint))
            record_file = out / "sampling.json"
            done = record_file.is_file() and json.loads(record_file.read_text()).get("num_samples") == spec.num_samples
            if not done or not (out / "samples.npz").is_file():  # else: only re-scored (e.g. after a metric change)
                self.sample(ckpt=checkpoint, out=str(out), num_samples=spec.num_samples, seed=spec.seed,
                            batch_size=cfg.batch_size, sampling=spec.sampling, device=cfg.device, progress=False)  # fmt: skip
            images, labels, record = load_samples(out / "samples.npz")
            if not cfg.keep_pngs:  # samples.npz holds them all; one PNG per sample is many files at 10k+ per row
                for png in out.glob("[0-9]*_c*.png"):
                    png.unlink()
            ev = self._evaluate_images(images, labels)
            return {**ev, "samples": str(out), "sampling_record": record,
                    "seconds_per_image": (record or {}).get("seconds_per_image"),
                    "cost_per_image": (record or {}).get("cost_per_image")}  # fmt: skip
        images, labels = load_split(self.index, "val")
        if spec.stage == "real":
            return {**self._evaluate_images(images, labels), "seeds_note": "val split"}
        from srdd_lightning.loading import load_tokenizer

        tokenizer, _ = load_tokenizer(checkpoint)
        dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        tokenizer.to(dev)
        t0, recon = time.perf_counter(), []
        with torch.no_grad():
            for x in images.split(cfg.batch_size):
                recon.append(to_uint8(tokenizer.reconstruct(from_uint8(x).to(dev))).cpu())
        seconds = (time.perf_counter() - t0) / len(images)
        return {**self._evaluate_images(torch.cat(recon), labels), "seconds_per_image": seconds, "seeds_note": "val split"}

    def row(self, spec: RowSpec, checkpoint: Path | None) -> dict[str, Any]:
        sha = file_sha256(checkpoint) if checkpoint is not None else None
        result = run_row(spec, self.store, str(checkpoint) if checkpoint else None, sha, self.context, self.compute_row)
        self.results.append(result)
        return result

    def build_rows(self, ckpts: dict[str, Path], stages: dict[str, Stage]) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg
        N, seed, R = cfg.num_samples, cfg.seed, cfg.refine_steps
        base = cfg.base_sampling()
        sr = cfg.base_sampling(resample="simple", refine_steps=R)
        mr = cfg.base_sampling(resample="mask", refine_steps=R, p_resample=cfg.p_resample)
        def spec(name, label, stage, sampling, group="table", s=seed, n=N) -> RowSpec:
            return RowSpec(name, label, stage, group, sampling, s, n)

        say(f"step 4/5 rows: {N} samples per row, seeds {seed}…{seed + N - 1}; samples -> {cfg.out_dir / 'samples'}")
        rows = [self.row(spec("var", "VAR (causal)", "var", base), ckpts["var"]),
                self.row(spec("sdd", "SDD (markov)", "srdd", base), ckpts["srdd"]),
                self.row(spec("sdd_sr", f"+ simple resampling (R={R})", "srdd", sr), ckpts["srdd"]),
                self.row(spec("sdd_mr", f"+ mask resampling (R={R}, p={cfg.p_resample:g})", "srdd", mr), ckpts["srdd"])]  # fmt: skip

        say(f"step 4/5 rows: guidance sweep {cfg.guidance_grid} on held-out seeds {cfg.sweep_seed}…"
            f"{cfg.sweep_seed + cfg.sweep_samples - 1} (SDD + mask resampling)")  # fmt: skip
        sweep = [self.row(spec(f"sweep_cfg{g:g}", f"cfg {g:g} (held-out)", "srdd", dataclasses.replace(mr, cfg=float(g)),
                               "guidance", cfg.sweep_seed, cfg.sweep_samples), ckpts["srdd"]) for g in cfg.guidance_grid]  # fmt: skip
        best = min(sweep, key=lambda r: r["metrics"]["fid"])["settings"]["sampling"]["cfg"]
        grid = ", ".join(f"{g:g}" for g in cfg.guidance_grid)
        self.header["guidance tuning"] = (f"SDD + mask resampling swept over cfg ∈ {{{grid}}} "
                                          f"on {cfg.sweep_samples} held-out samples (seeds {cfg.sweep_seed}…); lowest FID at "
                                          f"cfg {best:g}, then evaluated on the evaluation seeds")  # fmt: skip
        tuned = dataclasses.replace(mr, cfg=float(best))
        rows.append(self.row(spec("sdd_mr_cfg", f"+ tuned guidance (cfg {best:g})", "srdd", tuned), ckpts["srdd"]))

        student_schedule = None
        if "student" in ckpts:
            student_schedule = _get(stages["student"].yaml(), "model.init_args.schedule")
            sched = "-".join(map(str, student_schedule)) if student_schedule else "?"
            rows.append(self.row(spec("student", f"fewer-scale student ({sched}), tuned settings", "student", tuned),
                                 ckpts["student"]))  # fmt: skip
        else:
            self.notes.append(f"fewer-scale student: skipped, no {cfg.experiments}/{cfg.dataset}/student.yaml "
                              "(add one with model.init_args.schedule, e.g. [1, 2, 4, 6, 8], to get this row)")  # fmt: skip
        zs = cfg.zero_shot_schedule
        if zs is None:
            zs = student_schedule or ([1, 2, 4, 6, 8] if cfg.dataset == "digits" else [1, 3, 5, 8, 13, 16])
        if zs:
            rows.append(self.row(spec("sdd_zero_shot", f"SDD on scales {'-'.join(map(str, zs))} (no student), tuned settings",
                                      "srdd", dataclasses.replace(tuned, schedule=list(zs))), ckpts["srdd"]))  # fmt: skip
        policy_dir = Path(cfg.runs) / cfg.dataset / "policy"
        why = "the table cannot load a policy checkpoint yet" if policy_dir.exists() else f"no policy run at {policy_dir}"
        self.notes.append(f"learned policy: skipped, {why} (stage 3, DESIGN §2.4)")

        say(f"step 4/5 rows: refinement sweep R ∈ {cfg.refine_grid} (simple and mask) on the evaluation seeds")
        for mode, base_cfg in (("simple", sr), ("mask", mr)):
            for r in cfg.refine_grid:
                s = dataclasses.replace(base_cfg, refine_steps=int(r)) if r else base
                self.row(spec(f"refine_{mode}{r}", f"{mode} R={r}", "srdd", s, "refine"), ckpts["srdd"])

        n_val = self.index.split("val").total
        self.notes.append(f"anchors use the {n_val} validation images: FID is biased upward at small N, so they bound "
                          f"the {N}-sample rows only loosely")  # fmt: skip
        anchors = [self.row(RowSpec("real_val", f"real images (val split, {n_val})", "real", "anchor"), None)]
        if "tokenizer" in ckpts:
            anchors.append(self.row(RowSpec("tokenizer_recon", "tokenizer reconstructions (val split)", "tokenizer", "anchor"),
                                    ckpts["tokenizer"]))  # fmt: skip
        return rows, anchors

    # ---- everything -------------------------------------------------------------------------

    def run(self) -> Path:
        cfg, t_start = self.cfg, time.time()
        say(f"dataset {cfg.dataset}: outputs in {cfg.out_dir}/ (table.md, table.json, plots, rows/, samples/, logs/), "
            f"TensorBoard in {cfg.runs}/{cfg.dataset}/table")  # fmt: skip
        stages = self.preflight()
        self.index = self.prepare_data()
        self.extractor = self.prepare_extractor(self.index)

        budget = check_same_budget(stages["srdd"].yaml(), stages["var"].yaml() if stages["var"].config != stages["srdd"].config
                                   else stages["srdd"].yaml(), str(stages["srdd"].config), str(stages["var"].config))  # fmt: skip
        if cfg.smoke_steps:
            budget["max_steps"] = f"{cfg.smoke_steps} (smoke run; the configs say {budget['max_steps']})"
        say(f"step 3/5 stages: VAR and SDD share the budget {budget}; runs in {cfg.runs}/{cfg.dataset}/")
        t0 = time.time()
        ckpts: dict[str, Path] = {}
        if "tokenizer" in stages:
            ckpts["tokenizer"] = ensure_trained(stages["tokenizer"], cfg, self.fit)
        generators = [stages[n] for n in ("var", "srdd", "student") if n in stages]
        for stage in generators:
            if "tokenizer" in ckpts:  # the generators use the tokenizer trained here
                stage.extra += ["--model.init_args.tokenizer_ckpt", str(ckpts["tokenizer"])]
        if cfg.parallel_fits and len(generators) > 1:
            from concurrent.futures import ThreadPoolExecutor

            say(f"step 3/5 stages: training {', '.join(s.name for s in generators)} side by side, one thread each")
            env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            with ThreadPoolExecutor(len(generators)) as pool:
                futures = {s.name: pool.submit(ensure_trained, s, cfg, self.fit, env=env, prefix=f"[{s.name}] ")
                           for s in generators}  # fmt: skip
                ckpts.update({name: f.result() for name, f in futures.items()})
        else:
            for stage in generators:
                ckpts[stage.name] = ensure_trained(stage, cfg, self.fit)
        train_seconds = time.time() - t0
        if "tokenizer" not in ckpts:
            from srdd_lightning.loading import resolve_checkpoint

            ckpts["tokenizer"] = resolve_checkpoint(_get(stages["srdd"].yaml(), "model.init_args.tokenizer_ckpt"))

        # Evaluation context: part of every row key (a different extractor or reference recomputes the rows).
        from srdd_lightning.evaluation import dataset_reference, reference_description

        ref = dataset_reference(self.index, self.extractor, cfg.cache_dir, batch_size=cfg.batch_size)
        self.context = {"extractor": self.extractor.cache_key, "reference": ref.dataset, "reference_count": ref.count,
                        "resolution": ref.resolution}  # fmt: skip
        t0 = time.time()
        rows, anchors = self.build_rows(ckpts, stages)
        eval_seconds = time.time() - t0

        ext = extractor_description(self.extractor)
        refd = reference_description(ref, self.index)
        header = {
            "dataset": cfg.dataset,
            "feature extractor": f"{ext['name']} (cache key {ext['cache_key']}, {ext['feature_dim']}-d features"
                                 + (f", weights {ext['weights']}" if ext.get("weights") else "") + ")",
            "reference set": f"train split of {refd['root']} ({refd['count']} images, {refd['resolution']} px), "
                             f"statistics cached at {refd['cache']}",
            **self.header,
            "protocol": f"{cfg.num_samples} samples per row (seeds seed…seed+N−1, classes in equal contiguous blocks), "
                        "FID in float64; IS over ≤10 splits; precision/recall k=3 against the stored real features; "
                        "class acc = share of samples the classifier assigns to the requested class",
            "training budget (VAR = SDD)": ", ".join(f"{k} {v}" for k, v in budget.items()),
            "checkpoints": ", ".join(f"{k} {Path(v)} (sha256 {file_sha256(v)[:12]})" for k, v in ckpts.items()),
            "cost": "tokens / attention pairs per image count the doubled guidance batch; seconds per image are wall "
                    f"time on {'the GPU' if cfg.device != 'cpu' and torch.cuda.is_available() else 'a shared CPU'} "
                    "(noisy; compare within this table)",
            **({"SMOKE RUN": f"every stage trained for only {cfg.smoke_steps} steps: a check of the pipeline, not results"}
               if cfg.smoke_steps else {}),
            "caveat": "numbers are comparable only within this table"
                      + (" (a digits-classifier FID is not an Inception FID)" if cfg.extractor == "digits-classifier" else "")
                      + "; the SRDD paper's own numbers are not public",
        }  # fmt: skip
        markdown = render_markdown(header, rows, anchors, self.notes)
        figures = make_figures(self.results, title=f"{cfg.dataset}: ")
        written = write_outputs(cfg.out_dir, markdown, self.results, figures, Path(cfg.runs) / cfg.dataset / "table")
        print(markdown)
        say(f"step 5/5 done in {time.time() - t_start:.0f} s (training {train_seconds:.0f} s, rows {eval_seconds:.0f} s); "
            f"wrote {', '.join(str(p) for p in written)}")  # fmt: skip
        return cfg.out_dir / "table.md"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m srdd_lightning.table [--dataset digits] ...`` (``make reproduce-table``)."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="python -m srdd_lightning.table",
                            description="Reproduce the paper's comparison table (markdown + plots) on a dataset.")  # fmt: skip
    parser.add_class_arguments(TableConfig, nested_key=None)
    ns = parser.parse_args(list(argv) if argv is not None else None)
    cfg = TableConfig(**{f.name: ns[f.name] for f in dataclasses.fields(TableConfig)})
    try:
        TablePipeline(cfg).run()
    except (TableError, EvaluationError) as e:
        print(f"reproduce-table: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
