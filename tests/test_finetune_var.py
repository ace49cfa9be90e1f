"""Fine-tuning from VAR's released weights (``SRDDModule``'s ``init_from``): a VAR-shaped checkpoint built here gives the
importer's logits at step 0 for ``causal`` and, with the block mask, ``markov``; subset schedules take the matching
scales; another class count needs ``init_from_ignore: [class_embed]``; a resumed run keeps its own weights."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from test_generator_stage import StopAt, _ckpt, save_tokenizer_module_ckpt, write_config
from test_transformer import _ref_block, _var_state_dict

from srdd_lightning.cli import main
from srdd_lightning.models.scales import num_tokens, scale_ids, scale_slices
from srdd_lightning.models.transformer import generator_config
from srdd_lightning.models.var_import_transformer import load_var_transformer
from srdd_lightning.stages.generator import SRDDModule

REPO = Path(__file__).resolve().parents[1]
PNS, H, DEPTH = (1, 2, 3, 4), 2, 2  # the tiny-16 tokenizer's scales; a VAR of depth 2, width 64, 2 heads
ARCH = {"depth": DEPTH, "width": 64, "num_heads": H}


def var_sd(num_classes: int = 10) -> dict[str, torch.Tensor]:
    """VAR's key names and shapes (models/var.py), for the tiny-16 tokenizer: V 512, Cvae 16."""
    return _var_state_dict(DEPTH, 64, H, 512, 16, PNS, num_classes)


@pytest.fixture(scope="module")
def tok_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok") / "runs" / "tok"
    save_tokenizer_module_ckpt(root / "version_0" / "checkpoints" / "last.ckpt")
    return root


@pytest.fixture(scope="module")
def var_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "var_d2.pth"
    torch.save(var_sd(), path)
    return path


def module(tok_run: Path, **kw) -> SRDDModule:
    return SRDDModule(str(tok_run), num_classes=10, image_size=16, **{"architecture": dict(ARCH), **kw}).eval()


def importer(attn: str, sd=None, **kw):
    cfg = generator_config("tiny", **{**ARCH, "vocab_size": 512, "latent_dim": 16, "patch_nums": PNS, "num_classes": 10,
                                      "attn": attn, **kw})  # fmt: skip
    return load_var_transformer(var_sd() if sd is None else sd, cfg).eval()


def ref_forward(sd, label_B, x_BLC, pns, allowed_LL):
    """VAR's teacher-forced forward from its equations (tests/test_transformer.py) under a given scale mask."""
    cond = sd["class_emb.weight"][label_B]
    lvl = scale_ids(pns)
    h = torch.cat([cond[:, None] + sd["pos_start"], x_BLC @ sd["word_embed.weight"].T + sd["word_embed.bias"]], dim=1)
    h = h + sd["lvl_embed.weight"][lvl] + sd["pos_1LC"]
    for i in range(DEPTH):
        h = _ref_block(sd, i, h, cond, allowed_LL, H)
    ada = torch.nn.functional.silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]
    C = h.shape[-1]
    h = h - h.mean(-1, keepdim=True)
    h = h / torch.sqrt(h.square().mean(-1, keepdim=True) + 1e-6)
    return (h * (1 + ada[:, None, :C]) + ada[:, None, C:]) @ sd["head.weight"].T + sd["head.bias"]


def inputs(schedule=PNS, batch: int = 3):
    g = torch.Generator().manual_seed(4)
    return torch.tensor([0, 7, 10][:batch]), torch.randn(batch, num_tokens(schedule) - schedule[0] ** 2, 16, generator=g)


# --------------------------------------------------------------------------------------------
# The weights and the logits at step 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["causal", "markov"])
def test_init_from_var_gives_the_importers_logits(tok_run, var_file, attn):
    m = module(tok_run, attn=attn, init_from=str(var_file))
    m.load_initial_weights(str(var_file))
    label, x = inputs()
    lvl = scale_ids(PNS)
    allowed = lvl[:, None] >= lvl[None, :] if attn == "causal" else lvl[:, None] == lvl[None, :]  # the block mask
    with torch.no_grad():
        got = m.generator(label, x)
        torch.testing.assert_close(got, importer(attn)(label, x), rtol=0, atol=0)  # the same function
        torch.testing.assert_close(got, ref_forward(var_sd(), label, x, PNS, allowed), rtol=1e-4, atol=1e-4)
        other = ref_forward(var_sd(), label, x, PNS, ~allowed | torch.eye(len(lvl), dtype=torch.bool))
        assert not torch.allclose(got, other, atol=1e-3)  # the mask matters: the comparison can fail


def test_subset_schedule_takes_the_matching_scales(tok_run, var_file):
    m = module(tok_run, attn="markov", schedule=[1, 2, 4], init_from=str(var_file))
    m.load_initial_weights(str(var_file))
    sd, g = var_sd(), m.generator
    for j, i in enumerate([0, 1, 3]):
        assert torch.equal(g.level_embed.weight[j], sd["lvl_embed.weight"][i])
        assert torch.equal(g.pos_embed[:, scale_slices([1, 2, 4])[j]], sd["pos_1LC"][:, scale_slices(PNS)[i]])
    label, x = inputs((1, 2, 4))
    with torch.no_grad():  # = VAR's weights run on the short schedule
        torch.testing.assert_close(g(label, x), importer("markov")(label, x, schedule=[1, 2, 4]), rtol=0, atol=0)


