"""Find and load trained stages by path: one reader for every stage's checkpoint file or run folder.

Every file is read by :func:`read_checkpoint` with ``torch.load(weights_only=True)``: a checkpoint that needs pickle
(which can run code) is refused with an error naming the file and the explicit opt-in (``allow_pickle=True``,
``--allow_pickle true``). ``state_dict`` holds the EMA weights when the run had an EMA (``callbacks.ema.EMA``),
``current_model_state`` the trained ones (:func:`stage_state`). Nothing is downloaded.
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


# ---- paths and reading

def resolve_checkpoint(path: str | os.PathLike, option: str | None = None) -> Path:
    """A checkpoint file -> itself; a run folder (``runs/<name>``, ``.../version_k``, ``.../version_k/checkpoints``)
    -> the ``last.ckpt`` of its newest ``version_*`` that has one; else a FileNotFoundError naming ``option``."""
    p = Path(path).expanduser()
    where = f" (set by {option})" if option else ""
    if p.is_file():
        return p
    if p.is_dir():
        versions = sorted(((int(m[1]), d) for d in p.iterdir() if d.is_dir() and (m := _VERSION.fullmatch(d.name))),
                          reverse=True)
        candidates = [p / "last.ckpt"] if p.name == "checkpoints" else []  # given .../version_k/checkpoints itself
        candidates += [p / "checkpoints" / "last.ckpt"] + [d / "checkpoints" / "last.ckpt" for _, d in versions]
        for last in candidates:
            if last.is_file():
                return last
        looked = [str(p / "checkpoints" / "last.ckpt"), str(p / "version_*" / "checkpoints" / "last.ckpt")]
        found = f"; it has {len(versions)} version folder(s) without a last.ckpt" if versions else ""
        raise FileNotFoundError(f"no checkpoint in the run folder {str(p)!r}{where}: looked for {looked}{found}")
    raise FileNotFoundError(f"checkpoint {str(p)!r}{where} does not exist: give a checkpoint file or a run folder "
                            f"(runs/<name> or runs/<name>/version_<k>, holding checkpoints/last.ckpt)")


def read_checkpoint(path: str | os.PathLike, option: str | None = None, allow_pickle: bool = False) -> tuple[Path, Any]:
    """Resolve ``path`` (file or run folder) and load it on the CPU with ``weights_only=True``; errors name the file.

    A file needing pickle loads only with ``allow_pickle=True``, which runs the file's code: for files you trust.
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
        raise CheckpointError(f"{file}{where} holds Python objects that only load with pickle, which can run code "
                              f"from the file; if you trust it, load it with {PICKLE_OPTION}=True (--{PICKLE_OPTION} "
                              f"true)") from None  # fmt: skip
    except (IndexError, KeyError) as e:  # the unpickler's own errors on damaged pickle data (a cut legacy file)
        raise CheckpointError(f"{file}{where} cannot be unpickled ({type(e).__name__}: {e}): it is truncated or "
                              f"damaged; copy or save it again") from None  # fmt: skip
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        msg = str(e)
        first = (msg.splitlines() or [type(e).__name__])[0]  # a cut legacy file gives a bare EOFError
        if (any(s in msg for s in ("failed finding central directory", "unexpected EOF", "corrupted", "truncated"))
                or isinstance(e, EOFError)):
            raise CheckpointError(f"{file}{where} is truncated or corrupt ({first}); use another checkpoint") from None
        raise CheckpointError(f"{file}{where} is not a PyTorch checkpoint ({first})") from None


