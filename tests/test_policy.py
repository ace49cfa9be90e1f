"""Stage 3 (ResamplingPolicyModule): the generator stays frozen while the policy trains (both objectives), a
per-sample decision changes only that sample, the token critic decides what mask resampling redraws, checkpoints
round-trip and refuse another generator, ``srdd sample --policy_ckpt`` from the command line, TensorBoard logs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import randomize_weights
from torch import nn

from srdd_lightning.cli import SRDDCLI
from srdd_lightning.data.datamodule import ShardDataModule
from srdd_lightning.loading import load_generator, load_stage, resolve_checkpoint
from srdd_lightning.metrics import (
    DigitsClassifier,
    DigitsClassifierConfig,
    save_classifier,
)
from srdd_lightning.models.policy import TokenCriticConfig, TokenCriticNet
from srdd_lightning.models.tokenizer import tokenizer_config
from srdd_lightning.sampling.config import SamplingConfig
from srdd_lightning.sampling.sample_cli import main as sample_main
from srdd_lightning.stages.generator import SRDDModule
from srdd_lightning.stages.policy import (
    LearnedPolicy,
    ResamplingPolicyModule,
    load_policy,
)
from srdd_lightning.stages.tokenizer import TokenizerModule
from srdd_lightning.utils.images import load_png, to_uint8

POLICY = "srdd_lightning.stages.policy.ResamplingPolicyModule"
PLAIN = {"cfg": 0.0, "top_k": 0, "top_p": 1.0}  # no guidance, no filtering
SMALL_CRITIC = {"width": 16, "depth": 1, "steps": 2}
QUIET = ["--progress", "false"]


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny tokenizer, two generators, a stand-in classifier, and policy runs through `srdd fit`
# --------------------------------------------------------------------------------------------


def _save(module: pl.LightningModule, path: Path) -> Path:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


def _generator(tok: Path, path: Path, seed: int) -> Path:
    m = SRDDModule(str(tok), generator="tiny", architecture={"depth": 1, "width": 64, "num_heads": 2},
                   num_classes=10, image_size=16)  # fmt: skip
    randomize_weights(m.generator, seed=seed, head_gain=3.0)
    return _save(m, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("policy_ckpts")
    torch.manual_seed(0)
    tok = TokenizerModule(tokenizer=dataclasses.asdict(tokenizer_config("tiny-16")), loss={"lpips": 0.0},
                          discriminator={"channels": 8, "layers": 2})  # fmt: skip
    with torch.no_grad():  # spread the codes, so that tokens mean different latents
        tok.tokenizer.quantizer.codebook.weight.normal_()
    tok_file = _save(tok, d / "tok.ckpt")
    classifier = d / "classifier.pt"
    save_classifier(classifier, DigitsClassifier(DigitsClassifierConfig(width=8, feature_dim=16)), {"val_accuracy": 0.99})
    return {"tok": tok_file, "gen": _generator(tok_file, d / "gen" / "last.ckpt", 1),
            "other": _generator(tok_file, d / "other.ckpt", 2), "classifier": classifier, "dir": d}  # fmt: skip


def _fit(tmp: Path, digits_root: Path, init_args: dict, name: str, max_steps: int = 3, callbacks=()) -> SRDDCLI:
    cfg = {
        "model": {"class_path": POLICY, "init_args": init_args},
        "ema": {"decay": 0.5},
        "data": {"root": str(digits_root), "batch_size": 8},
        "trainer": {"accelerator": "cpu", "max_steps": max_steps, "val_check_interval": max_steps,
                    "check_val_every_n_epoch": None, "limit_val_batches": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1, "callbacks": list(callbacks)},
        "run": {"root": str(tmp / "runs"), "name": name},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return SRDDCLI(args=["fit", "--config", str(path)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root, ckpts) -> dict:
    """A critic run (with the FID monitor of its policy) and a REINFORCE run on top of its critic, via `srdd fit`."""
    tmp = tmp_path_factory.mktemp("policy_runs")
    fid = {"class_path": "srdd_lightning.callbacks.FIDCallback",
           "init_args": {"every_n_steps": 3, "num_samples": 20, "batch_size": 20, "classifier": str(ckpts["classifier"]),
                         "data_root": str(digits_root), "cache_dir": str(tmp / "stats"), "sampling": PLAIN}}  # fmt: skip
    critic = _fit(tmp, digits_root, {"generator_ckpt": str(ckpts["gen"]), "objective": "critic", "sampling": PLAIN,
                                     "critic": SMALL_CRITIC}, "critic", callbacks=[fid])  # fmt: skip
    reinforce = _fit(tmp, digits_root, {
        "generator_ckpt": str(ckpts["gen"]), "objective": "reinforce", "sampling": PLAIN, "critic": SMALL_CRITIC,
        "steps": {"actions": [["none", 0], ["mask", 1], ["renoise", 1]], "hidden": 16},
        "reward": {"classifier": str(ckpts["classifier"]), "cost_weight": 0.5, "critic_ckpt": str(tmp / "runs" / "critic")},
    }, "reinforce")  # fmt: skip
    return {"critic": tmp / "runs" / "critic", "reinforce": tmp / "runs" / "reinforce",
            "critic_metrics": dict(critic.trainer.callback_metrics),
            "reinforce_metrics": dict(reinforce.trainer.callback_metrics)}  # fmt: skip


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------
# Training: the generator is frozen, the policy learns
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["critic", "reinforce"])
def test_the_generator_does_not_change_while_the_policy_trains(tmp_path, digits_root, ckpts, objective):
    extra = {"reward": {"classifier": str(ckpts["classifier"])},
             "steps": {"actions": [["none", 0], ["renoise", 1]], "hidden": 16}} if objective == "reinforce" else {}  # fmt: skip
    m = ResamplingPolicyModule(str(ckpts["gen"]), objective=objective, sampling=SamplingConfig(**PLAIN),
                               critic=SMALL_CRITIC, num_classes=10, image_size=16, **extra)  # fmt: skip
    gen_before, tok_before, policy_before = _state(m.generator), _state(m.tokenizer), _state(m)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(m, datamodule=ShardDataModule(str(digits_root), batch_size=8))
    assert all(torch.equal(v, gen_before[k]) for k, v in m.generator.state_dict().items())
    assert all(torch.equal(v, tok_before[k]) for k, v in m.tokenizer.state_dict().items())
    changed = [k for k, v in m.state_dict().items() if "baseline" not in k and not torch.equal(v, policy_before[k])]
    assert changed, "the policy's own weights did not train"
    assert not any(k.startswith(("generator", "tokenizer", "_gen")) for k in m.state_dict())  # never saved with it


def test_fit_logs_critic_accuracy_auc_and_the_policy_fid(runs):
    metrics = runs["critic_metrics"]
    for key in ("train/critic_loss", "train/critic_acc", "val/critic_acc", "val/critic_auc", "val/critic_auc_4x4",
                "val/p_auc_4x4", "val/fid_digits-classifier_20", "val/class_acc_digits-classifier_20"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/critic_auc"]) <= 1.0


def test_reinforce_logs_reward_cost_and_decisions_per_scale(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = runs["reinforce_metrics"]
    for key in ("train/reward", "train/quality", "train/cost_tokens_per_image", "train/baseline", "val/reward",
                "train/action_4x4/renoise1", "val/action_1x1/none0"):
        assert key in metrics, key
    events = EventAccumulator(str(next(runs["reinforce"].glob("version_*"))), size_guidance={"histograms": 0}).Reload()
    assert {f"train/decisions_{pn}x{pn}" for pn in (1, 2, 3, 4)} <= set(events.Tags()["histograms"])


# --------------------------------------------------------------------------------------------
# Decisions: per sample, and per token
# --------------------------------------------------------------------------------------------


class _RowLogits(nn.Module):
    """A stand-in step net: fixed action logits per sample row (the policy maps them onto the sampler's decision)."""

    def __init__(self, logits_BA: torch.Tensor) -> None:
        super().__init__()
        self.logits_BA = logits_BA

    def forward(self, features_BF: torch.Tensor, scale: int) -> torch.Tensor:
        return self.logits_BA if scale == 2 else torch.tensor([[5.0, 0.0]]).expand(features_BF.shape[0], 2)


def test_a_per_sample_decision_changes_only_that_samples_refinement(ckpts):
    module = load_generator(ckpts["gen"])
    sampler, labels, seeds = module.sampler(), torch.tensor([0, 3, 7]), [5, 6, 7]
    actions = [("none", 0), ("renoise", 2)]
    only_1 = _RowLogits(torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]))  # sample 1 renoises its 3x3 scale twice
    policy = LearnedPolicy(module.tokenizer.quantizer.codebook, module.generator.patch_nums, step_net=only_1,
                           actions=actions)  # fmt: skip
    base = sampler.sample(labels, SamplingConfig(**PLAIN), seeds=seeds)
    out = sampler.sample(labels, SamplingConfig(**PLAIN), seeds=seeds, policy=policy)
    same = lambda i: all(torch.equal(a[i], b[i]) for a, b in zip(out.tokens, base.tokens))
    assert same(0) and same(2) and not same(1)
    assert torch.equal(out.tokens_per_sample[[0, 2]], base.tokens_per_sample[[0, 2]])
    assert out.tokens_per_sample[1] == base.tokens_per_sample[1] + 2 * (9 + 16)  # two completions of 4x4 + 3x3 passes
    assert [a.tolist() for a in policy.chosen] == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_the_token_critic_decides_what_mask_resampling_redraws(ckpts):
    module = load_generator(ckpts["gen"])
    sampler = module.sampler()
    torch.manual_seed(3)
    net = TokenCriticNet(TokenCriticConfig(latent_dim=16, num_scales=4, num_classes=10, width=16, depth=1))
    with torch.no_grad():
        net.out[-1].weight.mul_(30.0)  # scores spread over (0, 1): some tokens are kept, others redrawn
    critic_policy = LearnedPolicy(module.tokenizer.quantizer.codebook, module.generator.patch_nums, critic_net=net,
                                  critic_steps=[0, 0, 0, 1], threshold=0.5)  # one step at the 4x4 scale  # fmt: skip
    seen = {}

    def spy(stats):
        decision = critic_policy(stats)
        if stats.scale == 3:
            seen["keep"] = decision.critic(stats, stats.tokens_Bl) >= 0.5
            seen["first"] = stats.tokens_Bl.clone()
            seen["p_keep"] = stats.probs_BlV.gather(-1, stats.tokens_Bl[..., None])[..., 0] >= 0.5
        return decision

    labels = torch.tensor([0, 3, 7, 9])
    final = sampler.sample(labels, SamplingConfig(**PLAIN), seeds=2, policy=spy).tokens[3].flatten(1)
    keep, first = seen["keep"], seen["first"]
    assert 0 < keep.float().mean() < 1
    assert not torch.equal(keep, seen["p_keep"])  # the critic's choice, not the generator's probability threshold
    assert torch.equal(final[keep], first[keep]) and (final[~keep] != first[~keep]).any()


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["critic", "reinforce"])
def test_the_policy_checkpoint_round_trips(runs, ckpts, run):
    file = resolve_checkpoint(runs[run])
    saved = torch.load(file, map_location="cpu", weights_only=True)
    assert saved["srdd_generator"]["path"] == str(ckpts["gen"]) and not any("generator." in k for k in saved["state_dict"])
    a = load_stage(runs[run])  # by the class the checkpoint records, on the generator it records
    b = load_policy(str(runs[run]), load_generator(ckpts["gen"]))
    for m in (a, b):
        assert isinstance(m, ResamplingPolicyModule) and m.hparams.objective == run
        assert set(m.state_dict()) == set(saved["state_dict"])
        assert all(torch.equal(v, saved["state_dict"][k]) for k, v in m.state_dict().items())
    labels = torch.tensor([1, 2, 3])
    x = a.sampler().sample(labels, SamplingConfig(**PLAIN), seeds=0)
    y = b.sampler().sample(labels, SamplingConfig(**PLAIN), seeds=0)
    assert torch.equal(x.images, y.images) and torch.equal(x.tokens_per_sample, y.tokens_per_sample)


