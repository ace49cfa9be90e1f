"""Load VAR's released checkpoints (FoundationVision/VAR) into this framework's modules.

Nothing is downloaded: the user gives the path of the file fetched from VAR's release (the Hugging Face
repo ``FoundationVision/var``). Key names are mapped explicitly, every key accounted for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from srdd_lightning.models.scales import VAR_PATCH_NUMS_256
from srdd_lightning.models.tokenizer import MultiScaleTokenizer, build_tokenizer

# =============================================================================================
# Tokenizer: vae_ch160v4096z32.pth -> MultiScaleTokenizer (preset var-vae-f16)
# =============================================================================================

# VAR's usage statistics (EMA of per-scale code hits); not a weight, its first dim depends on the schedule.
VAR_VAE_IGNORED_KEYS = frozenset({"quantize.ema_vocab_hit_SV"})

_RES_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "shortcut"}
_ATTN_PARTS = {"norm": "norm", "qkv": "qkv", "proj_out": "proj"}
_MID_PARTS = {"block_1": "res1", "attn_1": "attn", "block_2": "res2"}


def _map_block(rest: str) -> str | None:
    """``block.j.<part>.<p>`` / ``attn.j.<part>.<p>`` (VAR) -> ``blocks.j.…`` / ``attns.j.…`` (ours)."""
    m = re.fullmatch(r"block\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m and m[2] in _RES_PARTS:
        return f"blocks.{m[1]}.{_RES_PARTS[m[2]]}.{m[3]}"
    m = re.fullmatch(r"attn\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m and m[2] in _ATTN_PARTS:
        return f"attns.{m[1]}.{_ATTN_PARTS[m[2]]}.{m[3]}"
    return None


def var_vae_key_to_ours(key: str, num_levels: int = 5) -> str | None:
    """Our state-dict key for one VAR VQVAE key, or None when the key is not a known VAR weight.

    VAR's decoder stores its levels as ``up.i`` indexed by resolution (``up.0`` = full resolution) and runs
    them in reverse; ours stores them in processing order, so ``up.i`` -> ``levels.{num_levels-1-i}``.
    """
    for top in ("quant_conv", "post_quant_conv"):
        if re.fullmatch(rf"{top}\.(weight|bias)", key):
            return key
    if key == "quantize.embedding.weight":
        return "quantizer.codebook.weight"
    # partially shared (qresi_ls.k), shared (qresi), non-shared (k). VAR's Phi subclasses Conv2d, so its keys
    # have no ".conv." level; re-saved copies that wrapped the conv are accepted too.
    m = re.fullmatch(r"quantize\.quant_resi\.(?:qresi_ls\.(\d+)|qresi|(\d+))\.(?:conv\.)?(weight|bias)", key)
    if m:
        k = m[1] if m[1] is not None else (m[2] if m[2] is not None else "0")
        return f"quantizer.phis.{k}.conv.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    side, rest = m[1], m[2]
    if re.fullmatch(r"(conv_in|norm_out|conv_out)\.(weight|bias)", rest):
        return key
    m = re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(.+)", rest)
    if m:
        sub = m[2]
        if m[1] == "attn_1":
            mm = re.fullmatch(r"(\w+)\.(weight|bias)", sub)
            return f"{side}.mid.attn.{_ATTN_PARTS[mm[1]]}.{mm[2]}" if mm and mm[1] in _ATTN_PARTS else None
        mm = re.fullmatch(r"(\w+)\.(weight|bias)", sub)
        return f"{side}.mid.{_MID_PARTS[m[1]]}.{_RES_PARTS[mm[1]]}.{mm[2]}" if mm and mm[1] in _RES_PARTS else None
    m = re.fullmatch(r"(down|up)\.(\d+)\.(.+)", rest)
    if not m or (m[1] == "down") != (side == "encoder"):
        return None
    level = int(m[2]) if side == "encoder" else num_levels - 1 - int(m[2])
    if not 0 <= level < num_levels:
        return None
    mm = re.fullmatch(r"(?:downsample|upsample)\.conv\.(weight|bias)", m[3])
    if mm:
        if (side == "encoder") != m[3].startswith("downsample"):
            return None
        return f"{side}.levels.{level}.resample.conv.{mm[1]}"
    inner = _map_block(m[3])
    return f"{side}.levels.{level}.{inner}" if inner else None


def convert_var_vae_state_dict(var_sd: Mapping[str, torch.Tensor], model: MultiScaleTokenizer) -> dict[str, torch.Tensor]:
    """Rename a VAR VQVAE state dict to ``model``'s keys; raises listing every missing/unexpected/misshapen key."""
    ours = model.state_dict()
    n_levels = len(model.config.channel_mults)
    out: dict[str, torch.Tensor] = {}
    unexpected, misshapen = [], []
    for k, v in var_sd.items():
        if k in VAR_VAE_IGNORED_KEYS:
            continue
        new = var_vae_key_to_ours(k, n_levels)
        if new is None or new not in ours:
            unexpected.append(k)
        elif tuple(v.shape) != tuple(ours[new].shape):
            misshapen.append(f"{k} {tuple(v.shape)} -> {new} {tuple(ours[new].shape)}")
        else:
            out[new] = v
    missing = sorted(set(ours) - set(out))
    if unexpected or missing or misshapen:
        raise ValueError(
            "VAR tokenizer state dict does not match the var-vae-f16 preset: "
            f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}, "
            f"{len(misshapen)} with wrong shapes {misshapen[:8]}"
        )
    return out


def load_var_vae(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor],
    *,
    image_size: int = 256,
    patch_nums: Sequence[int] | None = None,
    option: str = "var_vae_path",
    **overrides,
) -> MultiScaleTokenizer:
    """Build ``var-vae-f16`` and load VAR's ``vae_ch160v4096z32.pth`` into it (eval mode).

    The same weights serve other resolutions: pass ``image_size`` and a matching ``patch_nums`` (e.g. 512
    with VAR's (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)). ``overrides`` may change quantizer options that do not
    touch the weights (lookup, beta, scale_dropout…). ``option`` names the setting in error messages.
    """
    if isinstance(path_or_state_dict, Mapping):
        var_sd = path_or_state_dict
    else:
        path = Path(path_or_state_dict).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"VAR tokenizer checkpoint not found: {str(path)!r}. Download vae_ch160v4096z32.pth from VAR's release "
                f"(Hugging Face FoundationVision/var) and set `{option}` to its path; nothing is downloaded automatically."
            )
        var_sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(var_sd, Mapping):
            raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(var_sd).__name__})")
    if patch_nums is None:
        if image_size != 256:
            raise ValueError(f"image_size={image_size} needs a patch_nums ending at {image_size // 16} (the latent size)")
        patch_nums = VAR_PATCH_NUMS_256
    model = build_tokenizer("var-vae-f16", image_size=image_size, patch_nums=tuple(patch_nums), **overrides)
    model.load_state_dict(convert_var_vae_state_dict(var_sd, model), strict=True)
    return model.eval()

