"""The comparison table as data: YAML parsing and its errors, stage training (reuse / resume / same-seed
references), the budget check, the Welch logic and claims, rendering, row reuse with stand-ins, a slow real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from srdd_lightning import table
from srdd_lightning.metrics import seeds
from srdd_lightning.data import digits_images
from srdd_lightning.metrics import DigitsClassifier, DigitsClassifierConfig, save_classifier
from srdd_lightning.utils.images import from_uint8, to_uint8

REPO = Path(__file__).resolve().parent.parent
DIGITS_TABLE = REPO / "experiments" / "digits" / "table.yaml"


def write_yaml(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload, sort_keys=False, allow_unicode=True))
    return path


def minimal_table(**changes) -> dict:
    """A small valid table (configs need not exist for parsing)."""
    spec = {"dataset": "demo", "columns": [["FID", "fid", 1, ".2f"]], "stages": {"srdd": {"configs": ["s.yaml"]}, "var": {"configs": ["s.yaml", "v.yaml"]}},
            "rows": [{"name": "var", "label": "VAR", "stage": "var", "vs": "sdd"}, {"name": "sdd", "label": "SDD", "stage": "srdd"}]}
    return {**spec, **changes}


# ---------------------------------------------------------------------------------------------
# the format
# ---------------------------------------------------------------------------------------------


def test_digits_table_yaml_parses_into_rows_stages_tuning_and_sweeps():
    t = table.load_table(DIGITS_TABLE)
    assert [r.name for r in t.rows][:2] == ["var", "sdd"] and t.seeds == [0, 1, 2] and t.num_samples == 2000
    assert t.stages["tokenizer"].shared and not t.stages["srdd"].shared
    assert t.stages["var"].configs == ["experiments/digits/srdd.yaml", "experiments/digits/var.yaml",
                                       "experiments/digits/table_generator.yaml"]
    assert t.stages["srdd"].configs == ["experiments/digits/srdd.yaml", "experiments/digits/table_generator.yaml"]
    assert t.stages["var"].same_budget_as == "srdd" and t.stages["srdd"].args["model.init_args.tokenizer_ckpt"] == "{tokenizer}"
    assert {} in t.tune.refine and t.tune.seed >= t.seed + t.num_samples  # none is a candidate; held-out seeds
    modes = [f"{m}_{g}" for m in ("simple", "mask", "renoise") for g in ("early", "middle", "late")]
    assert [s.name for s in t.sweeps] == [*modes, "pc_late"] and t.sweeps[0].steps == [0, 2, 8]  # R up to 8
    assert t.tune.stages == ["srdd", "var"]  # each tuned on its own
    student = next(c for c in t.claims if c.rows[0] == "student")
    assert t.stages["student"].args["model.init_args.teacher_ckpt"] == "{srdd}" and student.kind == "cheaper"
    tuned = next(r for r in t.rows if r.tuned)
    assert table.sampling_config(t, {"cfg": 0.0}, tuned.sampling).cfg == 0.0
    # no refinement step: one setting, whatever the mode says (so R = 0 of a sweep reuses the plain row)
    assert table.sampling_config(t, {"resample": "mask", "refine_steps": 0}) == table.sampling_config(t)
    # no guidance: one setting, whatever the schedule (the tuning grid's cfg 0 is sampled once)
    assert table.sampling_config(t, {"cfg": 0, "cfg_schedule": "constant"}) == table.sampling_config(t, {"cfg": 0})
    assert table.sampling_config(t, {"cfg": 1, "cfg_schedule": "constant"}).cfg_schedule == "constant"


@pytest.mark.parametrize("change, message", [
    ({"rows": [{"name": "sdd", "label": "SDD", "stage": "srdd", "sampleing": {}}]}, r"rows\[0\]: unknown key 'sampleing'"),
    ({"rows": [{"name": "sdd", "stage": "srdd"}]}, r"rows\[0\]: missing key 'label'"),
    ({"stages": {"srdd": {"configs": ["s.yaml"], "sharde": True}}}, r"stages.srdd: unknown key 'sharde'"),
    ({"num_sample": 10}, r"unknown key 'num_sample'"),
    ({"tune": {"stages": ["srdd"], "seed": 5, "num_samples": 10, "grids": {}}}, r"tune: unknown key 'grids'"),
    ({"tune": {"stages": ["srdd", "sdd"], "seed": 500, "num_samples": 10}}, r"tune.stages names 'sdd', not one of: srdd, var"),
    ({"rows": [{"name": "sdd", "label": "SDD", "stage": "sdd"}]}, r"rows\[0\].stage is 'sdd', not one of: srdd, var"),
    ({"rows": [{"name": "a", "label": "A", "stage": "srdd", "vs": "b"}]}, r"rows\[0\].vs is 'b'"),
    ({"rows": [{"name": "a", "label": "A", "stage": "srdd", "sampling": {"cfgg": 2}}]}, r"rows\[0\].sampling: .*cfgg"),
    ({"stages": {"srdd": {"configs": ["s.yaml"], "args": {"x": "{student}"}}, "student": {"configs": ["t.yaml"]}},
      "rows": []}, r"stages.srdd.args names 'student'"),  # a stage may name only an earlier one
    ({"stages": {"tok": {"configs": ["t.yaml"], "shared": True, "args": {"x": "{srdd}"}}, "srdd": {"configs": ["s.yaml"]}},
      "rows": []}, r"stages.tok.args names 'srdd'"),  # and a shared stage no per-seed one (a later one anyway)
    ({"rows": [{"name": "a", "label": "A", "stage": "srdd", "seed": 0}, {"name": "b", "label": "B", "stage": "srdd", "seed": 10}],
      "num_samples": 20}, r"overlap"),  # the noise row's seeds must be disjoint from the others'
    ({"stages": {"srdd": {"configs": ["s.yaml"], "same_budget_as": "sdd"}}, "rows": []}, r"same_budget_as is 'sdd'"),
    ({"tune": {"stages": ["srdd"], "seed": 100, "num_samples": 10}, "num_samples": 200}, r"overlap"),
    ({"tune": {"stages": ["srdd"], "seed": 500, "num_samples": 10, "seeds": [7]}}, r"tune.seeds names 7, not one of the training seeds"),
    ({"sweeps": [{"name": "s", "label": "S", "stage": "srdd", "sampling": {"refine_steps": "R"}, "seeds": [0, 3]}], "seeds": [0, 1]},
     r"sweeps\[0\].seeds names 3"),
    ({"rows": [{"name": "a", "label": "A", "stage": "srdd", "tuned": True}]}, r"rows\[0\].tuned is True, not one of: False"),
    ({"claims": [{"text": "x", "kind": "beter", "rows": ["a", "b"]}]}, r"claims\[0\].kind is 'beter', not one of: better, cheaper, converges"),
])  # fmt: skip
def test_bad_yaml_gives_an_error_naming_the_key(tmp_path, change, message):
    path = write_yaml(tmp_path / "table.yaml", minimal_table(**change))
    with pytest.raises(table.TableError, match=message) as e:
        table.load_table(path)
    assert str(path) in str(e.value)


def test_same_budget_check(tmp_path):
    srdd = write_yaml(tmp_path / "srdd.yaml", {"model": {"init_args": {"attn": "markov", "lr": 1e-3}}, "trainer": {"max_steps": 100}})
    var = write_yaml(tmp_path / "var.yaml", {"model": {"init_args": {"attn": "causal"}}})
    stage = lambda configs, **args: table.NS(configs=[str(c) for c in configs], args=args)  # noqa: E731
    table.check_same_budget(stage([srdd]), stage([srdd, var]), ("srdd", "var"))  # var.yaml holds only the mask
    table.check_same_budget(stage([srdd]), stage([srdd], **{"model.init_args.attn": "causal"}), ("srdd", "var"))
    write_yaml(tmp_path / "var.yaml", {"model": {"init_args": {"attn": "causal", "lr": 2e-3}}, "trainer": {"max_steps": 50}})
    with pytest.raises(table.TableError, match="model.init_args.lr, trainer.max_steps"):
        table.check_same_budget(stage([srdd]), stage([srdd, var]), ("srdd", "var"))
    with pytest.raises(table.TableError, match="data.batch_size"):  # an extra arg counts as well
        table.check_same_budget(stage([srdd]), stage([srdd], **{"data.batch_size": 32}), ("srdd", "var"))


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


class FakeFit:
    """Stands in for ``srdd fit``: records the arguments and writes last.ckpt (its bytes name the run and seed)."""

    def __init__(self, runs: Path, write: bool = True):
        self.runs, self.write, self.calls = runs, write, []

    def __call__(self, args, log, env):
        self.calls.append(args)
        if self.write:
            run = args[args.index("--run.name") + 1]
            ckpt = self.runs / run / "version_0" / "checkpoints" / "last.ckpt"
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text(json.dumps({"run": run, "args": args}))


def opts(tmp_path, **kw):
    return table.NS(runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), smoke_steps=None, fit_args=[], **kw)


def test_ensure_trained_reuses_resumes_or_trains(tmp_path, monkeypatch):
    fit = FakeFit(tmp_path / "runs")
    monkeypatch.setattr(table, "fit_subprocess", fit)
    t = table.NS(dataset="demo", data="data/demo")
    a = write_yaml(tmp_path / "a.yaml", {"model": {"init_args": {"optim": {"warmup_steps": 100}}}, "trainer": {"max_steps": 800}})
    b = write_yaml(tmp_path / "b.yaml", {"model": {"init_args": {"attn": "causal"}}})
    stage = table.NS(configs=[str(a), str(b)], args={"model.init_args.attn": "causal"})
    ckpt = table.ensure_trained("var", 2, stage, t, opts(tmp_path), {})
    assert ckpt == tmp_path / "runs" / "demo" / "var" / "seed_2" / "version_0" / "checkpoints" / "last.ckpt"
    args = fit.calls[0]
    assert args[:5] == ["fit", "--config", str(a), "--config", str(b)] and "--ckpt_path" not in args
    assert args[args.index("--seed_everything") + 1] == "2" and args[args.index("--run.name") + 1] == "demo/var/seed_2"
    assert args[args.index("--model.init_args.attn") + 1] == "causal"
    assert table.ensure_trained("var", 2, stage, t, opts(tmp_path), {}) == ckpt and len(fit.calls) == 1  # finished: reused
    smoke = table.NS(**{**vars(opts(tmp_path)), "smoke_steps": 8})  # other arguments: resumed from its last.ckpt
    table.ensure_trained("var", 2, stage, t, smoke, {})
    assert len(fit.calls) == 2 and fit.calls[1][fit.calls[1].index("--ckpt_path") + 1] == str(ckpt)
    assert fit.calls[1][fit.calls[1].index("--trainer.max_steps") + 1] == "8"
    assert fit.calls[1][fit.calls[1].index("--model.init_args.optim.warmup_steps") + 1] == "0"  # warmup below the steps
    (ckpt.parents[2] / "table-fit.json").unlink()  # interrupted (no mark): resumed
    table.ensure_trained("var", 2, stage, t, smoke, {})
    assert len(fit.calls) == 3 and "--ckpt_path" in fit.calls[2]
    shared = table.ensure_trained("tokenizer", None, table.NS(configs=["tok.yaml"], args={}), t, opts(tmp_path), {})
    assert shared.parts[-5:-3] == ("demo", "tokenizer") and "--seed_everything" not in fit.calls[3]
    monkeypatch.setattr(table, "fit_subprocess", FakeFit(tmp_path / "runs", write=False))
    with pytest.raises(FileNotFoundError, match="srdd fit's run folder"):  # a fit that leaves no checkpoint
        table.ensure_trained("srdd", 0, stage, t, opts(tmp_path), {})


def test_train_all_passes_each_seed_the_checkpoints_of_the_same_seed(tmp_path, monkeypatch):
    fit = FakeFit(tmp_path / "runs")
    monkeypatch.setattr(table, "fit_subprocess", fit)
    stages = {"tokenizer": table.NS(configs=["tok.yaml"], args={}, shared=True),
              "srdd": table.NS(configs=["s.yaml"], args={"model.init_args.tokenizer_ckpt": "{tokenizer}"}, shared=False),
              "student": table.NS(configs=["st.yaml"], args={"model.init_args.teacher_ckpt": "{srdd}", "lr": 0.1}, shared=False)}
    t = table.NS(dataset="demo", data="d", stages=stages, seeds=[0, 1], parallel_fits=2)
    ckpts = table.train_all(t, opts(tmp_path))
    assert set(ckpts["tokenizer"]) == {None} and set(ckpts["srdd"]) == set(ckpts["student"]) == {0, 1}
    assert len(fit.calls) == 5  # the tokenizer once, two seeds of each of the others
    for k in (0, 1):
        call = next(c for c in fit.calls if c[c.index("--run.name") + 1] == f"demo/student/seed_{k}")
        assert call[call.index("--model.init_args.teacher_ckpt") + 1] == str(ckpts["srdd"][k])
        srdd = next(c for c in fit.calls if c[c.index("--run.name") + 1] == f"demo/srdd/seed_{k}")
        assert srdd[srdd.index("--model.init_args.tokenizer_ckpt") + 1] == str(ckpts["tokenizer"][None])


# ---------------------------------------------------------------------------------------------
# statistics, claims and rendering on hand-made per-seed numbers
# ---------------------------------------------------------------------------------------------


def row(label, fids, tokens=100, seconds=0.01, **metrics):
    per = {k: {"fid": f, "tokens": tokens, "seconds_per_image": seconds, "forward_passes": 6, **metrics} for k, f in enumerate(fids)}
    return {"label": label, "per_seed": per, "sampling": "the defaults"}


def test_welch_test_and_verdicts_on_hand_made_seeds():
    a, b = [10.0, 10.5, 9.5], [20.0, 22.0, 18.0]
    # Welch by hand: t = (ma - mb) / sqrt(va/na + vb/nb), Welch-Satterthwaite degrees of freedom, two-sided
    va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
    t_hand, dof = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb), (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert seeds.welch_p(row("a", a)["per_seed"], row("b", b)["per_seed"]) == pytest.approx(2 * stats.t.sf(abs(t_hand), dof))
    # pooled variances (Student's test) would give another p: the test must be Welch's
    assert 2 * stats.t.sf(abs(t_hand), dof) != pytest.approx(stats.ttest_ind(a, b).pvalue)
    text, d, p = seeds.compare(row("A", a), row("B", b), 0.05)
    assert d == pytest.approx(-10.0) and p < 0.01 and "larger than its noise" in text and "ΔFID -10.00" in text
    assert "within noise" in seeds.compare(row("A", [10, 12, 8]), row("B", [11, 9, 13]), 0.05)[0]
    assert "not testable" in seeds.compare(row("A", [10.0]), row("B", b), 0.05)[0]
    rows = {"sdd": row("SDD", a), "var": row("VAR", b), "bad": row("bad", [30, 31, 29]), "few": row("few", [10.2, 9.8, 10.1], tokens=70)}
    claim = lambda kind, names, **kw: seeds.claim_line(table.NS(text="claim", kind=kind, rows=names, max_cost=0.8, **kw), rows, [], 0.05)  # noqa: E731
    assert claim("better", ["sdd", "var"]).startswith("- **claim**: supported.")
    assert claim("better", ["bad", "sdd"]).startswith("- **claim**: contradicted.")
    assert claim("better", ["few", "sdd"]).startswith("- **claim**: not resolved.")
    assert claim("better", ["student", "sdd"]) == "- **claim**: not measured in this run (no row student)"
    assert claim("cheaper", ["few", "sdd"]).startswith("- **claim**: supported.") and "70% of the tokens" in claim("cheaper", ["few", "sdd"])
    assert claim("cheaper", ["bad", "sdd"]).startswith("- **claim**: not supported.")  # worse beyond noise
    rows["few"] = row("few", [10.2, 9.8, 10.1], tokens=90)
    assert claim("cheaper", ["few", "sdd"]).startswith("- **claim**: not supported.")  # 90 % > 80 % of the tokens


def sweep(name, fids_by_R, accuracy=0.9):
    points = [{"R": R, "x": R, "per_seed": row("", f, class_accuracy=accuracy - 0.01 * R)["per_seed"]} for R, f in fids_by_R.items()]
    return {"name": name, "label": name, "points": points}


def test_converges_claim_needs_a_non_increasing_curve_that_beats_r0():
    c = table.NS(text="refinement converges", kind="converges", rows=["down", "up"], max_cost=0.8)
    down = sweep("down", {0: [50, 51, 49], 1: [45, 46, 44], 2: [45.5, 44.5, 45], 4: [44, 45, 44.5]})
    up = sweep("up", {0: [50, 51, 49], 1: [55, 56, 54], 2: [60, 61, 59]})
    flat = sweep("flat", {0: [50, 51, 49], 2: [50.5, 49.5, 50]})
    dip = sweep("dip", {0: [50, 51, 49], 1: [40, 41, 39], 2: [48, 49, 47]})  # beats R = 0, then rises beyond its std
    assert seeds.claim_line(c, {}, [up, down], 0.05).startswith("- **refinement converges**: supported.")
    line = seeds.claim_line(c, {}, [up], 0.05)
    assert line.startswith("- **refinement converges**: not supported.") and "rising" in line
    c.rows = ["dip"]
    assert seeds.claim_line(c, {}, [dip], 0.05).startswith("- **refinement converges**: not supported.")
    c.rows = ["flat"]
    assert seeds.claim_line(c, {}, [flat], 0.05).startswith("- **refinement converges**: not supported.")  # within noise
    c.rows = ["nothing"]
    assert "not measured in this run" in seeds.claim_line(c, {}, [up], 0.05)


def test_markdown_shows_mean_std_kid_floor_costs_reading_and_claims(tmp_path):
    t = table.NS(dataset="digits", columns=table.load_table(DIGITS_TABLE).columns)
    rows = {"var": row("VAR (causal)", [92.25, 89.1, 90.0], tokens=260, seconds=0.0062, kid_mean=0.0123),
            "sdd": row("SDD (markov)", [96.5, 86.8, 88.0], tokens=259, seconds=0.0031, kid_mean=0.011)}
    rows["floor"] = {"label": "real-vs-real floor (N=264)", "per_seed": {"–": {"fid": 49.688, "kid_mean": 0.0021}},
                     "sampling": "real images"}
    reading = [seeds.compare(rows["var"], rows["sdd"], 0.05)[0] + "."]
    md = table.render_markdown(t, {"features": "digits-classifier (128-d)"}, rows, reading, ["- **SDD ≤ VAR**: not resolved."])
    assert md.startswith("# SRDD reproduction table: digits\n\n- **features**: digits-classifier (128-d)")
    header = next(line for line in md.splitlines() if line.startswith("| Row"))
    assert "FID ↓" in header and "KID ↓" in header and "× VAR (causal) (tokens / s)" in header
    var = next(line for line in md.splitlines() if line.startswith("| VAR"))
    assert f"| {np.mean([92.25, 89.1, 90.0]):.2f} ± {np.std([92.25, 89.1, 90.0], ddof=1):.2f} |" in var
    assert "| 0.0123 ± 0 |" in var and "| 260 ± 0 |" in var and "| 1.00 / 1.00 |" in var and "| 0, 1, 2 |" in var
    sdd = next(line for line in md.splitlines() if line.startswith("| SDD"))
    assert "| 1.00 / 0.50 |" in sdd
    floor = next(line for line in md.splitlines() if line.startswith("| real-vs-real floor"))
    assert "| 49.69 |" in floor and "| 0.0021 |" in floor and "real images" in floor
    assert "**How to read this table.** VAR (causal) vs SDD (markov): ΔFID" in md and "Welch t-test over seeds, p = " in md
    assert "**The paper's claims in this run:**\n\n- **SDD ≤ VAR**: not resolved." in md
    tune = {"candidates": [{"x": g, "group": grp, "per_seed": row("", [10 + g, 11 + g])["per_seed"]}
                           for grp in ("no refinement", "resample simple, refine_steps 2") for g in (0.0, 1.5)]}
    figs = table.make_figures(rows, tune, [sweep("simple", {0: [50, 51], 2: [45, 46]})], "digits: ")
    assert set(figs) == {"fid_vs_refinement", "accuracy_vs_refinement", "fid_vs_guidance", "fid_vs_cost"}
    accuracy = figs["accuracy_vs_refinement"].axes[0]  # in percent: 90 % at R = 0, 88 % at R = 2
    assert accuracy.lines[0].get_ydata() == pytest.approx([90.0, 88.0]) and "class accuracy" in accuracy.get_ylabel()
    assert len(figs["fid_vs_guidance"].axes[0].containers) == 2  # one error-bar curve per refinement option
    bars = figs["fid_vs_refinement"].axes[0].containers[0]  # ± the std over the seeds of [50, 51] and [45, 46]
    assert bars.has_yerr and [np.ptp(seg[:, 1]) for seg in bars.lines[2][0].get_segments()] == pytest.approx([2 * np.std([50, 51], ddof=1)] * 2)
    figs["fid_vs_cost"].savefig(tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# the pipeline with stand-ins for srdd fit and srdd sample
# ---------------------------------------------------------------------------------------------

_IMG, _LAB = digits_images(16)
BANK = {c: _IMG[_LAB == c] for c in range(10)}


def fake_sample(calls):
    """Writes what ``srdd sample`` writes: real digits plus noise that depends on the model, its seed and settings."""

    def sample(ckpt, out, num_samples, seed, batch_size, sampling, device, progress, policy_ckpt=None):
        calls.append((seed, num_samples) if policy_ckpt is None else (ckpt, policy_ckpt))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        run = json.loads(Path(ckpt).read_text())["run"]
        R = max(sampling.refine_steps) if isinstance(sampling.refine_steps, list) else sampling.refine_steps
        noise = 0.2 + 0.1 * abs(sampling.cfg - 1.0) + 0.2 / (1 + R) + 0.2 * ("var" in run) + 0.02 * run.endswith("1")
        labels = [i * 10 // num_samples for i in range(num_samples)]
        imgs = []
        for i, c in enumerate(labels):
            g = torch.Generator().manual_seed(seed + i)
            pool = BANK[c]
            x = from_uint8(pool[(seed + i) % len(pool)])
            imgs.append((x + noise * torch.randn(x.shape, generator=g)).clamp(-1, 1))
        arr = to_uint8(torch.stack(imgs)).permute(0, 2, 3, 1).numpy()
        np.savez(out / "samples.npz", arr_0=arr, labels=np.array(labels))
        cost = {"forward_passes": 6 * (1 + R), "tokens": 130 * (1 + R) * (2 if sampling.cfg else 1)}
        (out / "sampling.json").write_text(json.dumps({"seed": seed, "num_samples": num_samples, "seconds_per_image": 0.001,
                                                       "cost_per_image": cost}))  # fmt: skip
        return out

    return sample


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory) -> Path:
    """A small untrained digits classifier: a stand-in feature extractor (16-d features)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    save_classifier(path, DigitsClassifier(DigitsClassifierConfig(width=8, feature_dim=16)), {"val_accuracy": 0.99, "num_val": 264})
    return path


