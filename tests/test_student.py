"""Fewer-scale students (stages/student.py, DESIGN §2.5): initialisation from the teacher, both target sources, the
soft loss at the coincident scales, a frozen teacher kept out of the checkpoint, exact resume, ``srdd sample`` on the
student's schedule, and the teacher's fingerprint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import randomize_weights
from test_generator_stage import _ckpt, save_tokenizer_module_ckpt, write_config

from srdd_lightning.cli import main
from srdd_lightning.loading import fingerprint, load_generator
from srdd_lightning.models.scales import num_tokens, scale_slices
from srdd_lightning.sampling.sampler import Sampler
from srdd_lightning.stages.student import BEST_ROW_SAMPLING, StudentModule, coincident_scales

REPO = Path(__file__).resolve().parents[1]
STUDENT = "srdd_lightning.stages.student.StudentModule"
TEACHER_PNS, SHORT = (1, 2, 3, 4), [1, 2, 4]  # the tiny-16 tokenizer's scales; a 3-scale student (21 of 30 tokens)


class Snapshot(pl.Callback):
    """Fingerprints of the student's generator and of the teacher at the start and end of training (to a JSON)."""

    def __init__(self, out: str):
        self.out, self.seen = out, {}

    def _take(self, when: str, pl_module) -> None:
        t = pl_module.teacher
        self.seen[when] = {"generator": fingerprint(pl_module.generator), "teacher": fingerprint(t),
                           "teacher_trainable": any(p.requires_grad for p in t.parameters()),
                           "teacher_training": t.training}  # fmt: skip

    def on_train_start(self, trainer, pl_module) -> None:
        self._take("start", pl_module)
        self.seen["optimizer_params"] = sum(len(g["params"]) for g in trainer.optimizers[0].param_groups)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.seen["teacher_training_in_step"] = pl_module.teacher.training

    def on_train_end(self, trainer, pl_module) -> None:
        self._take("end", pl_module)
        Path(self.out).write_text(json.dumps(self.seen))


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "runs" / "tok"
    save_tokenizer_module_ckpt(root / "version_0" / "checkpoints" / "last.ckpt")
    return root


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, digits_root, tok_run) -> Path:
    """A 6-step SDD teacher on scales 1-2-3-4 (srdd fit in-process)."""
    tmp = tmp_path_factory.mktemp("teacher")
    main(["fit", "--config", str(write_config(tmp, digits_root, tok_run, max_steps=6))])
    return tmp / "runs" / "gen" / "srdd"


def student_config(tmp: Path, digits_root: Path, tok_run: Path, teacher: Path, max_steps: int = 6,
                   stop_at: int | None = None, snapshot: bool = False, **init_args) -> Path:
    base = yaml.safe_load(write_config(tmp, digits_root, tok_run, max_steps=max_steps, stop_at=stop_at).read_text())
    args = base["model"]["init_args"]
    del args["architecture"]  # the teacher's
    args.update(teacher_ckpt=str(teacher), schedule=SHORT, **init_args)
    base["model"]["class_path"] = STUDENT
    if snapshot:
        base["trainer"]["callbacks"].append({"class_path": f"{__name__}.Snapshot",
                                             "init_args": {"out": str(tmp / "snapshot.json")}})  # fmt: skip
    path = tmp / "experiments" / "gen" / "student.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, digits_root, tok_run, teacher_run) -> dict:
    """6 distillation steps (teacher targets + soft loss) uninterrupted, and interrupted after 3 then resumed."""
    ref = tmp_path_factory.mktemp("student_ref")
    main(["fit", "--config", str(student_config(ref, digits_root, tok_run, teacher_run, snapshot=True, soft_weight=0.5))])
    res = tmp_path_factory.mktemp("student_res")
    cfg = student_config(res, digits_root, tok_run, teacher_run, stop_at=3, soft_weight=0.5)
    main(["fit", "--config", str(cfg)])
    main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    return {"ref": ref / "runs" / "gen" / "student" / "version_0", "res": res / "runs" / "gen" / "student" / "version_0",
            "snapshot": json.loads((ref / "snapshot.json").read_text()), "cfg": cfg}  # fmt: skip


