"""``srdd sample``: files, seeds, resume, folders of other settings, one-line user errors, option checks, editing,
and several processes (torchrun, gloo on the CPU) giving the same samples as one."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from helpers import randomize_weights
from srdd_lightning.cli import main as srdd
from srdd_lightning.models.tokenizer import tokenizer_config
from srdd_lightning.sampling.config import SamplingConfig
from srdd_lightning.sampling.sample_cli import main as sample_main
from srdd_lightning.sampling.sample_cli import own_files
from srdd_lightning.sampling.sampler import Sampler
from srdd_lightning.stages.generator import SRDDModule
from srdd_lightning.stages.tokenizer import TokenizerModule
from srdd_lightning.utils.images import load_png, save_png, to_uint8

GREEDY = ["--cfg", "1.0", "--top_k", "0", "--top_p", "1.0"]
QUIET = ["--progress", "false"]


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny tokenizer and generator, saved through the stages' own checkpoint hooks
# --------------------------------------------------------------------------------------------


def _save(module: pl.LightningModule, path: Path) -> Path:
    """A checkpoint as Lightning writes it (the stage's on_save_checkpoint included), without training."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def _generator(tok: Path, path: Path, seed: int) -> Path:
    """A 1-block generator on the 4-scale (1, 2, 3, 4) tokenizer; random weights (seed) give distinct samples."""
    m = SRDDModule(str(tok), generator="tiny", architecture={"depth": 1, "width": 64, "num_heads": 2},
                   num_classes=10, image_size=16)  # fmt: skip
    randomize_weights(m.generator, seed=seed)
    return _save(m, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    tok = TokenizerModule(tokenizer=dataclasses.asdict(tokenizer_config("tiny-16")), loss={"lpips": 0.0},
                          discriminator={"channels": 8, "layers": 2})  # fmt: skip
    tok_file = _save(tok, d / "tok.ckpt")
    return {"tok": tok_file, "gen": _generator(tok_file, d / "gen" / "last.ckpt", 1),
            "other": _generator(tok_file, d / "other.ckpt", 2)}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    # an env:// process group is made whenever a launcher's WORLD_SIZE is set; these tests run as one process
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SRDD_DEBUG", raising=False)


@pytest.fixture
def draws(monkeypatch) -> list[list[int]]:
    """The seeds of every Sampler.sample call."""
    calls: list[list[int]] = []
    real = Sampler.sample

    def spy(self, labels_B, config=None, seeds=None, **kw):
        calls.append(list(seeds))
        return real(self, labels_B, config, seeds=seeds, **kw)

    monkeypatch.setattr(Sampler, "sample", spy)
    return calls


def _record(out: Path) -> dict:
    return json.loads((out / "sampling.json").read_text())


def _error(capsys, argv: list[str], debug_env: bool = False) -> str:
    """Run srdd sample expecting a user error: exit status 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as e:
        srdd(["sample", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("srdd sample: error: "), err
    return err[0]


# --------------------------------------------------------------------------------------------
# Files, seeds, resume
# --------------------------------------------------------------------------------------------


def test_writes_files_and_record_and_resumes(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "s"
    args = ["sample", "--ckpt", str(ckpts["gen"]), "--out", str(out), "--num_per_class", "2", "--classes", "0,3",
            "--batch_size", "3", *QUIET, *GREEDY]  # fmt: skip
    real, draws, first = Sampler.sample, [], []

    def spy(self, labels_B, config=None, seeds=None, **kw):
        if not first:  # the record exists before any PNG, so an interrupted folder says what it holds
            first.append((_record(out), list(out.glob("0*.png"))))
        draws.append(list(seeds))
        result = real(self, labels_B, config, seeds=seeds, **kw)
        for j, s in enumerate(seeds):
            tokens.setdefault(s, []).append(torch.cat([t[j].flatten() for t in result.tokens]))
        return result

    tokens: dict[int, list[torch.Tensor]] = {}
    monkeypatch.setattr(Sampler, "sample", spy)
    srdd(args)
    assert first[0][0]["complete"] is False and first[0][0]["label_runs"] == [[0, 2], [3, 2]] and first[0][1] == []
    assert draws == [[0, 1, 2], [3]]  # sample i has seed + i, in batches of --batch_size
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == ["000000_c0.png", "000001_c0.png", "000002_c3.png", "000003_c3.png"]
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (4, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["labels"].tolist() == [0, 0, 3, 3]
    assert np.array_equal(npz["arr_0"][2], load_png(out / "000002_c3.png").permute(1, 2, 0).numpy())
    rec = _record(out)
    assert rec["complete"] is True and rec["num_samples"] == 4 and rec["seed"] == 0 and rec["ema"] is True
    assert rec["sampling"]["cfg"] == 1.0 and rec["schedule"] == [1, 2, 3, 4] and rec["precision"] == "fp32"
    assert rec["cost_per_image"]["forward_passes"] == 4 and rec["seconds_per_image"] > 0 and rec["timed_images"] == 4
    assert rec["checkpoint"].endswith("last.ckpt") and len(rec["generator_fingerprint"]) == 16
    assert (out / "grid.png").exists() and not (out / ".srdd-sample").exists()  # no per-rank statistics files

    # resume: only the missing sample is drawn, the others are left alone
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png")}
    (out / "000001_c0.png").unlink()
    draws.clear()
    srdd(args)
    assert draws == [[1]]
    assert all(mtimes[n] == (out / n).stat().st_mtime_ns for n in mtimes if n != "000001_c0.png")
    # same seed -> same sample: the same tokens; the pixels within one level of 255, since the resumed sample is decoded
    # in a batch of 1, not 3, and oneDNN's conv2d on AVX-512/AMX CPUs rounds by batch size (~1e-6)
    assert len(tokens[1]) == 2 and torch.equal(tokens[1][0], tokens[1][1])
    diff = np.abs(np.load(out / "samples.npz")["arr_0"].astype(int) - npz["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert _record(out)["timed_images"] == 5  # this run's image is added to the earlier runs' timing

    # the same weights under another path resume too (the record keeps their fingerprint, not the path)
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes(ckpts["gen"].read_bytes())
    draws.clear()
    srdd([*args[:2], str(moved), *args[3:]])
    assert draws == [] and _record(out)["checkpoint"] == str(moved)


def test_seeds_do_not_depend_on_batch_size(ckpts, tmp_path):
    common = ["--ckpt", str(ckpts["gen"]), "--num_samples", "5", "--seed", "11", *QUIET, "--cfg", "2.0",
              "--top_k", "50", "--top_p", "0.9"]  # fmt: skip
    srdd(["sample", "--out", str(tmp_path / "b5"), "--batch_size", "5", *common])
    srdd(["sample", "--out", str(tmp_path / "b2"), "--batch_size", "2", *common])
    a, b = np.load(tmp_path / "b5" / "samples.npz"), np.load(tmp_path / "b2" / "samples.npz")
    # the same tokens; the decoder's convolutions may round one pixel differently at another batch size (oneDNN
    # picks its blocking by batch), so pixels agree to one 8-bit level and almost all of them exactly
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-2 and a["labels"].tolist() == [0, 2, 4, 6, 8]
    assert len({a["arr_0"][i].tobytes() for i in range(5)}) > 1  # distinct samples: the comparison means something


TWO_PROCESS_ARGS = ["sample", "--num_samples", "7", "--seed", "5", *QUIET, "--cfg", "2.0", "--top_k", "50", "--top_p", "0.9"]


def _torchrun(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    """``srdd sample`` on 2 CPU processes under torchrun (gloo); a hang at a collective fails after --timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(sys.executable).with_name("srdd")), *TWO_PROCESS_ARGS, "--ckpt", str(ckpt), "--out", str(out),
           "--batch_size", "2", "--timeout", "60"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def one_process(ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "samples"
    srdd([*TWO_PROCESS_ARGS, "--ckpt", str(ckpts["gen"]), "--out", str(out), "--batch_size", "7"])
    return out


def test_two_processes_give_the_samples_of_one(ckpts, one_process, tmp_path):
    """Rank 0 lists the missing samples, the ranks share them, a collective gathers the timing: samples.npz is
    byte-identical to the 1-process run's, and the folder holds the same files (no per-rank leftovers)."""
    out = tmp_path / "two"
    proc = _torchrun(ckpts["gen"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "samples.npz").read_bytes() == (one_process / "samples.npz").read_bytes()
    rec = _record(out)
    assert rec["world_size"] == 2 and rec["timed_images"] == 7 and rec["complete"] is True  # each sample drawn once
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process.iterdir())


@pytest.mark.slow
def test_two_processes_refuse_together_and_resume(ckpts, one_process, tmp_path):
    out = tmp_path / "two"
    # a refusal on rank 0 reaches rank 1 too: both stop with the error instead of rank 1 waiting at a collective
    save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), out / "000003_c4.png")
    proc = _torchrun(ckpts["gen"], out)
    assert proc.returncode != 0 and proc.stderr.count("srdd sample: error: --out") == 2, proc.stderr[-3000:]
    # resume: a folder of the same settings missing 3 samples; the ranks share those and they come back the same
    out.joinpath("000003_c4.png").unlink()
    for p in one_process.iterdir():
        if p.name not in ("000001_c1.png", "000004_c5.png", "000006_c8.png", "samples.npz"):
            (out / p.name).write_bytes(p.read_bytes())
    proc = _torchrun(ckpts["gen"], out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "samples.npz").read_bytes() == (one_process / "samples.npz").read_bytes()
    assert _record(out)["timed_images"] == 7 + 3


