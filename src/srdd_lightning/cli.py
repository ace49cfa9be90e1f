"""The ``srdd`` command: LightningCLI for the training stages (fit / validate / test), plus the project's tools.

Runs live under ``runs/<name>/version_<k>/`` (config, logger events, ``checkpoints/``); the name defaults to the
config's path below ``experiments/`` (``digits/srdd``); ``--ckpt_path last`` resumes its newest run, in its folder.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
import os
import re
import signal
import sys
import threading
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI as ToolCLI
from jsonargparse import Namespace, set_parsing_settings
from jsonargparse._util import import_object
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .callbacks.ema import EMA, ShardedEMA
from .callbacks.throughput import Throughput
from .data.datamodule import ShardDataModule
from .data.index import ShardIndex
from .data.pack import PackError, pack_digits, pack_image_folder
from .utils.io import atomic_write

DEFAULT_RUN_ROOT = "runs"
_VERSION = re.compile(r"version_(\d+)")


class RunConfigSaver(SaveConfigCallback):
    """Save the resolved config as ``config.yaml``; a resumed run adds ``config.resume-<n>.yaml`` instead of crashing."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir
        if log_dir is not None and (Path(log_dir) / self.config_filename).exists():
            n = next(n for n in itertools.count(1) if not (Path(log_dir) / f"config.resume-{n}.yaml").exists())
            self.config_filename = f"config.resume-{n}.yaml"
        super().setup(trainer, pl_module, stage)


def default_run_name(config_paths: Sequence, model_class_path: str | None) -> str:
    """``experiments/digits/srdd.yaml`` -> ``digits/srdd``; without a config, the model class name."""
    if config_paths:
        parts = Path(str(getattr(config_paths[-1], "relative", config_paths[-1]))).with_suffix("").parts
        at = len(parts) - parts[::-1].index("experiments") if "experiments" in parts else len(parts) - 1
        return "/".join(parts[at:])
    return (model_class_path or "run").rsplit(".", 1)[-1]