def test_the_policy_refuses_a_generator_with_other_weights(runs, ckpts):
    recorded = torch.load(resolve_checkpoint(runs["critic"]), weights_only=True)["srdd_generator"]["fingerprint"]
    other = load_generator(ckpts["other"])
    with pytest.raises(ValueError, match="was trained on the generator") as e:
        load_policy(str(runs["critic"]), other)
    assert recorded in str(e.value) and str(ckpts["gen"]) in str(e.value) and str(ckpts["other"]) in str(e.value)
    with pytest.raises(ValueError, match="was trained on the generator") as e:
        load_stage(runs["critic"], generator_ckpt=str(ckpts["other"]))
    assert recorded in str(e.value) and str(ckpts["other"]) in str(e.value)


def test_the_policy_refuses_another_stages_checkpoint(runs, ckpts):
    policy = load_stage(runs["critic"])
    with pytest.raises(ValueError, match=r"written by srdd_lightning\.stages\.generator\.SRDDModule, not by Resampl"):
        policy.check_checkpoint(torch.load(ckpts["gen"], map_location="cpu", weights_only=True))


# --------------------------------------------------------------------------------------------
# srdd sample --policy_ckpt
# --------------------------------------------------------------------------------------------


def test_srdd_sample_applies_the_policy_from_the_command_line(tmp_path, runs, ckpts, capsys):
    common = ["--ckpt", str(ckpts["gen"]), "--num_samples", "6", "--cfg", "0", "--top_k", "0", "--top_p", "1", *QUIET]
    sample_main([*common, "--out", str(tmp_path / "plain")])
    sample_main([*common, "--out", str(tmp_path / "policy"), "--policy_ckpt", str(runs["reinforce"]), "--batch_size", "4"])
    record = json.loads((tmp_path / "policy" / "sampling.json").read_text())
    assert record["complete"] and record["policy"]["checkpoint"] == str(resolve_checkpoint(runs["reinforce"]))
    assert record["policy"]["objective"] == "reinforce" and len(record["policy_fingerprint"]) == 16
    # the images are the policy's, and the folder's cost is what its decisions cost, averaged over the images
    sampler, labels = load_policy(str(runs["reinforce"])).sampler(), [0, 1, 3, 5, 6, 8]
    outs = [sampler.sample(torch.tensor(labels[s]), SamplingConfig(**PLAIN), seeds=s.start) for s in (slice(0, 4), slice(4, 6))]
    images, tokens = torch.cat([to_uint8(o.images) for o in outs]), torch.cat([o.tokens_per_sample for o in outs])
    assert record["cost_per_image"]["tokens"] == pytest.approx(float(tokens.mean()))
    for i, c in enumerate(labels):
        assert torch.equal(load_png(tmp_path / "policy" / f"{i:06d}_c{c}.png"), images[i])
    # the critic's mask steps redraw tokens: other images than without the policy
    sample_main([*common, "--out", str(tmp_path / "critic"), "--policy_ckpt", str(runs["critic"])])
    plain = [load_png(p) for p in sorted((tmp_path / "plain").glob("0*_c*.png"))]
    critic = [load_png(p) for p in sorted((tmp_path / "critic").glob("0*_c*.png"))]
    assert len(plain) == len(critic) == 6 and any(not torch.equal(a, b) for a, b in zip(plain, critic))
    # the same folder without the policy is other samples: refused, naming --policy_ckpt
    with pytest.raises(SystemExit) as e:
        sample_main([*common, "--out", str(tmp_path / "policy")])
    assert e.value.code == 2 and "--policy_ckpt" in capsys.readouterr().err


