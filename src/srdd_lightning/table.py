"""``make reproduce-table``: the paper's table as data (experiments/<dataset>/table.yaml: stages = ``srdd fit`` recipes,
rows = a stage + sampling settings), trained, sampled and scored per training seed into results/<dataset>/table.md."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import torch
import yaml
from jsonargparse import CLI

from srdd_lightning import evaluation as ev
from srdd_lightning.data.index import ShardIndex
from srdd_lightning.loading import resolve_checkpoint
from srdd_lightning.metrics.seeds import claim_line, compare
from srdd_lightning.metrics.seeds import seed_stat as stat
from srdd_lightning.sampling import sample_cli
from srdd_lightning.sampling.config import SamplingConfig
from srdd_lightning.utils.io import atomic_write, atomic_write_text, write_json

FORMAT = "srdd-table-row-v3"  # bump when the metrics change: rows are re-scored, their samples reused
REF = re.compile(r"\{(\w+)\}")  # "{srdd}" in a stage's args: stage srdd's checkpoint of the same training seed
NEED = object()  # a key without a default
SCHEMA = {  # each section's keys and defaults; experiments/digits/table.yaml explains them
    "table": {"dataset": NEED, "stages": NEED, "rows": NEED, "columns": NEED, "data": None, "extractor": "digits-classifier",
              "classifier": "runs/digits/classifier.pt", "seeds": [0, 1, 2], "num_samples": 2000, "seed": 0, "batch_size": 250,
              "parallel_fits": 1, "alpha": 0.05, "sampling": {}, "tune": None, "sweeps": [], "claims": [], "notes": {}},
    "stage": {"configs": NEED, "args": {}, "shared": False, "same_budget_as": None},
    "row": {"name": NEED, "label": NEED, "stage": NEED, "sampling": {}, "tuned": False, "policy": None, "vs": None, "seed": None},
    "tune": {"stages": NEED, "seed": NEED, "num_samples": NEED, "grid": {"cfg": [0.0, 1.5]}, "refine": [{}], "seeds": None},
    "sweep": {"name": NEED, "label": NEED, "stage": NEED, "sampling": NEED, "steps": [0, 1, 2, 4, 8], "num_samples": None,
              "seeds": None},
    "claim": {"text": NEED, "kind": NEED, "rows": NEED, "max_cost": 0.8},
}

class TableError(RuntimeError):
    """The table cannot run as configured (bad YAML, missing data or weights): the message says what to do."""

def build(section: str, raw: object, where: str) -> NS:
    """One YAML section with its defaults filled in; an unknown or missing key is named."""
    keys, given = SCHEMA[section], raw if isinstance(raw, dict) else {}
    bad = [f"unknown key {k!r}" for k in given if k not in keys]
    if bad := bad + [f"missing key {k!r}" for k in keys if keys[k] is NEED and k not in given]:
        raise TableError(f"{where}: {bad[0]} (a {section} is a mapping of: {', '.join(keys)})")
    return NS(**{**keys, **given})

def sampling_config(t: NS, *layers: dict, where: str = "sampling") -> SamplingConfig:
    """The table's sampling defaults with ``layers`` on top, in one spelling per distinct sampler: with no refinement
    step the mode is moot ("none"), without guidance its schedule ("linear")."""
    try:
        s = SamplingConfig(**{k: v for layer in (t.sampling, *layers) for k, v in layer.items()})
    except TypeError as e:
        raise TableError(f"{where}: {e} (the fields: {', '.join(SamplingConfig.__dataclass_fields__)})") from None
    none = not any(s.refine_steps if isinstance(s.refine_steps, list) else [s.refine_steps])
    moot = {"resample": "none", "refine_steps": 0, "p_resample": 0.5} if none else {}
    moot |= {"cfg_schedule": "linear"} if s.cfg == 0 and isinstance(s.cfg_schedule, str) else {}
    return SamplingConfig(**{**s.to_dict(), **moot}) if moot else s

def load_table(path: str | Path) -> NS:
    """Parse and check a table YAML; each error names the file and the key."""
    t = build("table", yaml.safe_load(Path(path).read_text()), str(path))
    t.stages = {n: build("stage", s, f"{path}: stages.{n}") for n, s in t.stages.items()}
    for key in ("rows", "sweeps", "claims"):
        setattr(t, key, [build(key[:-1], x, f"{path}: {key}[{i}]") for i, x in enumerate(getattr(t, key))])
    t.tune, t.data, st = t.tune and build("tune", t.tune, f"{path}: tune"), t.data or f"data/{t.dataset}", list(t.stages)
    names = {"stage": st, "policy": st, "same_budget_as": st, "vs": [x.name for x in t.rows],
             "kind": ["better", "cheaper", "converges"], "tuned": [False, True] if t.tune else [False]}  # tuned needs a tune:
    for where, x in [(f"stages.{n}", s) for n, s in t.stages.items()] + [("tune", t.tune)] + [
            (f"{key}[{i}]", x) for key in ("rows", "sweeps", "claims") for i, x in enumerate(getattr(t, key))]:
        if bad := next((k for k in names if getattr(x, k, None) not in (None, *names[k])), None):
            raise TableError(f"{path}: {where}.{bad} is {getattr(x, bad)!r}, not one of: {', '.join(map(str, names[bad]))}")
        sampling_config(t, x.sampling if where.startswith("rows") else {}, where=f"{path}: {where}.sampling")
    if t.tune and (bad := [n for n in t.tune.stages if n not in st]):
        raise TableError(f"{path}: tune.stages names {bad[0]!r}, not one of: {', '.join(st)}")
    for where, x in [("tune", t.tune)] * bool(t.tune) + [(f"sweeps[{i}]", x) for i, x in enumerate(t.sweeps)]:
        if bad := [k for k in x.seeds or [] if k not in t.seeds]:  # else it would silently measure no seed
            raise TableError(f"{path}: {where}.seeds names {bad[0]!r}, not one of the training seeds {t.seeds}")
    for i, (n, s) in enumerate(t.stages.items()):  # "{stage}": an earlier stage; a shared one may name shared ones only
        if bad := [m for v in s.args.values() for m in REF.findall(str(v)) if m not in st[:i] or s.shared > t.stages[m].shared]:
            raise TableError(f"{path}: stages.{n}.args names {bad[0]!r}, not an earlier stage it can take a checkpoint of")
    spans = {(t.seed if x.seed is None else x.seed, t.num_samples) for x in t.rows}
    spans |= {(t.tune.seed, t.tune.num_samples)} if t.tune else set()
    if any(s0 < s1 + n1 and s1 < s0 + n0 for (s0, n0), (s1, n1) in itertools.combinations(spans, 2)):  # held out
        raise TableError(f"{path}: the sample seed ranges (first seed, count) {sorted(spans)} overlap")
    return t

def resolved(stage: NS) -> dict:
    """The stage's config files merged in order (a later one wins, as in ``srdd fit``) and its args, as dotted options."""
    def flat(d: dict, at: str = "") -> dict:  # {"a": {"b": 1}} -> {"a.b": 1}
        return {k: v for key, val in d.items()
                for k, v in (flat(val, f"{at}{key}.") if isinstance(val, dict) and val else {f"{at}{key}": val}).items()}
    return {k: v for c in stage.configs for k, v in flat(yaml.safe_load(Path(c).read_text()) or {}).items()} | stage.args

