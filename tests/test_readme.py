"""Every command in the README runs, word for word, in a sandbox with small data (so the README cannot rot).

Commands run in README order in one folder, as a reader would type them, after placeholders get real values
(CFG, DIR, ~/pictures, x.png, hole.png). The only changes: `srdd fit` on a CPU config trains 2 steps (the
budget, not the command, is what the README states in minutes); a config that needs GPUs, data or weights this
machine does not have is parsed with --print_config (every option checked); a multi-process launch (torchrun,
srun) checks that every option it passes exists; a make target is checked with `make -n`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from srdd_lightning.cli import main
from srdd_lightning.utils.images import save_png

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"CFG": "experiments/digits/smoke.yaml", "DIR": "samples/readme", "~/pictures": "pictures",
                "x.png": "x.png", "hole.png": "hole.png"}  # fmt: skip
# Configs this CPU machine cannot train (GPUs, paper datasets, VAR's weights): parsed only.
PARSE_ONLY = re.compile(r"experiments/(ffhq|miniimagenet|sun397)|--trainer.devices 8|GeneratorFSDP")


def readme_commands() -> list[str]:
    """The commands of the README's code blocks (indented by 4), continuation lines joined, comments cut."""
    lines, out, i = (REPO / "README.md").read_text().splitlines(), [], 0
    while i < len(lines):
        if re.match(r"    (srdd|make|torchrun|srun|python) ", lines[i]):
            cmd = lines[i].strip()
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            out.append(re.split(r"\s{2,}#", cmd)[0].strip())
        i += 1
    return out


COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder with the repository's experiments/, a few of one's own pictures and an image + mask to edit."""
    root = tmp_path_factory.mktemp("readme")
    (root / "experiments").symlink_to(REPO / "experiments")
    g = torch.Generator().manual_seed(0)
    for c in ("cats", "dogs"):
        for i in range(100):
            save_png(torch.randint(0, 256, (3, 24, 20), generator=g, dtype=torch.uint8), root / "pictures" / c / f"{i}.png")
    save_png(torch.randint(0, 256, (3, 16, 16), generator=g, dtype=torch.uint8), root / "x.png")
    hole = torch.zeros(3, 16, 16, dtype=torch.uint8)
    hole[:, 4:12, 4:12] = 255
    save_png(hole, root / "hole.png")
    # What the README's commands build on, made first as its sections do (pack, classifier, tokenizer, generator)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["data", "digits", "--out", "data/digits"])
        main(["classifier", "--data", "data/digits", "--epochs", "3", "--min_accuracy", "0"])
        for cfg in ("experiments/digits/tokenizer.yaml", "experiments/digits/srdd.yaml", "experiments/digits/smoke.yaml"):
            main(_tiny(["fit", "--config", cfg]))
    finally:
        os.chdir(cwd)
    return root


def _tiny(argv: list[str]) -> list[str]:
    """2 training steps for a CPU config (and no warmup longer than that)."""
    configs = [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]
    warm = any("warmup_steps" in (Path(c).read_text() if Path(c).is_file() else "") for c in configs)
    extra = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false"]  # fmt: skip
    return argv + extra + (["--model.init_args.optim.warmup_steps", "1"] if warm else [])


def _help_text(sub: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([sub, "--help"])
    return capsys.readouterr().out


def test_the_readme_has_commands():
    assert len(COMMANDS) > 30 and "srdd fit --config experiments/digits/srdd.yaml" in COMMANDS


@pytest.mark.parametrize("n", range(len(COMMANDS)), ids=[c[:60] for c in COMMANDS])
def test_readme_command(n, sandbox, monkeypatch, capsys):
    cmd = COMMANDS[n]
    for old, new in PLACEHOLDERS.items():
        cmd = re.sub(rf"(?<![\w/.-]){re.escape(old)}(?![\w.-])", new, cmd)
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if cmd.startswith("make "):
        target = cmd.split()[1]
        proc = subprocess.run(["make", "-n", "-C", str(REPO), *cmd.split()[1:]], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip(), f"make target {target}: {proc.stderr}"
        return
    if cmd.startswith(("torchrun", "srun")):  # a launch of many processes: every option it passes must exist
        words = shlex.split(cmd.replace("$(which srdd)", "srdd"))
        srdd = words[words.index("srdd") + 1 :]
        known = _help_text(srdd[0], capsys) if srdd[0] != "fit" else _fit_help(srdd, capsys)
        for opt in (a for a in srdd if a.startswith("--")):
            assert opt in known, f"{opt} of `{cmd}` is not an option of srdd {srdd[0]}"
        return
    argv = shlex.split(cmd)
    if argv[0] == "python":
        proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), *argv[1:]], capture_output=True, text=True,
                              cwd=sandbox, env={**os.environ, "PYTHONPATH": str(REPO / "src")}) if (
            REPO / ".venv" / "bin" / "python").exists() else subprocess.run(["python3", *argv[1:]], capture_output=True,
                                                                           text=True, cwd=sandbox)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    argv = argv[1:]  # drop "srdd"
    if argv[0] == "data" and "--out" in argv:  # a reader packs once: the fixture's pack (deterministic) gives way
        shutil.rmtree(sandbox / argv[argv.index("--out") + 1], ignore_errors=True)
    if argv and argv[0] == "fit" and "--help" not in argv and "--model.help" not in argv and "--print_config" not in argv:
        if PARSE_ONLY.search(cmd):
            argv = argv + ["--print_config"]
        else:
            argv = _tiny(argv)
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), f"`{cmd}` exited with {e.code}: {capsys.readouterr().err[-2000:]}"


def _fit_help(srdd: list[str], capsys) -> str:
    """The options `srdd fit` accepts with the given config (LightningCLI's and the stage's)."""
    configs = [a for i, a in enumerate(srdd) if i and srdd[i - 1] == "--config"]
    model = yaml.safe_load((REPO / configs[-1]).read_text())["model"]["class_path"]
    text = _help_text("fit", capsys)
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", model])
    return text + capsys.readouterr().out