def test_srdd_sample_refuses_a_policy_of_another_generator_in_one_line(tmp_path, runs, ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(ckpts["other"]), "--out", str(tmp_path / "x"), "--num_samples", "2",
                     "--policy_ckpt", str(runs["critic"]), *QUIET])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "was trained on the generator" in err and str(ckpts["other"]) in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as e:  # a generator checkpoint given as the policy
        sample_main(["--ckpt", str(ckpts["gen"]), "--out", str(tmp_path / "y"), "--num_samples", "2",
                     "--policy_ckpt", str(ckpts["gen"]), *QUIET])  # fmt: skip
    assert e.value.code == 2 and "not a resampling-policy checkpoint" in capsys.readouterr().err


def test_bad_policy_options_are_named(ckpts):
    with pytest.raises(ValueError, match="critic.threshold"):
        ResamplingPolicyModule(str(ckpts["gen"]), critic={"threshold": 1.5})
    with pytest.raises(ValueError, match="steps.actions"):
        ResamplingPolicyModule(str(ckpts["gen"]), objective="reinforce", steps={"actions": [["often", 1], ["none", 0]]})
    with pytest.raises(FileNotFoundError, match="generator_ckpt"):
        ResamplingPolicyModule(str(ckpts["dir"] / "missing"))
    with pytest.raises(ValueError, match="11 classes"):
        ResamplingPolicyModule(str(ckpts["gen"]), num_classes=11)