def student(tok_run: Path, teacher_run: Path, randomize: bool = True, **kw) -> StudentModule:
    """A student whose teacher has weights that shape its logits (VAR's init leaves them almost uniform)."""
    m = StudentModule(str(tok_run), str(teacher_run), kw.pop("schedule", SHORT), num_classes=10, image_size=16, **kw)
    m.load_teacher()
    if randomize:
        randomize_weights(m.teacher, seed=3, std=0.2)
    if m.hparams.init_from == "teacher":
        m.load_initial_weights("teacher")
    return m.eval()


# --------------------------------------------------------------------------------------------
# Initialisation from the teacher
# --------------------------------------------------------------------------------------------


def test_student_starts_from_the_teachers_scales_of_the_same_size(tok_run, teacher_run):
    m = student(tok_run, teacher_run)
    s, t = m.generator, m.teacher
    assert s.patch_nums == (1, 2, 4) and t.patch_nums == TEACHER_PNS
    t_slices, s_slices = scale_slices(TEACHER_PNS), scale_slices(SHORT)
    for j, i in enumerate([0, 1, 3]):  # student scale j has the size of teacher scale i
        assert torch.equal(s.level_embed.weight[j], t.level_embed.weight[i])
        assert torch.equal(s.pos_embed[:, s_slices[j]], t.pos_embed[:, t_slices[i]])
    sd_s, sd_t = s.state_dict(), t.state_dict()
    for k in sd_t:
        if k not in ("level_embed.weight", "pos_embed"):
            assert torch.equal(sd_s[k], sd_t[k]), k  # blocks, head, class embedding, start token
    # so at step 0 the student *is* the teacher run on the short schedule
    g = torch.Generator().manual_seed(0)
    label, x = torch.tensor([1, 4, 10]), torch.randn(3, num_tokens(SHORT) - 1, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(s(label, x), t(label, x, schedule=SHORT))
    assert m.hparams.generator == "tiny" and m.hparams.architecture["depth"] == 1  # the teacher's architecture


def test_random_init_and_bad_schedules(tok_run, teacher_run):
    m = student(tok_run, teacher_run, randomize=False, init_from=None)
    assert not torch.equal(m.generator.blocks[0].attn.qkv.weight, m.teacher.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match=r"schedule \[1, 2, 3\].*must end at the last trained scale 4"):
        StudentModule(str(tok_run), str(teacher_run), [1, 2, 3], num_classes=10)
    with pytest.raises(ValueError, match=r"must start at the trained first scale 1"):
        student(tok_run, teacher_run, schedule=[2, 4])
    with pytest.raises(ValueError, match=r"soft_weight=0.5 > 0, but no scale of the schedule \[2, 4\] sees a teacher state"):
        student(tok_run, teacher_run, schedule=[2, 4], init_from=None, soft_weight=0.5)
    with pytest.raises(FileNotFoundError, match="teacher_ckpt"):
        StudentModule.check_init_args({"tokenizer_ckpt": str(tok_run), "teacher_ckpt": "runs/nowhere"})


# --------------------------------------------------------------------------------------------
# Targets and the soft loss
# --------------------------------------------------------------------------------------------


def test_teacher_targets_are_its_samples_requantized_onto_the_student_schedule(tok_run, teacher_run, monkeypatch):
    m = student(tok_run, teacher_run)
    img, label = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 3, 3, 9])
    seen = {}
    forward = m.generator.forward

    def spy(label_B, x_BLC, schedule=None, generator=None):
        seen["x"] = x_BLC
        return forward(label_B, x_BLC, schedule, generator)

    monkeypatch.setattr(m.generator, "forward", spy)
    with torch.no_grad():
        _, _, gt_BL = m._forward_loss((img, label), torch.Generator().manual_seed(5))
    rng = torch.Generator().manual_seed(5)  # the step's generator: the per-sample seeds are its first draws
    seeds = torch.randint(0, 2**62, (4,), generator=rng).tolist()
    out = Sampler(m.teacher, m.tokenizer).sample(label, BEST_ROW_SAMPLING, seeds=seeds)
    assert out.schedule == TEACHER_PNS  # the teacher samples on its own schedule
    f_hat = m.tokenizer.tokens_to_fhat(out.tokens, TEACHER_PNS)
    tokens = m.tokenizer.quantizer.quantize(f_hat, SHORT).tokens
    assert torch.equal(gt_BL, torch.cat([t.flatten(1) for t in tokens], 1))
    torch.testing.assert_close(seen["x"], m.tokenizer.teacher_forcing_inputs(tokens, SHORT))
    # targets: data re-quantizes the real images instead
    m.hparams.targets = "data"
    with torch.no_grad():
        _, _, gt_data = m._forward_loss((img, label), torch.Generator().manual_seed(5))
    assert torch.equal(gt_data, torch.cat([t.flatten(1) for t in m.tokenizer.img_to_tokens(img, SHORT)], 1))
    assert not torch.equal(gt_data, gt_BL)