def small_table(tmp_path, digits_root, classifier_path) -> Path:
    spec = yaml.safe_load(DIGITS_TABLE.read_text())
    spec.update(data=str(digits_root), classifier=str(classifier_path), seeds=[0, 1], num_samples=40, parallel_fits=1)
    spec["tune"].update(num_samples=30, grid={"cfg": [0.5, 2.0]}, refine=[{}, {"resample": "simple", "refine_steps": 2}])
    spec["sweeps"] = [s for s in spec["sweeps"] if s["name"] in ("simple_late", "mask_late")]
    for s in spec["sweeps"]:
        s.update(steps=[0, 2, 4], num_samples=40)
    # the students and the policy join in test_later_stages_join_the_table_by_yaml_entries
    spec["stages"] = {n: s for n, s in spec["stages"].items() if n in ("tokenizer", "srdd", "var")}
    spec["rows"] = [r for r in spec["rows"] if r["stage"] in spec["stages"] and not r.get("policy")]
    return write_yaml(tmp_path / "table.yaml", spec)


def test_table_rows_are_computed_reused_and_rendered(tmp_path, digits_root, classifier_path, monkeypatch):
    from srdd_lightning.sampling import sample_cli

    fit, calls = FakeFit(tmp_path / "runs"), []
    monkeypatch.setattr(table, "fit_subprocess", fit)
    monkeypatch.setattr(sample_cli, "sample_to_folder", fake_sample(calls))
    spec = small_table(tmp_path, digits_root, classifier_path)
    run = lambda: table.reproduce_table(table=str(spec), runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), device="cpu")  # noqa: E731
    md = run().read_text()
    assert len(fit.calls) == 5  # tokenizer once; srdd and var for seeds 0 and 1
    # tuning: 2 stages x 4 points on training seed 0; rows: 2 seeds x 8 (var, sdd, sdd_resampled, sdd_sr, sdd_mr,
    # var_tuned, sdd_tuned, sdd_few); sweeps: 2 seeds x (R = 0, shared by both curves by its key, + R = 2 and 4 of each)
    assert len(calls) == 2 * 4 + 2 * 8 + 2 * (1 + 2 * 2)
    out = tmp_path / "results" / "digits"
    data = json.loads((out / "table.json").read_text())
    assert list(data["rows"]["sdd"]["per_seed"]) == ["0", "1"] and data["rows"]["floor"]["per_seed"]["–"]["num_samples"] == 1533 // 2
    chosen = data["tune"]["chosen"]  # per stage; the stand-in's quality peaks at cfg 1: 0.5 beats 2.0
    assert {st: c["sampling"]["cfg"] for st, c in chosen.items()} == {"srdd": 0.5, "var": 0.5}
    # tuned on held-out seeds only, and jointly over guidance and refinement including none
    assert sorted(c for c in calls if c[0] != 0 and c[0] != 2_000_000) == [(1_000_000, 30)] * 8
    assert {c["group"] for c in data["tune"]["candidates"]} == {f"{st}: {f}" for st in ("srdd", "var")
                                                                for f in ("no refinement", "resample simple, refine_steps 2")}
    assert len(list((out / "samples").glob("*/metrics-*.json"))) == len(calls)  # one stored result per sample set
    assert "| SDD (markov) |" in md and " ± " in md and "| real vs real (766 vs 766) |" in md
    assert "**How to read this table.** A difference is larger than its noise" in md and "VAR (causal) vs SDD (markov)" in md
    assert "SDD ≤ VAR at equal training budget**: supported" in md  # the stand-in makes VAR noisier
    assert "fewer-scale student keeps the quality at ~20 % less compute**: not measured in this run (no row student)" in md
    assert "- **sampling noise**: SDD on disjoint sample seeds: FID moves by" in md and "σ ≈" in md
    tuned = "cfg 0.5, resample simple, refine_steps 2"  # the held-out tuning's choice, per stage
    assert f"the lowest FID: srdd: {tuned}; var: {tuned}" in md
    assert "- **timings**: training" in md and "rows" in md
    for name in ("fid_vs_refinement", "accuracy_vs_refinement", "fid_vs_guidance", "fid_vs_cost"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert not list((out / "samples").glob("*/*.png"))  # samples.npz holds them

    fit.calls.clear()
    calls.clear()
    scored = []  # evaluations of samples: a re-run scores none, every row's metrics are stored
    evaluate_arrays = table.ev.evaluate_arrays
    monkeypatch.setattr(table.ev, "evaluate_arrays", lambda *a, **k: scored.append(1) or evaluate_arrays(*a, **k))
    assert run().read_text().split("- **timings**")[0] == md.split("- **timings**")[0] and calls == fit.calls == []
    assert scored == []
    for f in (out / "samples").glob("*/metrics-*.json"):  # results gone (a metric change): re-scored from the samples
        f.unlink()
    again = run().read_text()
    assert calls == [] and again.split("| Row")[1].split("**How")[0] == md.split("| Row")[1].split("**How")[0]


def test_later_stages_join_the_table_by_yaml_entries(tmp_path, digits_root, classifier_path, monkeypatch):
    from srdd_lightning.sampling import sample_cli

    fit, calls = FakeFit(tmp_path / "runs"), []
    monkeypatch.setattr(table, "fit_subprocess", fit)
    monkeypatch.setattr(sample_cli, "sample_to_folder", fake_sample(calls))
    spec = yaml.safe_load(small_table(tmp_path, digits_root, classifier_path).read_text())
    spec.update(tune=None, sweeps=[], rows=[r for r in spec["rows"] if r["name"] in ("var", "sdd")])
    spec["stages"]["student"] = {"configs": ["experiments/digits/srdd.yaml"], "args": {"model.init_args.teacher_ckpt": "{srdd}"}}
    spec["stages"]["policy"] = {"configs": ["experiments/digits/srdd.yaml"], "args": {"model.init_args.generator_ckpt": "{srdd}"}}
    spec["rows"] += [{"name": "student", "label": "student", "stage": "student", "vs": "sdd"},
                     {"name": "policy", "label": "learned policy", "stage": "srdd", "policy": "policy", "vs": "sdd"}]
    spec["claims"] = [{**c, "rows": ["student", "sdd"]} for c in spec["claims"] if c["rows"][0] == "student"]  # untuned
    monkeypatch.chdir(REPO)
    md = table.reproduce_table(table=str(write_yaml(tmp_path / "t.yaml", spec)), runs=str(tmp_path / "runs"),
                               results=str(tmp_path / "results"), device="cpu").read_text()
    runs = tmp_path / "runs" / "digits"
    for k in (0, 1):  # each seed's student learns from, and each seed's policy steers, the SDD run of the same seed
        srdd = str(runs / "srdd" / f"seed_{k}" / "version_0" / "checkpoints" / "last.ckpt")
        for stage, option in (("student", "--model.init_args.teacher_ckpt"), ("policy", "--model.init_args.generator_ckpt")):
            call = next(c for c in fit.calls if c[c.index("--run.name") + 1] == f"digits/{stage}/seed_{k}")
            assert call[call.index(option) + 1] == srdd
        assert (srdd, str(runs / "policy" / f"seed_{k}" / "version_0" / "checkpoints" / "last.ckpt")) in calls
    assert "| student |" in md and "| learned policy |" in md and "student vs SDD (markov)" in md
    assert "not measured" not in md.split("fewer-scale student")[1].splitlines()[0]  # the claim is measured now


def test_cli_help_and_a_missing_dataset_is_one_line(tmp_path):
    cli = lambda *args: subprocess.run([sys.executable, "-m", table.__name__, *args], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    done = cli("--help")
    for option in ("--dataset", "--table", "--runs", "--results", "--device", "--inception_weights", "--smoke_steps"):
        assert option in done.stdout
    spec = write_yaml(tmp_path / "t.yaml", {**yaml.safe_load((REPO / "experiments/ffhq/table.yaml").read_text()),
                                             "data": str(tmp_path / "nowhere")})
    done = cli("--table", str(spec), "--runs", str(tmp_path / "runs"))
    assert done.returncode != 0 and done.stderr.startswith("reproduce-table: error:") and len(done.stderr.splitlines()) == 1
    assert "nowhere" in done.stderr and "pack" in done.stderr


# ---------------------------------------------------------------------------------------------
# the whole digits pipeline through the real srdd fit / srdd sample (trains 5 runs: minutes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_reproduce_table_digits_end_to_end(tmp_path, digits_root, monkeypatch):
    from srdd_lightning.evaluation import train_classifier

    monkeypatch.chdir(REPO)  # the stage configs are experiments/digits/*.yaml
    classifier = tmp_path / "classifier.pt"
    train_classifier(str(digits_root), str(classifier), epochs=2, min_accuracy=0.0)
    spec = yaml.safe_load(DIGITS_TABLE.read_text())
    spec.update(data=str(digits_root), classifier=str(classifier), seeds=[0, 1], num_samples=100)
    spec["tune"].update(num_samples=50, grid={"cfg": [1.0, 3.0]}, refine=[{}, {"resample": "mask", "refine_steps": 1}])
    for s in spec["sweeps"]:
        s["steps"] = [0, 1]
    path = write_yaml(tmp_path / "table.yaml", spec)
    kw = dict(table=str(path), runs=str(tmp_path / "runs"), results=str(tmp_path / "results"), device="cpu", smoke_steps=20)
    md = table.reproduce_table(**kw).read_text()
    for label in ("VAR (causal)", "SDD (markov)", "+ simple resampling", "+ mask resampling", "+ tuned guidance",
                  "real-vs-real floor", "SMOKE RUN", "How to read this table"):  # fmt: skip
        assert label in md
    for name in ("fid_vs_refinement", "fid_vs_guidance", "fid_vs_cost"):
        assert (tmp_path / "results" / "digits" / f"{name}.png").is_file()
    # Re-running trains nothing and samples nothing.
    from srdd_lightning.sampling import sample_cli

    monkeypatch.setattr(table, "fit_subprocess", lambda *a: pytest.fail("trained again"))
    monkeypatch.setattr(sample_cli, "sample_to_folder", lambda **k: pytest.fail("sampled again"))
    table.reproduce_table(**kw)