# --------------------------------------------------------------------------------------------
# A folder of other settings: refuse, or --overwrite true
# --------------------------------------------------------------------------------------------


def test_other_settings_are_refused_and_named(ckpts, tmp_path, capsys):
    out = tmp_path / "s"
    base = ["--ckpt", str(ckpts["gen"]), "--out", str(out), *QUIET, "--top_k", "0"]
    srdd(["sample", *base, "--num_samples", "3", "--top_p", "0.96"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    err = _error(capsys, [*base, "--num_samples", "3", "--top_p", "0.5", "--seed", "1"])
    assert "--top_p 0.96 there, 0.5 now" in err and "--seed 0 there, 1 now" in err
    assert "another --out" in err and "--overwrite true" in err
    assert "--num_samples" in _error(capsys, [*base, "--num_samples", "4", "--top_p", "0.96"])
    assert "other generator weights" in _error(capsys, [*base, "--num_samples", "3", "--top_p", "0.96", "--ckpt",
                                                        str(ckpts["other"])])  # fmt: skip
    assert "--ema True there, False now" in _error(capsys, [*base, "--num_samples", "3", "--top_p", "0.96", "--ema", "false"])
    assert "--precision" in _error(capsys, [*base, "--num_samples", "3", "--top_p", "0.96", "--precision", "bf16"])
    # nothing in the folder changed: its record still describes its images
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the trained schedule spelled out is the default schedule: the folder resumes
    srdd(["sample", *base, "--num_samples", "3", "--top_p", "0.96", "--schedule", "[1,2,3,4]"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "sampling.json"} == {
        k: v for k, v in before.items() if k != "sampling.json"}


def test_overwrite_deletes_only_srdd_files_and_regenerates(ckpts, tmp_path, draws):
    out = tmp_path / "s"
    base = ["sample", "--ckpt", str(ckpts["gen"]), "--out", str(out), *QUIET, *GREEDY]
    srdd([*base, "--num_samples", "5"])
    (out / "notes.txt").write_text("mine")
    (out / "keep").mkdir()
    (out / "keep" / "000000_c0.png").write_bytes(b"not ours: in a subfolder")
    (out / "000001_c2.png.bak").write_bytes(b"not ours: another name")
    (out / ".samples.npz.abc123.tmp").write_bytes(b"ours: an interrupted atomic write")
    assert {p.name for p in own_files(out)} >= {"000004_c8.png", "grid.png", "sampling.json", ".samples.npz.abc123.tmp"}
    draws.clear()
    srdd([*base, "--num_samples", "2", "--seed", "7", "--overwrite", "true"])
    assert draws == [[7, 8]]  # everything drawn afresh
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000_c0.png", "000001_c5.png"]  # 000004_c8 is gone
    assert (out / "notes.txt").read_text() == "mine" and (out / "keep" / "000000_c0.png").exists()
    assert (out / "000001_c2.png.bak").exists() and not (out / ".samples.npz.abc123.tmp").exists()
    rec = _record(out)
    assert rec["num_samples"] == 2 and rec["seed"] == 7 and rec["timed_images"] == 2
    assert np.load(out / "samples.npz")["labels"].tolist() == [0, 5]


def test_samples_without_a_record_are_refused(ckpts, tmp_path, capsys):
    out = tmp_path / "s"
    save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), out / "000000_c0.png")
    err = _error(capsys, ["--ckpt", str(ckpts["gen"]), "--out", str(out), "--num_samples", "1", *QUIET])
    assert "000000_c0.png" in err and "no sampling.json" in err and "--overwrite true" in err
    (out / "sampling.json").write_text("{not json")
    assert "unreadable sampling.json" in _error(capsys, ["--ckpt", str(ckpts["gen"]), "--out", str(out),
                                                         "--num_samples", "1", *QUIET])  # fmt: skip
    assert (out / "000000_c0.png").exists() and (out / "sampling.json").read_text() == "{not json"  # untouched
    (out / "notes.txt").write_text("a folder with only other files is fine")
    (out / "000000_c0.png").unlink()
    (out / "sampling.json").unlink()
    srdd(["sample", "--ckpt", str(ckpts["gen"]), "--out", str(out), "--num_samples", "1", *QUIET])
    assert _record(out)["complete"] is True


# --------------------------------------------------------------------------------------------
# User mistakes: one line, exit status 2, the option or file named
# --------------------------------------------------------------------------------------------

BAD_VALUES = [
    (["--top_p", "2"], "--top_p must be in [0, 1]"),
    (["--top_p", "[0.9,1.5,1,1]"], "--top_p must be in [0, 1] (1: off) at every scale, got 1.5"),
    (["--p_resample", "1.5"], "--p_resample must be in [0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature 'nan' is not valid"),
    (["--top_k", "-1"], "--top_k must be an integer >= 0"),
    (["--top_k", "abc"], "--top_k 'abc' is not valid; it takes an integer, or a list"),
    (["--refine_steps", "-2"], "--refine_steps must be an integer >= 0"),
    (["--cfg", "-1"], "--cfg must be a finite number >= 0"),
    (["--cfg_schedule", "[1,-2,1,1]"], "--cfg_schedule must be a finite weight >= 0"),
    (["--cfg_schedule", "ramp"], "--cfg_schedule 'ramp' is not valid; it takes one of linear, constant"),
    (["--resample", "sometimes"], "--resample 'sometimes' is not valid; it takes one of none, simple, mask"),
    (["--resample", "[none,simple]"], "--resample has 2 entries but the sampling schedule [1, 2, 3, 4] has 4 scales"),
    (["--top_k", "[1,2,3]"], "--top_k has 3 entries but the sampling schedule [1, 2, 3, 4] has 4 scales"),
    (["--top_p", "[]"], "--top_p is an empty list"),
    (["--schedule", "[1,2,3]"], "--schedule: schedule [1, 2, 3] must end at the last trained scale 4"),
    (["--schedule", "[1,5]"], "--schedule: schedule [1, 5] uses scales [5] that are not among the trained scales"),
    (["--schedule", "[1,3,2,4]"], "--schedule: patch_nums must be strictly increasing"),
    (["--top_k", "[1,2,3]", "--schedule", "[1,3,4]"], None),  # a list fits the shorter schedule it is given with
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--num_samples", "1", "--num_per_class", "1"], "exactly one of --num_per_class"),
    (["--num_samples", "1", "--num_per_class", "0"], "exactly one of --num_per_class"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--classes", "1,12"], "--classes: class 12 is out of range: the model has 10 classes"),
    (["--classes", "one"], "--classes takes comma-separated class indices"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:<index>"),
    (["--precision", "fp16"], "--precision 'fp16' is not valid; it takes one of fp32, bf16"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    (["--image", "x.png"], "--image/--mask/--keep_box/--keep_scales only apply with --edit"),
]


@pytest.mark.parametrize("extra,message", BAD_VALUES, ids=[" ".join(b[0]) for b in BAD_VALUES])
def test_bad_option_values_are_one_line_errors(ckpts, tmp_path, capsys, extra, message):
    out = tmp_path / "s"
    count = [] if any(a in extra for a in ("--num_samples", "--num_per_class")) else ["--num_samples", "2"]
    argv = ["--ckpt", str(ckpts["gen"]), "--out", str(out), *QUIET, *count, *extra]
    if message is None:
        srdd(["sample", *argv])
        assert _record(out)["schedule"] == [1, 3, 4]
        return
    assert message in _error(capsys, argv)
    assert not out.exists() or not own_files(out)  # a refused run writes nothing


def test_parser_errors_name_the_option(tmp_path, capsys):
    assert "required: --ckpt" in _error(capsys, ["--out", str(tmp_path / "s"), "--num_samples", "1"])
    assert "--config: File does not exist" in _error(capsys, ["--config", str(tmp_path / "none.yaml")])


def test_checkpoint_mistakes_are_one_line_errors(ckpts, tmp_path, capsys, monkeypatch):
    args = ["--out", str(tmp_path / "s"), "--num_samples", "1", *QUIET]
    assert "does not exist" in _error(capsys, ["--ckpt", str(tmp_path / "missing.ckpt"), *args])
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not a checkpoint\n")
    err = _error(capsys, ["--ckpt", str(text), *args])
    assert str(text) in err and "not a PyTorch checkpoint" in err
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpts["gen"].read_bytes()[: ckpts["gen"].stat().st_size // 2])
    err = _error(capsys, ["--ckpt", str(cut), *args])
    assert str(cut) in err and "truncated" in err
    err = _error(capsys, ["--ckpt", str(ckpts["tok"]), *args])
    assert str(ckpts["tok"]) in err and "not a generator" in err
    # --debug (or SRDD_DEBUG=1) shows the traceback instead: the exception propagates
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        sample_main(["--ckpt", str(text), *args, "--debug", "true"])
    monkeypatch.setenv("SRDD_DEBUG", "1")
    with pytest.raises(ValueError, match="truncated"):
        sample_main(["--ckpt", str(cut), *args])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        srdd(["sample", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    import inspect

    from srdd_lightning.sampling.sample_cli import sample_to_folder

    options = [p for p in inspect.signature(sample_to_folder).parameters if p != "sampling"]
    options += [f.name for f in dataclasses.fields(SamplingConfig)] + ["debug", "config"]
    chunks = {}
    for block in text.split("\n  --")[1:]:
        name, _, rest = block.partition(" ")
        chunks[name.rstrip(",")] = rest
    for name in options:
        assert name in chunks, name
        doc = chunks[name].split("(type:")[0].split("(required")[0]
        assert len(doc.split()) >= 4, f"--{name} has no help text"
    for needle in ("seed + i", "Keep the k most likely tokens", "--overwrite", "torchrun"):
        assert needle in text, needle


# --------------------------------------------------------------------------------------------
# SamplingConfig checks every value, whoever builds it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("cfg", -0.5), ("cfg", float("inf")), ("cfg", float("nan")), ("cfg_schedule", "ramp"), ("cfg_schedule", [1.0, -1.0]),
    ("top_k", -1), ("top_k", 2.5), ("top_k", [1, -1]), ("top_p", 1.01), ("top_p", -0.1), ("top_p", float("nan")),
    ("top_p", [0.5, 2.0]), ("temperature", -1.0), ("temperature", float("inf")), ("resample", "sometimes"),
    ("resample", ["none", "often"]), ("refine_steps", -1), ("refine_steps", [0, -1]), ("p_resample", 2.0),
    ("p_resample", [0.5, -0.5]), ("schedule", [2, 1]), ("schedule", []), ("top_p", []),
])  # fmt: skip
def test_sampling_config_rejects_bad_values_naming_the_option(field, value):
    with pytest.raises(ValueError, match=f"^--{field}"):
        SamplingConfig(**{field: value})


def test_sampling_config_accepts_the_edges_and_checks_lengths_once_the_schedule_is_known():
    ok = SamplingConfig(cfg=0.0, cfg_schedule=[0.0, 1.0, 2.0], top_k=[0, 1, 900], top_p=[0.0, 1.0, 0.5],
                        temperature=0.0, resample=["none", "simple", "mask"], refine_steps=[0, 1, 2], p_resample=1.0)  # fmt: skip
    ok.check_schedule([1, 2, 4])
    with pytest.raises(ValueError, match=r"^--cfg_schedule has 3 entries but the sampling schedule \[1, 2, 3, 4\]"):
        ok.check_schedule([1, 2, 3, 4])
    SamplingConfig().check_schedule([1, 2, 3, 4])  # single values and named guidance fit any schedule


# --------------------------------------------------------------------------------------------
# Editing
# --------------------------------------------------------------------------------------------


def test_edit_modes_and_their_inputs_in_the_record(ckpts, tmp_path, capsys):
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_png(to_uint8(img)[0], tmp_path / "ref.png")
    mask = torch.zeros(3, 16, 16, dtype=torch.uint8)
    mask[:, 4:12, 4:12] = 255
    save_png(mask, tmp_path / "hole.png")
    save_png(to_uint8(img[:, :, ::2, ::2])[0], tmp_path / "small.png")
    base = ["sample", "--ckpt", str(ckpts["gen"]), "--classes", "3", "--num_samples", "2", *QUIET, *GREEDY]
    for mode, extra in {
        "inpaint": ["--image", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "hole.png")],
        "outpaint": ["--image", str(tmp_path / "ref.png"), "--keep_box", "4,4,12,12"],
        "superres": ["--image", str(tmp_path / "small.png")],
        "reconstruct": ["--image", str(tmp_path / "ref.png"), "--keep_scales", "2"],
    }.items():
        out = tmp_path / mode
        srdd([*base, "--out", str(out), "--edit", mode, *extra])
        assert len(list(out.glob("0000*_c3.png"))) == 2 and (out / "reference.png").exists(), mode
        assert _record(out)["edit"]["mode"] == mode and len(_record(out)["edit"]["image_sha256"]) == 64
    # reconstructing from every scale gives back the reference's tokens: all samples equal
    full = ["--edit", "reconstruct", "--image", str(tmp_path / "ref.png"), "--keep_scales", "4"]
    srdd([*base, "--out", str(tmp_path / "all"), *full])
    arr = np.load(tmp_path / "all" / "samples.npz")["arr_0"]
    assert np.array_equal(arr[0], arr[1])
    # another image under the same name is another edit: the folder refuses to resume
    save_png(to_uint8(-img)[0], tmp_path / "ref.png")
    err = _error(capsys, [*base[1:], "--out", str(tmp_path / "all"), *full])
    assert "--edit/--image" in err


def test_edit_input_mistakes_are_one_line_errors(ckpts, tmp_path, capsys):
    base = ["--ckpt", str(ckpts["gen"]), "--out", str(tmp_path / "e"), *QUIET, "--num_samples", "1"]
    save_png(torch.zeros(3, 16, 16, dtype=torch.uint8), tmp_path / "ref.png")
    save_png(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "small_mask.png")
    save_png(torch.zeros(3, 20, 20, dtype=torch.uint8), tmp_path / "big.png")
    ref = ["--image", str(tmp_path / "ref.png")]
    for extra, message in [
        (["--edit", "inpaint", *ref, "--mask", str(tmp_path / "small_mask.png")], "--mask .* is 8x8 px but --image .* is 16x16"),
        (["--edit", "inpaint", *ref, "--mask", str(tmp_path / "none.png")], "--mask .*none.png does not exist"),
        (["--edit", "inpaint", *ref], "--edit inpaint needs --mask"),
        (["--edit", "reconstruct", "--image", str(tmp_path / "big.png"), "--keep_scales", "1"],
         "is 20x20 px, but the tokenizer .* needs 16x16"),
        (["--edit", "outpaint", *ref, "--keep_box", "1,2"], "--keep_box takes TOP,LEFT,BOTTOM,RIGHT"),
        (["--edit", "superres", "--image", str(tmp_path / "gone.png")], "--image .*gone.png does not exist"),
    ]:  # fmt: skip
        import re

        assert re.search(message, _error(capsys, [*base, *extra])), message


def test_channels_last_decode_is_recorded_used_and_keeps_the_pixels(ckpts, tmp_path, monkeypatch, capsys):
    from srdd_lightning.models.tokenizer import MultiScaleTokenizer

    base = ["--ckpt", str(ckpts["gen"]), "--num_samples", "3", *QUIET, *GREEDY]
    layouts, real = [], MultiScaleTokenizer.decode

    def spy(self, *a, channels_last=False, **kw):
        layouts.append(channels_last)
        return real(self, *a, channels_last=channels_last, **kw)

    monkeypatch.setattr(MultiScaleTokenizer, "decode", spy)
    srdd(["sample", *base, "--out", str(tmp_path / "a")])
    srdd(["sample", *base, "--out", str(tmp_path / "b"), "--channels_last_decode", "true"])
    assert layouts and not layouts[0] and layouts[-1]  # the option reaches the decoder
    assert _record(tmp_path / "a")["channels_last_decode"] is False and _record(tmp_path / "b")["channels_last_decode"]
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"].astype(int) for d in "ab")
    assert np.abs(a - b).max() <= 1  # within 2e-4 before 8-bit rounding: at most one level
    # the layout is part of what the images depend on: a folder does not resume under the other one
    err = _error(capsys, [*base, "--out", str(tmp_path / "a"), "--channels_last_decode", "true"])
    assert "--channels_last_decode False there, True now" in err
