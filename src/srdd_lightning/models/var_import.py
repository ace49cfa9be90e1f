"""Load VAR's released VQVAE ``vae_ch160v4096z32.pth`` into a ``MultiScaleTokenizer`` (preset ``var-vae-f16``).

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

# VAR's usage statistics (EMA of per-scale code hits); not a weight, its first dim depends on the schedule.
VAR_VAE_IGNORED_KEYS = frozenset({"quantize.ema_vocab_hit_SV"})

# The VAR VQVAE weights with the same path in our modules up to the renamed components of _RENAMES.
_RES, _ATTN = r"(?:norm1|conv1|norm2|conv2|nin_shortcut)", r"(?:norm|qkv|proj_out)"
_VAE_KEY = re.compile(
    r"(?:(?:post_)?quant_conv|(?:encoder|decoder)\.(?:conv_in|norm_out|conv_out)"
    rf"|(?:encoder|decoder)\.mid\.(?:block_[12]\.{_RES}|attn_1\.{_ATTN})"
    rf"|(?:encoder\.down|decoder\.up)\.\d+\.(?:block\.\d+\.{_RES}|attn\.\d+\.{_ATTN})"
    r"|encoder\.down\.\d+\.downsample\.conv|decoder\.up\.\d+\.upsample\.conv)\.(?:weight|bias)"
)
_RENAMES = {"nin_shortcut": "shortcut", "proj_out": "proj", "block_1": "res1", "attn_1": "attn", "block_2": "res2",
            "block": "blocks", "attn": "attns", "downsample": "resample", "upsample": "resample"}


def var_vae_key_to_ours(key: str, num_levels: int = 5) -> str | None:
    """Our state-dict key for one VAR VQVAE key, or None when the key is not a known VAR weight.

    VAR's decoder stores its levels as ``up.i`` indexed by resolution (``up.0`` = full resolution) and runs
    them in reverse; ours stores them in processing order, so ``up.i`` -> ``levels.{num_levels-1-i}``.
    """
    if key == "quantize.embedding.weight":
        return "quantizer.codebook.weight"
    # partially shared (qresi_ls.k), shared (qresi), non-shared (k). VAR's Phi subclasses Conv2d, so its keys
    # have no ".conv." level; re-saved copies that wrapped the conv are accepted too.
    m = re.fullmatch(r"quantize\.quant_resi\.(?:qresi_ls\.(\d+)|qresi|(\d+))\.(?:conv\.)?(weight|bias)", key)
    if m:
        return f"quantizer.phis.{m[1] or m[2] or '0'}.conv.{m[3]}"
    if not _VAE_KEY.fullmatch(key):
        return None
    parts = [_RENAMES.get(p, p) for p in key.split(".")]
    if parts[1] in ("down", "up"):
        level = int(parts[2]) if parts[0] == "encoder" else num_levels - 1 - int(parts[2])
        if not 0 <= level < num_levels:
            return None
        parts[1:3] = ["levels", str(level)]
    return ".".join(parts)


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
        raise ValueError("VAR tokenizer state dict does not match the var-vae-f16 preset: "
                         f"{len(missing)} missing {missing[:8]}, {len(unexpected)} unexpected {unexpected[:8]}, "
                         f"{len(misshapen)} with wrong shapes {misshapen[:8]}")
    return out


def load_var_vae(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor], *, image_size: int = 256,
    patch_nums: Sequence[int] | None = None, option: str = "var_vae_path", **overrides,
) -> MultiScaleTokenizer:
    """Build ``var-vae-f16`` and load VAR's ``vae_ch160v4096z32.pth`` into it (eval mode), at any ``image_size``
    with a matching ``patch_nums``. ``overrides``: quantizer options that do not touch the weights (lookup, beta…);
    ``option`` names the setting in error messages."""
    if isinstance(path_or_state_dict, Mapping):
        var_sd = path_or_state_dict
    else:
        path = Path(path_or_state_dict).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"VAR tokenizer checkpoint not found: {str(path)!r}. Download vae_ch160v4096z32.pth"
                                    f" from VAR's release (Hugging Face FoundationVision/var) and set `{option}` to its"
                                    " path; nothing is downloaded automatically.")
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