def test_coincident_scales_are_the_common_prefix_of_the_schedules():
    assert coincident_scales((1, 2, 4, 8), (1, 2, 3, 4, 6, 8)) == 2
    assert coincident_scales((1, 3, 6, 8), (1, 2, 3, 4, 6, 8)) == 1
    assert coincident_scales((1, 3, 5, 8, 13, 16), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 1
    assert coincident_scales((2, 8), (1, 2, 8)) == 0


def test_student_and_teacher_states_agree_exactly_on_the_common_prefix(tok_run, teacher_run):
    """The precise statement of the soft loss's domain: inputs and targets agree on the common prefix, not after it."""
    m = student(tok_run, teacher_run)
    f = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    gt_T, x_T = m.chain_targets(f, TEACHER_PNS)
    gt_S, x_S = m.chain_targets(f, SHORT)  # common prefix 1-2: the 2x2 input and the 1x1 + 2x2 targets agree
    assert torch.equal(x_S[:, :4], x_T[:, :4]) and torch.equal(gt_S[:, :5], gt_T[:, :5])
    assert not torch.allclose(x_S[:, 4:], x_T[:, 13:])  # the 4x4 input: after 1-2 here, after 1-2-3 for the teacher
    gt_S3, x_S3 = m.chain_targets(f, (1, 3, 4))  # common prefix 1: the 3x3 input already differs
    assert not torch.allclose(x_S3[:, :9], x_T[:, 4:13])


def test_soft_loss_vanishes_where_the_student_is_the_teacher(tok_run, teacher_run):
    m = student(tok_run, teacher_run, soft_weight=1.0)
    f = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    label = torch.tensor([2, 5, 10])
    with torch.no_grad():
        _, x_S = m.chain_targets(f)
        kl0 = m.soft_loss(f, label, m.generator(label, x_S))
        assert abs(kl0.item()) < 1e-5  # at init the student's 1x1 and 2x2 distributions are the teacher's
        m.generator.head.out.weight.mul_(3.0)
        kl = m.soft_loss(f, label, m.generator(label, x_S))
        logits = m.generator(label, x_S)
        _, x_T = m.chain_targets(f, TEACHER_PNS)
        logp_T = m.teacher(label, x_T)[:, :5].log_softmax(-1)
        logp_S = logits[:, :5].log_softmax(-1)
        want = (logp_T.exp() * (logp_T - logp_S)).sum(-1).sum(1).div(num_tokens(SHORT)).mean()
    assert kl.item() > 1e-3
    torch.testing.assert_close(kl, want)


# --------------------------------------------------------------------------------------------
# Training through the CLI: frozen teacher, checkpoints, resume, logs
# --------------------------------------------------------------------------------------------


def test_teacher_is_frozen_and_unchanged_by_distillation(distilled, teacher_run, tok_run):
    snap = distilled["snapshot"]
    fresh = fingerprint(load_generator(teacher_run, tokenizer_ckpt=str(tok_run)).generator)
    assert snap["start"]["teacher"] == snap["end"]["teacher"] == fresh
    assert not snap["start"]["teacher_trainable"] and not snap["teacher_training_in_step"]
    assert snap["start"]["generator"] != snap["end"]["generator"]  # the student did train
    ckpt = _ckpt(distilled["ref"])
    assert ckpt["srdd_teacher"]["fingerprint"] == fresh and ckpt["srdd_teacher"]["path"].endswith("last.ckpt")
    for part in ("state_dict", "current_model_state"):
        assert not [k for k in ckpt[part] if not k.startswith("generator.")]  # no teacher, no tokenizer
    n_gen = sum(1 for k in ckpt["state_dict"] if k.startswith("generator."))
    assert snap["optimizer_params"] == n_gen
    assert ckpt["hyper_parameters"]["schedule"] == SHORT and ckpt["srdd_stage"] == STUDENT


def test_distillation_resumes_exactly(distilled):
    ref, res = _ckpt(distilled["ref"]), _ckpt(distilled["res"])
    assert res["global_step"] == 6
    for part in ("state_dict", "current_model_state"):
        for k, v in ref[part].items():
            assert torch.equal(v, res[part][k]), (part, k)


def test_logs_name_the_student_scales(distilled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(distilled["ref"]))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for key in ("train/loss_1x1", "train/loss_2x2", "train/loss_4x4", "train/acc_4x4", "val/loss_4x4",
                "train/kl_teacher", "train/objective"):  # fmt: skip
        assert key in scalars, key
    assert "train/loss_3x3" not in scalars and "samples/grid" in ea.Tags()["images"]


def test_student_checkpoint_samples_on_its_schedule_without_the_teacher(distilled, teacher_run, tmp_path):
    moved = tmp_path / "teacher_moved"
    shutil.move(str(teacher_run), moved)  # sampling needs only the student and its tokenizer
    try:
        main(["sample", "--ckpt", str(distilled["ref"]), "--out", str(tmp_path / "s"), "--num_per_class", "1",
                    "--cfg", "0", "--progress", "false"])  # fmt: skip
        g = load_generator(distilled["ref"])
    finally:
        shutil.move(str(moved), teacher_run)
    record = json.loads((tmp_path / "s" / "sampling.json").read_text())
    assert record["schedule"] == SHORT and record["cost_per_image"]["tokens"] == num_tokens(SHORT)
    assert record["cost_per_image"]["forward_passes"] == 3 and len(list((tmp_path / "s").glob("*_c*.png"))) == 10
    assert isinstance(g, StudentModule) and g.generator.patch_nums == (1, 2, 4) and g._teacher is None


def test_a_teacher_with_other_weights_is_refused(distilled, teacher_run, tmp_path, capsys):
    """A resumed run reads teacher_ckpt (the pinned file) from its checkpoint: a teacher file overwritten since (e.g.
    by continued training) is refused; so is another teacher given to a loaded student."""
    file = teacher_run / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(file, weights_only=True)
    for part in ("state_dict", "current_model_state"):
        ckpt[part]["generator.head.out.bias"] = ckpt[part]["generator.head.out.bias"] + 0.01
    other = tmp_path / "other_teacher.ckpt"
    torch.save(ckpt, other)
    backup = tmp_path / "teacher_backup.ckpt"
    shutil.copy(file, backup)
    shutil.copy(other, file)
    try:
        with pytest.raises(SystemExit) as e:  # a user's mistake: one line, exit status 2
            main(["fit", "--config", str(distilled["cfg"]), "--ckpt_path", "last", "--trainer.max_steps", "8"])
    finally:
        shutil.copy(backup, file)
    assert e.value.code == 2
    assert re.search(r"distilled from the teacher .*different weights.*teacher it was trained with", capsys.readouterr().err)
    m = StudentModule.load_from_checkpoint(distilled["ref"] / "checkpoints" / "last.ckpt", teacher_ckpt=str(other))
    with pytest.raises(ValueError, match=r"distilled from the teacher .*different weights"):
        m.load_teacher()
    StudentModule.load_from_checkpoint(distilled["ref"] / "checkpoints" / "last.ckpt").load_teacher()  # its own: fine


def test_teacher_of_another_tokenizer_is_refused(teacher_run, tmp_path):
    other_tok = tmp_path / "tok2" / "last.ckpt"
    save_tokenizer_module_ckpt(other_tok, seed=1)
    m = StudentModule(str(other_tok), str(teacher_run), SHORT, num_classes=10, image_size=16)
    with pytest.raises(ValueError, match=r"teacher .*cannot be used with this student: .*trained with the tokenizer"):
        m.load_teacher()


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits/student.yaml", "ffhq/student.yaml"])
def test_student_configs_print(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "experiments" / name), "--print_config"])
    assert e.value.code == 0
    args = yaml.safe_load(capsys.readouterr().out)["model"]
    assert args["class_path"] == STUDENT and args["init_args"]["targets"] == "teacher"
    assert args["init_args"]["teacher_sampling"]["cfg"] == 0.0 and args["init_args"]["init_from"] == "teacher"
    full = {"digits/student.yaml": (1, 2, 3, 4, 6, 8), "ffhq/student.yaml": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}[name]
    pns = args["init_args"]["schedule"]
    assert set(pns) < set(full) and pns[-1] == full[-1] and pns[0] == full[0]