def test_the_experiment_configs_parse():
    root = Path(__file__).resolve().parents[1]
    for name in ("digits", "ffhq"):
        cfg = yaml.safe_load((root / "experiments" / name / "policy.yaml").read_text())
        assert cfg["model"]["class_path"] == POLICY
        args = cfg["model"]["init_args"]
        assert args["objective"] in ("critic", "reinforce") and args["generator_ckpt"]


class _Features:
    """A stand-in extractor: the features are given, whatever the images."""

    device = torch.device("cpu")

    def __init__(self, f_BD: torch.Tensor) -> None:
        self.f_BD = f_BD

    def __call__(self, u8: torch.Tensor) -> torch.Tensor:
        return self.f_BD


def test_the_mmd_quality_rewards_realism_and_penalises_copies(ckpts):
    from srdd_lightning.stages.policy import _Shared

    m = ResamplingPolicyModule(str(ckpts["gen"]), objective="reinforce", reward={"quality": "mmd"})
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    m._real_features, m._bandwidth, m._kernel_scale = real, 4.0, 0.5
    m._prepare_reward = lambda: None
    images, labels = torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)

    def quality(f_BD):
        m._reward_model = _Shared(_Features(f_BD))
        return m.quality(images, labels)

    diverse = torch.stack([real[0], real[1], real[2], real[3]])
    far = torch.stack([real[0], real[1], real[2], 6 * torch.ones(8)])  # one sample off the data
    copies = torch.stack([real[0], real[0], real[2], real[3]])  # one sample repeated
    q_diverse, q_far, q_copies = quality(diverse), quality(far), quality(copies)
    assert q_far[3] < q_diverse[3]
    assert q_copies[0] < q_diverse[0] and q_copies[1] < q_diverse[1]


def test_the_policy_fingerprint_covers_its_decision_options(runs):
    a = load_stage(runs["critic"])
    b = load_stage(runs["critic"], critic={**a.hparams.critic, "threshold": 0.3})  # same weights, other decisions
    assert a.fingerprint() == load_stage(runs["critic"]).fingerprint() != b.fingerprint()