def test_another_class_count_needs_init_from_ignore(tok_run, tmp_path):
    path = tmp_path / "var_d2_5classes.pth"
    torch.save(var_sd(num_classes=5), path)
    m = module(tok_run, attn="markov", init_from=str(path))
    with pytest.raises(ValueError, match=r"trained on 5 classes, but the data has 10: .*init_from_ignore: \[class_embed\]"):
        m.load_initial_weights(str(path))
    m = module(tok_run, attn="markov", init_from=str(path), init_from_ignore=["class_embed"])
    fresh = m.generator.class_embed.weight.clone()
    m.load_initial_weights(str(path))
    assert torch.equal(m.generator.class_embed.weight, fresh)  # freshly initialised, 11 rows (null class included)
    want = importer("markov", var_sd(num_classes=5), num_classes=5).state_dict()
    for k, v in m.generator.state_dict().items():
        if k != "class_embed.weight":
            assert torch.equal(v, want[k]), k


def test_init_from_errors(tok_run, var_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights/var_d16.pth.*model.init_args.init_from.*Download VAR's released"):
        SRDDModule.check_init_args({"tokenizer_ckpt": str(tok_run), "init_from": "weights/var_d16.pth"})
    deeper = module(tok_run, architecture={**ARCH, "depth": 3}, init_from=str(var_file))
    with pytest.raises(ValueError, match=r"VAR's weights .* do not fit the generator: .*our keys without a value"):
        deeper.load_initial_weights(str(var_file))
    with pytest.raises(ValueError, match=r"ignore entries \['class_emb'\] name no parameter"):
        module(tok_run, init_from=str(var_file), init_from_ignore=["class_emb"]).load_initial_weights(str(var_file))
    tok_file = tok_run / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"neither VAR's var_d\*.pth transformer weights nor a generator"):
        module(tok_run, init_from=str(tok_file)).load_initial_weights(str(tok_file))


def test_init_from_a_generator_run(tok_run, tmp_path):
    """A run of this framework (EMA weights) also starts a generator, e.g. on fewer scales; its tokenizer must match."""
    src = module(tok_run, attn="markov")
    from helpers import randomize_weights

    randomize_weights(src.generator, seed=2, std=0.2)
    info = src.tokenizer_info
    ckpt = {"state_dict": {f"generator.{k}": v for k, v in src.generator.state_dict().items()},
            "hyper_parameters": {"tokenizer_ckpt": info["path"], "schedule": None},
            "srdd_tokenizer": {"fingerprint": info["fingerprint"], "patch_nums": list(PNS)},
            "srdd_stage": "srdd_lightning.stages.generator.SRDDModule"}  # fmt: skip
    path = tmp_path / "gen.ckpt"
    torch.save(ckpt, path)
    m = module(tok_run, attn="markov", schedule=[1, 2, 4], init_from=str(path))
    m.load_initial_weights(str(path))
    label, x = inputs((1, 2, 4))
    with torch.no_grad():
        torch.testing.assert_close(m.generator(label, x), src.generator(label, x, schedule=[1, 2, 4]), rtol=0, atol=0)
    ckpt["srdd_tokenizer"]["fingerprint"] = "0" * 16
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"trained with the tokenizer .*its codes mean other things"):
        m.load_initial_weights(str(path))


# --------------------------------------------------------------------------------------------
# Through the CLI: applied once at setup, never over a resumed run
# --------------------------------------------------------------------------------------------


class StartWeights(pl.Callback):
    """The generator's weights when training starts (after setup and any checkpoint restore)."""

    def __init__(self, out: str):
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        torch.save({k: v.clone() for k, v in pl_module.generator.state_dict().items()}, self.out)


def _config(tmp: Path, digits_root: Path, tok_run: Path, var_file: Path, snapshot: Path, **kw) -> Path:
    path = write_config(tmp, digits_root, tok_run, max_steps=4, architecture=dict(ARCH), attn="markov",
                        init_from=str(var_file), **kw)  # fmt: skip
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": f"{__name__}.StartWeights", "init_args": {"out": str(snapshot)}})
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_starts_from_var_and_a_resumed_run_from_its_checkpoint(tmp_path, digits_root, tok_run, var_file):
    start = tmp_path / "start.pt"
    cfg = _config(tmp_path, digits_root, tok_run, var_file, start, stop_at=2)
    main(["fit", "--config", str(cfg)])
    want = importer("markov").state_dict()
    got = torch.load(start, weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # step 0 = VAR's weights
    run = tmp_path / "runs" / "gen" / "srdd" / "version_0"
    step2 = _ckpt(run)
    assert step2["global_step"] == 2 and step2["hyper_parameters"]["init_from"] == str(var_file)
    main(["fit", "--config", str(cfg), "--ckpt_path", "last"])
    resumed = torch.load(start, weights_only=True)
    for k, v in resumed.items():  # the checkpoint's trained weights, not VAR's again
        assert torch.equal(v, step2["current_model_state"][f"generator.{k}"]), k
    assert not torch.equal(resumed["head.out.weight"], want["head.out.weight"])
    assert _ckpt(run)["global_step"] == 4
    # a stage loaded from its checkpoint and then validated (setup again) keeps its weights too
    m = SRDDModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    m.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    before = {k: v.clone() for k, v in m.generator.state_dict().items()}
    m.setup("validate")
    assert all(torch.equal(v, before[k]) for k, v in m.generator.state_dict().items())


def test_readme_fine_tune_command_parses(capsys):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Fine-tune VAR as SRDD"):]
    section = section[: section.index("\n## ", 1)]
    cmd = next(line.strip() for line in section.splitlines() if line.strip().startswith("srdd fit"))
    args = cmd.split()[1:]
    with pytest.raises(SystemExit) as e:
        main([a.strip("'") for a in args] + ["--print_config"])
    assert e.value.code == 0
    init = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert init["init_from"] == "weights/var_d16.pth" and init["attn"] == "markov"
    assert init["init_from_ignore"] == ["class_embed"]
    assert math.isfinite(init["optim"]["lr"])