def version_of_checkpoint(ckpt_path: str | Path) -> int | None:
    """``runs/x/version_3/checkpoints/last.ckpt`` -> 3, so a resumed run keeps logging into its folder."""
    parent = Path(ckpt_path).resolve().parent
    m = _VERSION.fullmatch(parent.parent.name) if parent.name == "checkpoints" else None
    return int(m[1]) if m else None


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weights: the run stops, and no checkpoint is written from that state."""


INTERRUPT: dict[str, int | None] = {"signal": None}  # the signal that stopped the last fit (main's exit status)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints saved by ``utils.io.atomic_write``: a crash mid-save never leaves a truncated ``.ckpt`` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never writes a worse checkpoint; ``last.ckpt`` is always a run's final state.

    A non-finite ``train/*loss*`` or weight stops the run with nothing saved from it (:class:`NonFiniteError`).
    SIGTERM (preemption) or a first Ctrl-C stops at the end of the step with ``last.ckpt`` written there (``srdd``
    exits 128 + the signal; ``--ckpt_path last`` continues exactly); a second Ctrl-C stops at once, unsaved.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        INTERRUPT["signal"] = None
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame):  # the first Ctrl-C stops gracefully, like Lightning's SIGTERM
                if INTERRUPT["signal"] is None:
                    INTERRUPT["signal"] = signum
                    trainer._signal_connector.received_sigterm = True
                    rank_zero_info("Ctrl-C: stopping after this step with a checkpoint (press again to stop at once)")
                else:
                    signal.signal(signal.SIGINT, previous)
                    raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if threading.current_thread() is threading.main_thread():
            lightning_handler = signal.getsignal(signal.SIGTERM)  # Lightning's: stop at the end of this step

            def on_sigterm(signum, frame):
                INTERRUPT["signal"] = INTERRUPT["signal"] or signum
                if callable(lightning_handler):
                    lightning_handler(signum, frame)

            signal.signal(signal.SIGTERM, on_sigterm)

    def on_train_batch_end(self, trainer, pl_module, outputs, *args, **kwargs) -> None:
        losses = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/") and "loss" in k}
        if isinstance(outputs, dict) and torch.is_tensor(outputs.get("loss")):
            losses["loss"] = outputs["loss"].detach()
        bad = next((k for k, v in losses.items() if not torch.isfinite(torch.as_tensor(v)).all()), None)
        if trainer.strategy.reduce_boolean_decision(bad is not None, all=False):
            raise NonFiniteError(self._stop_message(trainer, f"{bad or 'the loss'} is {losses.get(bad, 'non-finite')}"))
        with warnings.catch_warnings():
            # Lightning 2.6 warns (with a page of sample code) that under manual optimization the checkpoint
            # holds the state after the optimizer step: that is exactly the state a resumed run needs.
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization",
                                    category=UserWarning)
            super().on_train_batch_end(trainer, pl_module, outputs, *args, **kwargs)

    def _stop_message(self, trainer, what: str) -> str:
        return (f"training stopped at step {trainer.global_step}: {what}; nothing was saved from this state, the last "
                f"good checkpoint is {self.last_model_path or 'none written yet'}. Lower the learning rate (or check "
                f"the data), then resume with --ckpt_path last")  # fmt: skip

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        name = next((n for n, p in trainer.lightning_module.named_parameters() if not torch.isfinite(p).all()), None)
        if trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            raise NonFiniteError(self._stop_message(trainer, f"the weights are not finite ({name or 'on another rank'})"))
        super()._save_checkpoint(trainer, filepath)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning raises SIGTERMException at the end of a step: the state is whole, so it is saved
        if (isinstance(exception, SIGTERMException) and not trainer.sanity_checking
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class SRDDCLI(LightningCLI):
    """LightningCLI in subclass mode (the stage is ``model.class_path``) over :class:`ShardDataModule`."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs):
        super().__init__(model_class=LightningModule, subclass_mode_model=True, datamodule_class=ShardDataModule,
                         save_config_callback=RunConfigSaver, seed_everything_default=0, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="Run name: outputs go to <run.root>/<run.name>/version_<k>/ "
                                 "(default: the config's path below experiments/, e.g. digits/srdd).")
        parser.add_argument("--run.root", type=str, default=DEFAULT_RUN_ROOT, help="Folder holding all runs.")
        parser.add_argument("--run.logger", type=Literal["tensorboard", "csv"], default="tensorboard",
                            help="Logger writing into the run folder: tensorboard (events files) or csv (metrics.csv). "
                                 "Any other Lightning logger: --trainer.logger CLASS with its own options.")
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        # last.ckpt is overwritten in place (no last-v1.ckpt when a resumed run changes checkpoint options).
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500,
                             "checkpoint.enable_version_counter": False})
        # Every stage keeps an EMA of its weights (VAR keeps none: README "Differences from VAR"); validation,
        # sample grids, FID and the loaders use it. `ema.decay: 0` makes it equal to the trained weights.
        parser.add_lightning_class_args(EMA, "ema")

    # ---- run folder, resume and data-derived model arguments
    def _run_name(self, cfg) -> str:
        return cfg.run.name or default_run_name(cfg.get("config") or [], cfg.model.class_path if cfg.get("model") else None)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        if cfg.get("ckpt_path") == "last":
            run = Path(cfg.run.root) / self._run_name(cfg)
            versions = [(int(m[1]), p) for p in run.glob("version_*") if (m := _VERSION.fullmatch(p.name))]
            last = max(versions)[1] / "checkpoints" / "last.ckpt" if versions else None  # the newest version's
            if last is None or not last.exists():
                raise FileNotFoundError(f"--ckpt_path last: no {run / 'version_*' / 'checkpoints' / 'last.ckpt'} "
                                        f"exists to resume from; give the checkpoint's path instead")
            cfg.ckpt_path = str(last)
        if cfg.get("ckpt_path"):
            self._check_resume(cfg)
        super()._parse_ckpt_path()

    def _check_resume(self, cfg) -> None:
        """Refuse to resume a checkpoint of another stage, or a generator with another tokenizer (naming both)."""
        from .loading import CKPT_TOKENIZER_KEY, load_tokenizer, read_checkpoint, resolve_tokenizer_checkpoint, stage_class

        file, ckpt = read_checkpoint(cfg.ckpt_path, "--ckpt_path")
        theirs, ours = stage_class(ckpt), cfg.model.class_path if cfg.get("model") else None
        if theirs is not None and ours is not None and theirs != ours:
            raise ValueError(f"--ckpt_path {file} is a checkpoint of {theirs}, but the config trains {ours} "
                             f"(model.class_path): resume a run of the same stage")  # fmt: skip
        recorded = ckpt.get(CKPT_TOKENIZER_KEY) if isinstance(ckpt, dict) else None
        given = (cfg.model.get("init_args") or {}).get("tokenizer_ckpt") if cfg.get("model") else None
        if recorded and given:
            given_file = resolve_tokenizer_checkpoint(given)
            if given_file.resolve() != Path(recorded["abspath"]).resolve():
                _, info = load_tokenizer(given_file)
                if info["fingerprint"] != recorded["fingerprint"]:
                    raise ValueError(f"--ckpt_path {file} was trained with the tokenizer {recorded['path']} (weights "
                                     f"{recorded['fingerprint']}, vocab_size {recorded['vocab_size']}), but "
                                     f"model.init_args.tokenizer_ckpt={given} gives {given_file} (weights "
                                     f"{info['fingerprint']}, vocab_size {info['vocab_size']}); resume with the "
                                     f"tokenizer the run was trained with")  # fmt: skip

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        self._fill_model_from_data(cfg)
        if cfg.trainer.get("default_root_dir") is None:  # where outputs go even without a logger
            cfg.trainer.default_root_dir = str(Path(cfg.run.root) / self._run_name(cfg))
        version = version_of_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
        if cfg.trainer.get("logger") in (None, True):
            where, csv = {"save_dir": cfg.run.root, "name": self._run_name(cfg), "version": version}, cfg.run.logger == "csv"
            cfg.trainer.logger = {"class_path": f"lightning.pytorch.loggers.{'CSVLogger' if csv else 'TensorBoardLogger'}",
                                  "init_args": where if csv else {**where, "default_hp_metric": False}}

    def _fill_model_from_data(self, cfg) -> None:
        """Give the model what the packed data defines (``num_classes``, ``image_size``) unless set by hand."""
        model_cls = import_object(cfg.model.class_path)
        params = inspect.signature(model_cls.__init__).parameters
        index = ShardIndex.load(cfg.data.root, tokens=None)
        if index.tokens is not None and not getattr(model_cls, "trains_from_tokens", False):
            raise ValueError(f"data.root {cfg.data.root} is a token cache (srdd data tokenize), but "
                             f"{model_cls.__name__} trains on images: give data.root the packed images it was "
                             f"written from ({index.source})")  # fmt: skip
        derived = {"num_classes": index.num_classes, "image_size": cfg.data.resolution or index.resolution}
        init_args = cfg.model.get("init_args") or Namespace()
        for key, value in derived.items():
            given = init_args.get(key)
            if key in params and given is None:
                init_args[key] = value
            elif key in params and given != value:
                raise ValueError(
                    f"model.init_args.{key}={given} disagrees with the data ({cfg.data.root} gives {key}={value}); "
                    f"leave model.init_args.{key} unset to take it from the data"
                )
        cfg.model.init_args = init_args
        # A stage may check its paths here, so a missing file is reported plainly rather than
        # wrapped in jsonargparse's "does not validate against any of the Union subtypes".
        if (check := getattr(model_cls, "check_init_args", None)) is not None:
            check(init_args.as_dict())

    def after_instantiate_classes(self) -> None:
        strategy, cbs = self.trainer.strategy, self.trainer.callbacks
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
        if isinstance(strategy, FSDPStrategy):  # WeightAveraging cannot copy a sharded module: the same EMA per shard
            cbs[:] = [ShardedEMA(cb.decay, cb.warmup) if type(cb) is EMA else cb for cb in cbs]
        if self.trainer.loggers:  # learning rates and throughput in every run's dashboard (need a logger)
            have = {type(cb) for cb in cbs}
            extra = [cb for cb in (LearningRateMonitor(logging_interval="step"), Throughput()) if type(cb) not in have]
            at = next((i for i, cb in enumerate(cbs) if isinstance(cb, ModelCheckpoint)), len(cbs))
            cbs[at:at] = extra  # before the checkpoint callbacks, which Lightning keeps last


