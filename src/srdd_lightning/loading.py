"""Find and load trained stages by path: one reader for every stage's checkpoint file or run folder.

    resolve_checkpoint("runs/digits/tokenizer")   # -> runs/digits/tokenizer/version_<newest>/checkpoints/last.ckpt
    tokenizer, info = load_tokenizer("runs/digits/tokenizer")          # frozen, EMA weights when present
    module = load_generator("runs/digits/srdd")                        # SRDDModule, EMA weights, eval mode
    module = load_stage("runs/digits/policy")                          # any stage, by the class it records

Every file is read by :func:`read_checkpoint` with ``torch.load(weights_only=True)``: a checkpoint that
needs pickle (which can run code) is refused with an error naming the file and the explicit opt-in
(``allow_pickle=True``, ``--allow_pickle true``). Weights follow one format (:func:`stage_state`, written by
``callbacks.ema.EMA``): ``state_dict`` holds the EMA weights when the run had an EMA, ``current_model_state``
the trained ones. Stages record their class under ``srdd_stage``. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srdd_lightning.models.tokenizer import MultiScaleTokenizer, TokenizerConfig

TOKENIZER_OPTION = "model.init_args.tokenizer_ckpt"
STAGE_KEY = "srdd_stage"  # the class path of the LightningModule that wrote a checkpoint
CKPT_TOKENIZER_KEY = "srdd_tokenizer"  # where a generator checkpoint records its tokenizer (path, fingerprint)
CURRENT_KEY = "current_model_state"  # the trained weights when state_dict holds the EMA (Lightning's format)
PICKLE_OPTION = "allow_pickle"
_VERSION = re.compile(r"version_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (unreadable, truncated, another stage): the message says why."""


# --------------------------------------------------------------------------------------------
# Paths and reading
# --------------------------------------------------------------------------------------------


def _last_ckpt(version_dir: Path) -> Path | None:
    p = version_dir / "checkpoints" / "last.ckpt"
    return p if p.is_file() else None


def resolve_checkpoint(path: str | os.PathLike, option: str | None = None) -> Path:
    """A checkpoint file -> itself; a run folder -> the ``last.ckpt`` of its newest ``version_*`` that has one.

    Accepts ``runs/<name>`` (newest version), ``runs/<name>/version_k`` and ``.../version_k/checkpoints``.
    Raises FileNotFoundError naming the path, what was looked for and (if given) the ``option`` to set.
    """
    p = Path(path).expanduser()
    where = f" (set by {option})" if option else ""
    if p.is_file():
        return p
    if p.is_dir():
        if p.name == "checkpoints" and (p / "last.ckpt").is_file():
            return p / "last.ckpt"
        if (last := _last_ckpt(p)) is not None:
            return last
        versions = sorted(
            ((int(m.group(1)), d) for d in p.iterdir() if d.is_dir() and (m := _VERSION.fullmatch(d.name))), reverse=True
        )
        for _, d in versions:
            if (last := _last_ckpt(d)) is not None:
                return last
        looked = [str(p / "checkpoints" / "last.ckpt"), str(p / "version_*" / "checkpoints" / "last.ckpt")]
        found = f"; it has {len(versions)} version folder(s) without a last.ckpt" if versions else ""
        raise FileNotFoundError(f"no checkpoint in the run folder {str(p)!r}{where}: looked for {looked}{found}")
    raise FileNotFoundError(
        f"checkpoint {str(p)!r}{where} does not exist: give a checkpoint file or a run folder "
        f"(runs/<name> or runs/<name>/version_<k>, holding checkpoints/last.ckpt)"
    )


def read_checkpoint(
    path: str | os.PathLike, option: str | None = None, allow_pickle: bool = False
) -> tuple[Path, Any]:
    """Resolve ``path`` (file or run folder) and load it on the CPU with ``weights_only=True``.

    Errors name the file (and ``option``): missing, truncated, not a checkpoint at all, or needing pickle —
    the last only loads with ``allow_pickle=True``, which runs the file's code: use it for files you trust.
    """
    file = resolve_checkpoint(path, option)
    where = f" ({option})" if option else ""
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file}{where} is empty (0 bytes): an interrupted copy or save; use another checkpoint")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (or, legacy, a pickle)
        raise CheckpointError(f"{file}{where} is not a PyTorch checkpoint (it starts with {magic!r}); give a .ckpt/.pth file")
    try:
        return file, torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if allow_pickle or "GLOBAL" not in str(e).upper():
            raise CheckpointError(f"{file}{where} is not a readable checkpoint: {str(e).splitlines()[0]}") from None
        raise CheckpointError(
            f"{file}{where} holds Python objects that only load with pickle, which can run code from the file; "
            f"if you trust it, load it with {PICKLE_OPTION}=True (--{PICKLE_OPTION} true)"
        ) from None
    except (IndexError, KeyError) as e:  # the unpickler's own errors on damaged pickle data (a cut legacy file)
        raise CheckpointError(f"{file}{where} cannot be unpickled ({type(e).__name__}: {e}): it is truncated or "
                              f"damaged; copy or save it again") from None  # fmt: skip
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        msg = str(e)
        first = (msg.splitlines() or [type(e).__name__])[0]  # a cut legacy file gives a bare EOFError
        if any(s in msg for s in ("failed finding central directory", "unexpected EOF", "corrupted", "truncated")) \
                or isinstance(e, EOFError):
            raise CheckpointError(f"{file}{where} is truncated or corrupt ({first}); use another checkpoint") from None
        raise CheckpointError(f"{file}{where} is not a PyTorch checkpoint ({first})") from None