def check_same_budget(a: NS, b: NS, names: tuple[str, str]) -> None:
    """Two stages whose resolved options differ in ``model.init_args.attn`` only, i.e. train under the same budget."""
    ca, cb = resolved(a), resolved(b)
    if differ := sorted(k for k in ca.keys() | cb.keys() if ca.get(k) != cb.get(k) and k != "model.init_args.attn"):
        raise TableError(f"{names[0]} ({' + '.join(a.configs)}) and {names[1]} ({' + '.join(b.configs)}) must train under"
                         f" the same budget, differing only in model.init_args.attn, but also differ in: {', '.join(differ)}")

def fit_subprocess(args: list[str], log: Path, env: dict[str, str]) -> None:
    """``srdd fit <args>`` in a subprocess, its whole output appended to ``log``."""
    cmd, _ = [sys.executable, "-m", "srdd_lightning.cli", *args], log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[reproduce-table] $ {' '.join(cmd)}   (log: {log})", flush=True)
    with open(log, "ab") as f:
        if rc := subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode:
            raise TableError(f"`{' '.join(cmd)}` failed with exit code {rc}; see {log}")

def ensure_trained(name: str, seed: int | None, stage: NS, t: NS, opts: NS, env: dict[str, str]) -> Path:
    """The last.ckpt of runs/<dataset>/<stage>[/seed_<k>]: reused when this command finished it, else resumed or trained."""
    run, n = f"{t.dataset}/{name}" + (f"/seed_{seed}" if seed is not None else ""), opts.smoke_steps
    args = ["fit", *(a for c in stage.configs for a in ("--config", c)), *(a for k, v in stage.args.items() for a in
            (f"--{k}", str(v))), *["--seed_everything", str(seed)] * (seed is not None), "--run.root", opts.runs,
            "--run.name", run, "--data.root", t.data]
    if n:  # a few steps, validated once, with any warmup cut below them
        args += ["--trainer.max_steps", str(n), "--trainer.val_check_interval", str(n)]
        args += [a for k in resolved(stage) if k.endswith("warmup_steps") for a in (f"--{k}", str(n // 10))]
    # A run this command finished carries a mark of its arguments; any other resumes (a finished one ends at once).
    folder, mark, ckpt = Path(opts.runs) / run, Path(opts.runs) / run / "table-fit.json", None
    if not (mark.is_file() and json.loads(mark.read_text())["args"] == args):
        with contextlib.suppress(FileNotFoundError):
            ckpt = resolve_checkpoint(folder)
        print(f"[reproduce-table] stage {run}: {f'resuming {ckpt}' if ckpt else 'training'}", flush=True)
        log = Path(opts.results) / t.dataset / "logs" / f"{run.replace('/', '-')}.log"
        fit_subprocess(args + ["--ckpt_path", str(ckpt)] * bool(ckpt), log, env)
        write_json(mark, {"args": args, "checkpoint": resolve_checkpoint(folder, "srdd fit's run folder")})
    return resolve_checkpoint(folder)

def train_all(t: NS, opts: NS) -> dict[str, dict[int | None, Path]]:
    """Every stage (in YAML order) and seed, ``parallel_fits`` at a time: {stage: {seed (None if shared): ckpt}}."""
    env, jobs = {"OMP_NUM_THREADS": "1"} if t.parallel_fits > 1 else {}, {}  # 2 busy threads a run spin on shared cores
    def one(n: str, k: int | None) -> Path:  # waits for the checkpoints it names (submitted earlier: no deadlock)
        ck = lambda m: str(jobs[m[1], None if t.stages[m[1]].shared else k].result())  # noqa: E731
        args = {o: REF.sub(ck, v) if isinstance(v, str) else v for o, v in t.stages[n].args.items()}
        return ensure_trained(n, k, NS(**{**vars(t.stages[n]), "args": args}), t, opts, env)
    with ThreadPoolExecutor(t.parallel_fits) as pool:
        for n, s in t.stages.items():
            jobs.update({(n, k): pool.submit(one, n, k) for k in ([None] if s.shared else t.seeds)})
    return {n: {k: job.result() for (m, k), job in jobs.items() if m == n} for n in t.stages}

def describe(s: dict, base: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in s.items() if v != base.get(k)) or "the defaults"

def render_markdown(t: NS, head: dict, rows: dict, reading: list[str], claims: list[str]) -> str:
    """Header lines, the rows (mean ± std over seeds; the floor last), the reading paragraph, the claims."""
    base = next(iter(rows.values()))  # the cost baseline: the first row
    cols = ["Row", *(c[0] for c in t.columns), f"× {base['label']} (tokens / s)", "training seeds", "sampling"]
    lines = [f"# SRDD reproduction table: {t.dataset}", ""] + [f"- **{k}**: {v}" for k, v in head.items()]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows.values():
        cells = [f"{v[0] * s:{f}}" + f" ± {v[1] * s:{f}}" * (len(v[2]) > 1) if (v := stat(r["per_seed"], k))[2] else "–"
                 for _, k, s, f in t.columns]
        rel = (stat(r["per_seed"], k)[0] / stat(base["per_seed"], k)[0] for k in ("tokens", "seconds_per_image"))
        cells += [" / ".join(f"{x:.2f}" for x in rel if x == x) or "–", ", ".join(map(str, r["per_seed"])), r["sampling"]]
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    lines += ["", "**How to read this table.** " + " ".join(reading), "", "**The paper's claims in this run:**", ""]
    return "\n".join(lines + claims) + "\n"

def make_figures(rows: dict, tune: dict | None, sweeps: list[dict], title: str) -> dict:
    """FID and class accuracy vs refinement steps (a curve per sweep), FID vs guidance (the held-out tuning) and vs
    cost; error bars are the std over training seeds."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    cands, figs, R = tune["candidates"] if tune else [], {}, "refinement steps R per scale"
    curves = [(s["label"], s["points"]) for s in sweeps]
    series = {"fid_vs_refinement": (R, curves, "fid"), "accuracy_vs_refinement": (R, curves, "class_accuracy"),
              "fid_vs_guidance": ("guidance weight (held-out sample seeds)",
                                  [(c["group"], [d for d in cands if d["group"] == c["group"]]) for c in cands], "fid"),
              "fid_vs_cost": ("forward tokens per image", [(n, [{**r, "x": stat(r["per_seed"], "tokens")[0]}])
                                                           for n, r in rows.items()], "fid")}  # fmt: skip
    for name, (xlabel, lines, key) in ((k, v) for k, v in series.items() if v[1]):
        ax, (scale, ylabel) = figs.setdefault(name, Figure(figsize=(5.5, 3.8), layout="tight")).subplots(), (
            (100, "class accuracy %") if key == "class_accuracy" else (1, "FID"))
        for label, points in dict(lines).items():  # one curve per label (the tuning: per refinement option)
            m, sd, _ = zip(*(stat(p["per_seed"], key) for p in points))
            ax.errorbar([p["x"] for p in points], np.multiply(m, scale), yerr=np.nan_to_num(sd) * scale, marker="o",
                        capsize=3, label=label)
        ax.set(xlabel=xlabel, ylabel=f"{ylabel} (mean ± std over training seeds)", title=f"{title}{name.replace('_', ' ')}")
        ax.legend(fontsize=6 if len(lines) > 6 else 7)
    return figs

def reproduce_table(dataset: str = "digits", table: str | None = None, runs: str = "runs", results: str = "results",
                    device: str = "auto", inception_weights: str | None = None, smoke_steps: int | None = None) -> Path:
    """Reproduce the paper's comparison table (markdown + plots); rows, seeds, sample counts and grids are in the YAML.

    Args:
        dataset: digits (built-in, CPU) or a paper dataset (ffhq, miniimagenet, sun397: Inception features, GPUs).
        table: The table spec (default experiments/<dataset>/table.yaml).
        runs: Run root of srdd fit: runs/<dataset>/<stage>/seed_<k>, a shared stage in runs/<dataset>/<stage>.
        results: Outputs go to <results>/<dataset>/: table.md, table.json, plots, samples/ (+ metrics), logs/.
        device: Sampling and feature device: cpu, cuda or auto.
        inception_weights: torch-fidelity's Inception weights (default: the env var SRDD_INCEPTION_WEIGHTS).
        smoke_steps: Train every stage for only this many steps: a check of the pipeline, not a table.
    """
    opts, t = NS(**locals()), load_table(table or f"experiments/{dataset}/table.yaml")
    marks, N, base, tune = [("start", time.time())], t.num_samples, sampling_config(t).to_dict(), None  # marks: timings
    for n, s in ((n, s) for n, s in t.stages.items() if s.same_budget_as):
        check_same_budget(t.stages[s.same_budget_as], s, (s.same_budget_as, n))
    index, dev = ShardIndex.load(t.data), ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    ext = ev.extractor_from_options(t.extractor, t.classifier, inception_weights, dev)
    ckpts, out, _ = train_all(t, opts), Path(results) / t.dataset, marks.append(("training", time.time()))
    ref = ev.dataset_reference(index, ext, cache := Path(runs) / "reference_stats", batch_size=t.batch_size)
    metrics_file = f"metrics-{hashlib.sha256(f'{FORMAT}{ext.cache_key}{ref.dataset}'.encode()).hexdigest()[:12]}.json"
    sha = {p: hashlib.file_digest(p.open("rb"), "sha256").hexdigest() for d in ckpts.values() for p in d.values()}
    def per_seed(stage: str, s: SamplingConfig, seed: int, n: int, policy: str | None = None, only: list | None = None):
        """{training seed (of ``only``): metrics} of the stage's checkpoints sampled on seeds seed..seed+n-1, or stored."""
        done = {}
        for k, ckpt in ((k, c) for k, c in ckpts[stage].items() if only is None or k in only):
            pol = ckpts[policy][k] if policy else None  # the policy stage's checkpoint of the same seed
            key = json.dumps({"sampling": s.to_dict(), "seed": seed, "n": n, "ckpt": sha[ckpt], "policy": pol and sha[pol]})
            folder = out / "samples" / hashlib.sha256(key.encode()).hexdigest()[:16]
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # stored: same settings, weights, metrics
                done[k] = json.loads((folder / metrics_file).read_text())
                continue
            if not (folder / "samples.npz").is_file():  # written once every sample exists
                sample_cli.sample_to_folder(ckpt=str(ckpt), out=str(folder), num_samples=n, seed=seed, batch_size=t.batch_size,
                                            sampling=s, device=device, progress=False, policy_ckpt=pol and str(pol))
                for png in folder.glob("[0-9]*_c*.png"):  # samples.npz holds them all
                    png.unlink()
            images, labels, rec = ev.load_samples(folder / "samples.npz")
            m = ev.evaluate_arrays(images, labels, index, ext, cache, None, t.batch_size)["metrics"]
            done[k] = {**m, **(rec.get("cost_per_image") or {}), "seconds_per_image": rec.get("seconds_per_image")}
            write_json(folder / metrics_file, {**done[k], "sampling": s.to_dict()})
        return done
    rows, facts = {}, {"N": N, "seeds": t.seeds, "seed": t.seed, "device": dev, "defaults": describe(base, {}), "tuned": "–",
                       "noise": "–", "features": f"{ext.cache_key} ({ext.feature_dim}-d) vs {ref.count} train images"}
    if t.tune:  # per stage, every grid point x every refinement option (none included), on held-out sample seeds
        cands = [{"sampling": (s := sampling_config(t, dict(zip(t.tune.grid, g)), f)).to_dict(), "x": s.cfg, "stage": st,
                  "group": f"{st}: " + (describe(f, {}) if f else "no refinement") + "".join(
                      f", {k} {v}" for k, v in zip(t.tune.grid, g) if k != "cfg"),
                  "per_seed": per_seed(st, s, t.tune.seed, t.tune.num_samples, only=t.tune.seeds)}
                 for st in t.tune.stages for f in t.tune.refine for g in itertools.product(*t.tune.grid.values())]
        chosen = {st: min((c for c in cands if c["stage"] == st), key=lambda c: stat(c["per_seed"])[0]) for st in t.tune.stages}
        tune, _ = {"candidates": cands, "chosen": chosen}, marks.append(("guidance tuning", time.time()))
        facts["tuned"] = "; ".join(f"{st}: {describe(c['sampling'], base)}" for st, c in chosen.items())
    for x in t.rows:
        tuned = x.tuned and tune["chosen"].get(x.stage, next(iter(tune["chosen"].values())))["sampling"]
        s = sampling_config(t, tuned or {}, x.sampling)
        rows[x.name] = {"label": x.label, "sampling": describe(s.to_dict(), base) + f", policy {x.policy}" * bool(x.policy),
                        "per_seed": per_seed(x.stage, s, t.seed if x.seed is None else x.seed, N, x.policy)}
        if x.seed is not None and x.vs:  # the same checkpoints on disjoint sample seeds: what sampling alone moves FID by
            d = np.subtract(stat(rows[x.name]["per_seed"])[2], stat(rows[x.vs]["per_seed"])[2])
            facts["noise"] = f"FID moves by {', '.join(f'{e:+.2f}' for e in d)}: σ ≈ {np.sqrt(np.mean(d**2) / 2):.2f}"
    fill = lambda v, R: R if v == "R" else [fill(e, R) for e in v] if isinstance(v, list) else v  # noqa: E731
    sweeps = [{"name": c.name, "label": c.label, "points": [{"x": R, "R": R, "per_seed": per_seed(c.stage, sampling_config(
        t, {k: fill(v, R) for k, v in c.sampling.items()}), t.seed, c.num_samples or N, only=c.seeds)} for R in c.steps]}
        for c in t.sweeps]  # fmt: skip
    marks.append(("rows and sweeps", time.time()))
    fl, n = ev.real_vs_real(index, ext, t.batch_size)
    facts["floor"] = (f"FID {fl['fid']:.2f}, KID {fl['kid_mean']:.4g} between two disjoint halves of the reference split "
                      f"({n} vs {n} images; the rows: {N} samples against all {ref.count})")
    facts["timings"] = ", ".join(f"{k} {b - a:.0f} s" for (_, a), (k, b) in zip(marks, marks[1:]))
    head = {k: v.format(**facts) for k, v in t.notes.items()} | ({"SMOKE RUN": f"{smoke_steps} steps"} if smoke_steps else {})
    reading = [f"A difference is larger than its noise when a Welch t-test over the per-seed FIDs gives p < {t.alpha}."]
    reading += [compare(rows[x.name], rows[x.vs], t.alpha)[0] + "." for x in t.rows if x.vs]
    claims = [claim_line(c, rows, sweeps, t.alpha) for c in t.claims]
    rows_floor = rows | {"floor": {"label": f"real vs real ({n} vs {n})", "per_seed": {"–": fl}, "sampling": "–"}}
    atomic_write_text(out / "table.md", md := render_markdown(t, head, rows_floor, reading, claims))
    write_json(out / "table.json", {"header": head, "rows": rows_floor, "tune": tune, "sweeps": sweeps, "claims": claims})
    for name, fig in make_figures(rows, tune, sweeps, f"{t.dataset}: ").items():
        atomic_write(out / f"{name}.png", lambda f, fig=fig: fig.savefig(f, format="png", dpi=120))
    print(md)
    return out / "table.md"

if __name__ == "__main__":  # python -m srdd_lightning.table (make reproduce-table): a user's mistake is one line on stderr
    try:
        CLI(reproduce_table, prog="python -m srdd_lightning.table")
    except (TableError, ev.EvaluationError, FileNotFoundError) as e:
        raise SystemExit(f"reproduce-table: error: {e}") from None