# ----------------------------------------------------------------------------- tools outside LightningCLI

def _data_tool(argv: Sequence[str]) -> None:
    """``srdd data digits|folder|tokenize``: a user's mistake (option, folder, existing pack) is one line, exit code 2."""
    from .data.tokens import tokenize

    prog = "srdd data"
    tools = {"digits": pack_digits, "folder": pack_image_folder, "tokenize": tokenize}
    try:
        index = ToolCLI(tools, args=list(argv), prog=prog,
                        description="Pack images into train/val webdataset shards with a JSON index; tokenize "
                                    "packed images once with a frozen tokenizer (a token cache for the generator).",
                        as_positional=False, exit_on_error=False)  # --src/--out, as the README writes them
    except ArgumentError as e:
        # jsonargparse names options by their key ("folder.out"); the user typed --out.
        message = re.sub(r"\b(?:digits|folder|tokenize)\.(\w+)", r"--\1", " ".join(str(e).split()))
        message = re.sub(r'Parser key "(\w+)": Expected a <class \'(\w+)\'>\. Got value:', r"--\1: expected \2, got",
                         message)
        sub = next((a for a in argv if a in tools), None)
        print(f"{prog}: error: {message}\n(`{prog}{' ' + sub if sub else ''} --help` lists the options)",
              file=sys.stderr)
        raise SystemExit(2) from None
    except PackError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if isinstance(index, ShardIndex):
        print(index.summary())


