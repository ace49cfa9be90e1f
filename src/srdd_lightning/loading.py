"""Find and load trained stages by path: a checkpoint file or a run folder (``runs/<name>[/version_k]``).

    resolve_checkpoint("runs/digits/tokenizer")   # -> runs/digits/tokenizer/version_<newest>/checkpoints/last.ckpt
    tokenizer, info = load_tokenizer("runs/digits/tokenizer")          # frozen, EMA weights when present
    module = load_generator("runs/digits/srdd")                        # SRDDModule, EMA weights, eval mode

The tokenizer is either a ``TokenizerModule`` checkpoint (``hyper_parameters.preset`` / ``overrides``,
weights under ``state_dict["tokenizer.*"]``, EMA shadows under ``state_dict["ema.shadow__*"]``) or VAR's
released ``vae_ch160v4096z32.pth``. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srdd_lightning.models.tokenizer import MultiScaleTokenizer, build_tokenizer

TOKENIZER_OPTION = "model.init_args.tokenizer_ckpt"
_VERSION = re.compile(r"version_(\d+)")


# --------------------------------------------------------------------------------------------
# Paths
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


def _torch_load(path: Path) -> Any:
    """Plain tensors load with ``weights_only=True``; our Lightning checkpoints may pickle richer hyperparameters."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def is_tokenizer_module_checkpoint(ckpt: Any) -> bool:
    """A ``TokenizerModule`` checkpoint: hyper_parameters with a ``preset`` and ``tokenizer.*`` weights."""
    return (
        isinstance(ckpt, Mapping)
        and isinstance(ckpt.get("hyper_parameters"), Mapping)
        and "preset" in ckpt["hyper_parameters"]
        and isinstance(ckpt.get("state_dict"), Mapping)
        and any(k.startswith("tokenizer.") for k in ckpt["state_dict"])
    )


def _is_var_vae_state_dict(sd: Any) -> bool:
    return isinstance(sd, Mapping) and "quantize.embedding.weight" in sd and any(k.startswith("decoder.") for k in sd)


def _ema_key(name: str) -> str:
    return "ema.shadow__" + name.replace(".", "__")


def tokenizer_state_from_module_checkpoint(
    state_dict: Mapping[str, torch.Tensor], tokenizer: nn.Module, ema: bool = True
) -> tuple[dict[str, torch.Tensor], int]:
    """The tokenizer's weights from a TokenizerModule state dict, EMA shadows replacing the raw parameters
    where present (shadows named after the tokenizer's own parameter names, or with a ``tokenizer.`` prefix).
    Returns the state dict and how many parameters came from the EMA."""
    state = {k[len("tokenizer.") :]: v for k, v in state_dict.items() if k.startswith("tokenizer.")}
    used = 0
    if ema:
        for name, _ in tokenizer.named_parameters():
            for key in (_ema_key(name), _ema_key("tokenizer." + name)):
                if key in state_dict:
                    state[name] = state_dict[key]
                    used += 1
                    break
    return state, used


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
    path: str | os.PathLike, ema: bool = True, option: str = TOKENIZER_OPTION
) -> tuple[MultiScaleTokenizer, dict[str, Any]]:
    """A frozen tokenizer (eval mode, no gradients) from a TokenizerModule checkpoint / run folder or VAR's VQVAE file.

    ``info`` records where it came from: ``path`` (the resolved file), ``kind`` (``tokenizer_module`` or
    ``var_vae``), ``preset``/``overrides``, ``ema`` (EMA weights used), sizes, and ``fingerprint``.
    """
    file = resolve_tokenizer_checkpoint(path, option)
    ckpt = _torch_load(file)
    info: dict[str, Any] = {"path": str(file), "given": os.fspath(path)}
    if is_tokenizer_module_checkpoint(ckpt):
        hp = ckpt["hyper_parameters"]
        overrides = dict(hp.get("overrides") or {})
        tokenizer = build_tokenizer(hp["preset"], **overrides)
        state, used = tokenizer_state_from_module_checkpoint(ckpt["state_dict"], tokenizer, ema)
        try:
            tokenizer.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"{file}: the tokenizer weights do not fit preset {hp['preset']!r} with overrides {overrides}: {e}"
            ) from e
        n_params = sum(1 for _ in tokenizer.parameters())
        info.update(kind="tokenizer_module", preset=hp["preset"], overrides=overrides, ema=used == n_params and used > 0,
                    ema_params=used, global_step=ckpt.get("global_step"))  # fmt: skip
    elif _is_var_vae_state_dict(ckpt):
        from srdd_lightning.models import var_import

        tokenizer = var_import.load_var_vae(ckpt, option=option)
        info.update(kind="var_vae", preset="var-vae-f16", overrides={}, ema=False, ema_params=0)
    else:
        keys = list(ckpt)[:6] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(
            f"{file} (given as {option}={os.fspath(path)!r}) is neither a TokenizerModule checkpoint "
            f"(hyper_parameters.preset + state_dict 'tokenizer.*') nor VAR's vae_ch160v4096z32.pth state dict; "
            f"it holds {keys}"
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
):
    """An ``SRDDModule`` from a checkpoint or run folder, in eval mode without gradients, for sampling and evaluation.

    ``ema=True`` copies the EMA weights into ``module.generator``. The tokenizer is reloaded from the file
    recorded at training time (``tokenizer_ckpt`` overrides it, e.g. after moving the project folder).
    Use ``module.generator``, ``module.tokenizer`` and ``module.hparams``.
    """
    from srdd_lightning.stages.generator import CKPT_TOKENIZER_KEY, SRDDModule

    file = resolve_checkpoint(path, "--ckpt")
    ckpt = _torch_load(file)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping) or "tokenizer_ckpt" not in hp or "generator" not in hp:
        raise ValueError(f"{file} is not an SRDDModule checkpoint (its hyper_parameters lack tokenizer_ckpt/generator)")
    if tokenizer_ckpt is None:
        tokenizer_ckpt = _recorded_tokenizer(hp, ckpt.get(CKPT_TOKENIZER_KEY) or {}, file)
    module = SRDDModule.load_from_checkpoint(file, map_location=map_location, tokenizer_ckpt=os.fspath(tokenizer_ckpt))
    if ema:
        module.ema.copy_to(module.generator)
    module.loaded_with_ema = ema
    module.checkpoint_path = str(file)
    return module.eval().requires_grad_(False)


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
    "TOKENIZER_OPTION",
    "fingerprint",
    "is_tokenizer_module_checkpoint",
    "load_generator",
    "load_tokenizer",
    "resolve_checkpoint",
    "tokenizer_state_from_module_checkpoint",
]