def stage_state(ckpt: Mapping[str, Any], prefix: str = "", ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights of a stage checkpoint under ``prefix`` (stripped): the EMA ones (``state_dict``) when ``ema``
    and the run had an EMA, else the trained ones (``current_model_state`` if present, else ``state_dict``)."""
    sd = ckpt["state_dict"] if ema or CURRENT_KEY not in ckpt else ckpt[CURRENT_KEY]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def has_ema(ckpt: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` holds EMA weights (the run had ``callbacks.ema.EMA``)."""
    return CURRENT_KEY in ckpt


def stage_class(ckpt: Mapping[str, Any]) -> str | None:
    """The class path a checkpoint's stage recorded (or LightningCLI's ``_class_path``), None if neither."""
    if not isinstance(ckpt, Mapping):
        return None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), Mapping) else {}
    return ckpt.get(STAGE_KEY) or hp.get("_class_path")


def _stage_hparams(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    hp = dict(ckpt.get("hyper_parameters") or {})
    return {k: v for k, v in hp.items() if not k.startswith("_")}


def load_stage(
    path: str | os.PathLike, expect: type | None = None, ema: bool = True, allow_pickle: bool = False,
    option: str = "--ckpt", **init_overrides,
):
    """Any stage (a LightningModule of this package) from its checkpoint or run folder, in eval mode, no gradients.

    The class is the one the checkpoint records; ``expect`` checks it (an error names both). ``init_overrides``
    replace constructor arguments (e.g. ``tokenizer_ckpt`` after moving files). EMA weights unless ``ema=False``.
    """
    file, ckpt = read_checkpoint(path, option, allow_pickle)
    return _build_stage(file, ckpt, expect, ema, option, init_overrides)


def _build_stage(file: Path, ckpt: Any, expect: type | None, ema: bool, option: str, init_overrides: dict):
    cls_path = stage_class(ckpt)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt or cls_path is None:
        raise CheckpointError(f"{file} ({option}) is not a checkpoint of an srdd stage (no state_dict / stage class)")
    module_name, _, name = cls_path.rpartition(".")
    if not module_name.startswith("srdd_lightning."):  # never import arbitrary modules named by a file
        raise CheckpointError(f"{file} ({option}) was written by {cls_path}, not by an srdd_lightning stage")
    cls = getattr(importlib.import_module(module_name), name)
    if expect is not None and not issubclass(cls, expect):
        raise CheckpointError(f"{file} ({option}) is a {name} checkpoint, but a {expect.__name__} checkpoint is needed")
    module = cls(**{**_stage_hparams(ckpt), **init_overrides})
    module.load_state_dict(stage_state(ckpt, ema=ema), strict=True)
    check = getattr(module, "check_checkpoint", None)
    if check is not None:
        check(ckpt)
    module.loaded_with_ema = ema and has_ema(ckpt)
    module.checkpoint_path = str(file)
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def is_tokenizer_module_checkpoint(ckpt: Any) -> bool:
    """A ``TokenizerModule`` checkpoint: its hyper_parameters hold the tokenizer's config, weights ``tokenizer.*``."""
    return (
        isinstance(ckpt, Mapping)
        and isinstance(ckpt.get("hyper_parameters"), Mapping)
        and isinstance(ckpt["hyper_parameters"].get("tokenizer"), Mapping)
        and isinstance(ckpt.get("state_dict"), Mapping)
        and any(k.startswith("tokenizer.") for k in ckpt["state_dict"])
    )


def _is_var_vae_state_dict(sd: Any) -> bool:
    return isinstance(sd, Mapping) and "quantize.embedding.weight" in sd and any(k.startswith("decoder.") for k in sd)


def resolve_tokenizer_checkpoint(path: str | os.PathLike, option: str = TOKENIZER_OPTION) -> Path:
    """:func:`resolve_checkpoint` for a tokenizer, whose error also says how to obtain one."""
    try:
        return resolve_checkpoint(path, option)
    except FileNotFoundError as e:
        if Path(path).name.startswith("vae_ch160v4096z32"):
            hint = ("Download vae_ch160v4096z32.pth from VAR's release (Hugging Face FoundationVision/var); "
                    "nothing is downloaded automatically")
        else:
            hint = ("Train the tokenizer stage first (its run folder holds checkpoints/last.ckpt), "
                    "or point the option at an existing one")
        raise FileNotFoundError(f"tokenizer checkpoint not found: {e}. {hint}") from None


def load_tokenizer(
    path: str | os.PathLike, ema: bool = True, option: str = TOKENIZER_OPTION, allow_pickle: bool = False
) -> tuple[MultiScaleTokenizer, dict[str, Any]]:
    """A frozen tokenizer (eval mode, no gradients) from a TokenizerModule checkpoint / run folder or VAR's VQVAE file.

    ``info`` records where it came from: ``path`` (the resolved file), ``kind`` (``tokenizer_module`` or
    ``var_vae``), ``config`` (the TokenizerConfig fields), ``ema`` (EMA weights used), sizes, and ``fingerprint``.
    """
    resolve_tokenizer_checkpoint(path, option)
    file, ckpt = read_checkpoint(path, option, allow_pickle)
    info: dict[str, Any] = {"path": str(file), "given": os.fspath(path)}
    if is_tokenizer_module_checkpoint(ckpt):
        config = dict(ckpt["hyper_parameters"]["tokenizer"])
        try:
            tokenizer = MultiScaleTokenizer(TokenizerConfig(**config))
            tokenizer.load_state_dict(stage_state(ckpt, "tokenizer.", ema), strict=True)
        except (TypeError, RuntimeError) as e:
            raise CheckpointError(f"{file} ({option}): its tokenizer weights do not fit its recorded config {config}: {e}") from e
        info.update(kind="tokenizer_module", config=config, ema=ema and has_ema(ckpt), global_step=ckpt.get("global_step"))
    elif _is_var_vae_state_dict(ckpt):
        from srdd_lightning.models import var_import

        tokenizer = var_import.load_var_vae(ckpt, option=option)
        info.update(kind="var_vae", config={"preset": "var-vae-f16"}, ema=False)
    else:
        what = stage_class(ckpt)
        held = f"a {what.rsplit('.', 1)[-1]} checkpoint" if what else (
            f"keys {list(ckpt)[:6]}" if isinstance(ckpt, Mapping) else type(ckpt).__name__)
        raise CheckpointError(
            f"{file} (given as {option}={os.fspath(path)!r}) is neither a TokenizerModule checkpoint nor VAR's "
            f"vae_ch160v4096z32.pth state dict; it holds {held}"
        )
    tokenizer.eval().requires_grad_(False)
    info.update(vocab_size=tokenizer.vocab_size, latent_dim=tokenizer.latent_dim, patch_nums=list(tokenizer.patch_nums),
                image_size=tokenizer.image_size, fingerprint=fingerprint(tokenizer))  # fmt: skip
    return tokenizer, info


@torch.no_grad()
def fingerprint(module: nn.Module) -> str:
    """Short hash of a module's weights, to tell whether a generator is paired with the tokenizer it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def load_generator(
    path: str | os.PathLike,
    ema: bool = True,
    tokenizer_ckpt: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
    allow_pickle: bool = False,
):
    """An ``SRDDModule`` (or a subclass) from a checkpoint or run folder, in eval mode without gradients.

    ``ema=True`` loads the EMA weights. The tokenizer is reloaded from the file recorded at training time
    (``tokenizer_ckpt`` overrides it, e.g. after moving the project folder); its fingerprint must match.
    Use ``module.generator``, ``module.tokenizer`` and ``module.hparams``.
    """
    file, ckpt = read_checkpoint(path, "--ckpt", allow_pickle)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping) or "tokenizer_ckpt" not in hp:
        what = stage_class(ckpt)
        held = f"a {what.rsplit('.', 1)[-1]} checkpoint" if what else "no generator hyper_parameters"
        raise CheckpointError(f"{file} (--ckpt) is not a generator (SRDDModule) checkpoint: it is {held}")
    if tokenizer_ckpt is None:
        tokenizer_ckpt = _recorded_tokenizer(hp, ckpt.get(CKPT_TOKENIZER_KEY) or {}, file)
    from srdd_lightning.stages.generator import SRDDModule  # the stage is the caller's import, not loading's

    module = _build_stage(file, ckpt, SRDDModule, ema, "--ckpt", {"tokenizer_ckpt": os.fspath(tokenizer_ckpt)})
    return module.to(map_location)


def _recorded_tokenizer(hp: Mapping, recorded: Mapping, ckpt_file: Path) -> str:
    """The tokenizer file a generator was trained with: as given (if it exists), else its recorded absolute path."""
    candidates = [hp["tokenizer_ckpt"], recorded.get("path"), recorded.get("abspath")]
    for c in candidates:
        if c and Path(c).expanduser().is_file():
            return str(c)
    for c in candidates:  # a run folder still present
        if c and Path(c).expanduser().is_dir():
            return str(c)
    tried = [c for c in candidates if c]
    raise FileNotFoundError(
        f"the tokenizer of {ckpt_file} was not found (tried {tried}); pass its path with tokenizer_ckpt= "
        f"(srdd sample --tokenizer_ckpt PATH)"
    )


__all__ = [
    "CKPT_TOKENIZER_KEY",
    "CURRENT_KEY",
    "CheckpointError",
    "STAGE_KEY",
    "TOKENIZER_OPTION",
    "fingerprint",
    "has_ema",
    "is_tokenizer_module_checkpoint",
    "load_generator",
    "load_stage",
    "load_tokenizer",
    "read_checkpoint",
    "resolve_checkpoint",
    "stage_class",
    "stage_state",
]