# name -> (help line, "module:function" taking argv); imported only when used, so `srdd fit` stays lean.
TOOLS: dict[str, tuple[str, str]] = {
    "data": ("pack the built-in digits or an image folder into shards; tokenize them (a token cache)",
             "srdd_lightning.cli:_data_tool"),
    "sample": ("sample a trained generator into PNGs, grid.png and samples.npz (also editing)",
               "srdd_lightning.sampling.sample_cli:main"),
    "evaluate": ("score samples (folder or npz): FID, IS, precision/recall, class accuracy",
                 "srdd_lightning.evaluation:evaluate_tool"),
    "classifier": ("train the digits classifier behind the digits FID", "srdd_lightning.evaluation:classifier_tool"),
}

LIGHTNING_SUBCOMMANDS = {"fit": "train a stage (model.class_path picks it) on packed shards",
                         "validate": "run one validation pass", "test": "run the test loop"}


def _print_overview() -> None:
    print("usage: srdd <command> [options]   (srdd <command> --help for each command's options)\n")
    print("training (LightningCLI: --config FILE, --print_config, --ckpt_path PATH|last):")
    print("\n".join(f"  {name:<10} {text}" for name, text in LIGHTNING_SUBCOMMANDS.items()))
    print("\ntools:")
    print("\n".join(f"  {name:<10} {text}" for name, (text, _) in TOOLS.items()))


# A user's mistake (a bad path, value or file) is reported in one line; tracebacks are for bugs (or --debug).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)


def main(args: Sequence[str] | None = None) -> None:
    """The ``srdd`` console script (``args``: in-process, for tests); ``--debug`` or SRDD_DEBUG=1 shows tracebacks."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("SRDD_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if args is None:  # the console script: LightningCLI reads sys.argv itself
        sys.argv[1:] = argv
    if not argv or argv[0] in ("-h", "--help"):
        _print_overview()
        return
    if argv[0] in TOOLS:
        module, func = TOOLS[argv[0]][1].split(":")
        getattr(importlib.import_module(module), func)(argv[1:] + (["--debug", "true"] if debug and argv[0] == "sample" else []))
        return
    if argv[0] == "predict":
        _fail("there is no srdd predict: images come from `srdd sample --ckpt RUN --out DIR` (srdd sample --help)", 2)
    if argv[0] not in LIGHTNING_SUBCOMMANDS:
        _fail(f"unknown command {argv[0]!r}; the commands are {', '.join([*LIGHTNING_SUBCOMMANDS, *TOOLS])} (srdd --help)", 2)
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # dataclass field docs become --help text
    try:
        if {"-h", "--help"} & set(argv) and "--config" in argv:
            _help_with_stage(argv)
        SRDDCLI(args=None if args is None else argv, parser_kwargs={"exit_on_error": False})
    except SIGTERMException:
        signum = INTERRUPT["signal"] or signal.SIGTERM
        _fail(f"stopped by {signal.Signals(signum).name} after step; last.ckpt holds that step: continue with "
              f"--ckpt_path last", 128 + int(signum), prefix=f"srdd {argv[0]}: ")  # fmt: skip
    except (NonFiniteError, *USER_ERRORS, ArgumentError) as e:
        if debug:
            raise
        diverged = isinstance(e, NonFiniteError)  # not the user's mistake (exit 1); its message is one line already
        _fail(str(e) if diverged else _one_line(e), 1 if diverged else 2, prefix=f"srdd {argv[0]}: error: ")


def _one_line(e: BaseException) -> str:
    """The innermost reason of a (jsonargparse-nested) error, on one line, with the option it concerns."""
    inner = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = (str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(inner)).strip()
    text = " ".join(ln.strip() for ln in text.splitlines()[:2]) or type(inner).__name__
    key = re.match(r'Parser key "([^"]+)"', str(e))
    return f"{key.group(1)}: {text}" if key and not text.startswith("Parser key") else text


def _fail(message: str, code: int, prefix: str = "srdd: error: ") -> None:
    print(f"{prefix}{message} (--debug shows the traceback)" if code == 2 and "--debug" not in message else
          f"{prefix}{message}", file=sys.stderr)  # fmt: skip
    raise SystemExit(code)


def _help_with_stage(argv: list[str]) -> None:
    """``srdd fit --config CFG --help``: LightningCLI's help, then the options of the stage CFG selects."""
    import yaml

    with contextlib.suppress(SystemExit):  # LightningCLI's help exits
        SRDDCLI(args=argv)
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    models = [(yaml.safe_load(Path(c).read_text()) or {}).get("model") for c in configs if Path(c).is_file()]
    class_path = next((m["class_path"] for m in reversed(models) if isinstance(m, dict) and m.get("class_path")), None)
    if class_path is not None:
        print(f"\nOptions of the stage this config trains (model.class_path: {class_path}):\n")
        SRDDCLI(args=[argv[0], "--model.help", class_path])
    raise SystemExit(0)


if __name__ == "__main__":
    main()