def stage_state(ckpt: Mapping[str, Any], prefix: str = "", ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights of a stage checkpoint under ``prefix`` (stripped): the EMA ones (``state_dict``) when ``ema``
    and the run had an EMA, else the trained ones (``current_model_state`` if present, else ``state_dict``)."""
    sd = ckpt["state_dict"] if ema or CURRENT_KEY not in ckpt else ckpt[CURRENT_KEY]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def stage_class(ckpt: Mapping[str, Any]) -> str | None:
    """The class path a checkpoint's stage recorded (or LightningCLI's ``_class_path``), None if neither."""
    if not isinstance(ckpt, Mapping):
        return None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt.get("hyper_parameters"), Mapping) else {}
    return ckpt.get(STAGE_KEY) or hp.get("_class_path")


def load_stage(path: str | os.PathLike, expect: type | None = None, ema: bool = True, allow_pickle: bool = False,
               option: str = "--ckpt", **init_overrides):
    """Any stage of this package from its checkpoint or run folder, of the class it records (``expect`` checks it),
    frozen in eval mode; ``init_overrides`` replace constructor arguments. EMA weights unless ``ema=False``."""
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
    hparams = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    module = cls(**{**hparams, **init_overrides})
    module.load_state_dict(stage_state(ckpt, ema=ema), strict=True)
    if (check := getattr(module, "check_checkpoint", None)) is not None:
        check(ckpt)
    module.loaded_with_ema = ema and CURRENT_KEY in ckpt
    module.checkpoint_path = str(file)
    return module.eval().requires_grad_(False)


# ---- tokenizer

def is_tokenizer_module_checkpoint(ckpt: Any) -> bool:
    """A ``TokenizerModule`` checkpoint: its hyper_parameters hold the tokenizer's config, weights ``tokenizer.*``."""
    hp, sd = (ckpt.get("hyper_parameters"), ckpt.get("state_dict")) if isinstance(ckpt, Mapping) else (None, None)
    return (isinstance(hp, Mapping) and isinstance(hp.get("tokenizer"), Mapping) and isinstance(sd, Mapping)
            and any(k.startswith("tokenizer.") for k in sd))


def resolve_tokenizer_checkpoint(path: str | os.PathLike, option: str = TOKENIZER_OPTION) -> Path:
    """:func:`resolve_checkpoint` for a tokenizer, whose error also says how to obtain one."""
    try:
        return resolve_checkpoint(path, option)
    except FileNotFoundError as e:
        hint = ("Download vae_ch160v4096z32.pth from VAR's release (Hugging Face FoundationVision/var); nothing is "
                "downloaded automatically" if Path(path).name.startswith("vae_ch160v4096z32") else
                "Train the tokenizer stage first (its run folder holds checkpoints/last.ckpt), or point the option at "
                "an existing one")  # fmt: skip
        raise FileNotFoundError(f"tokenizer checkpoint not found: {e}. {hint}") from None


def load_tokenizer(path: str | os.PathLike, ema: bool = True, option: str = TOKENIZER_OPTION,
                   allow_pickle: bool = False) -> tuple[MultiScaleTokenizer, dict[str, Any]]:
    """A frozen tokenizer from a TokenizerModule checkpoint / run folder or VAR's VQVAE file, and ``info``: where it
    came from (``path``, ``kind``: tokenizer_module or var_vae), its ``config``, ``ema``, sizes and ``fingerprint``."""
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
        info.update(kind="tokenizer_module", config=config, ema=ema and CURRENT_KEY in ckpt,
                    global_step=ckpt.get("global_step"))
    elif (isinstance(ckpt, Mapping) and "quantize.embedding.weight" in ckpt
          and any(k.startswith("decoder.") for k in ckpt)):  # VAR's VQVAE state dict
        from srdd_lightning.models import var_import

        tokenizer = var_import.load_var_vae(ckpt, option=option)
        info.update(kind="var_vae", config={"preset": "var-vae-f16"}, ema=False)
    else:
        what = stage_class(ckpt)
        held = f"a {what.rsplit('.', 1)[-1]} checkpoint" if what else (
            f"keys {list(ckpt)[:6]}" if isinstance(ckpt, Mapping) else type(ckpt).__name__)
        raise CheckpointError(f"{file} (given as {option}={os.fspath(path)!r}) is neither a TokenizerModule checkpoint "
                              f"nor VAR's vae_ch160v4096z32.pth state dict; it holds {held}")
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


# ---- generator

def load_generator(path: str | os.PathLike, ema: bool = True, tokenizer_ckpt: str | os.PathLike | None = None,
                   map_location: str | torch.device = "cpu", allow_pickle: bool = False):
    """An ``SRDDModule`` (or a subclass) from a checkpoint or run folder, frozen in eval mode, with the tokenizer
    recorded at training time (``tokenizer_ckpt`` overrides it, e.g. after a move; its fingerprint must match)."""
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
    tried = [c for c in (hp["tokenizer_ckpt"], recorded.get("path"), recorded.get("abspath")) if c]
    for present in (Path.is_file, Path.is_dir):  # a file first, then a run folder still present
        if found := next((c for c in tried if present(Path(c).expanduser())), None):
            return str(found)
    raise FileNotFoundError(f"the tokenizer of {ckpt_file} was not found (tried {tried}); pass its path with "
                            f"tokenizer_ckpt= (srdd sample --tokenizer_ckpt PATH)")

