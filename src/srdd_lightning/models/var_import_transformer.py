"""Load VAR's released transformer weights (``var_d16.pth`` ... ``var_d30.pth``) into :class:`VARTransformer`.

Names map one to one; the temperature ``scale_mul_1H11`` (1, H, 1, 1) becomes ``log_temp`` (H,); VAR's buffers are
recomputed by our model. They compute VAR's function with ``attn="causal"`` (the default for a preset name) and
start an SRDD fine-tune (the blocks do not depend on the mask; :func:`take_scales` maps the per-scale embeddings).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch

from srdd_lightning.models.scales import as_schedule, num_tokens, scale_slices, subset_indices
from srdd_lightning.models.transformer import GeneratorConfig, VARTransformer, generator_config

# VAR name -> our name; blocks keep their index.
_BLOCK_RENAMES = {
    "attn.mat_qkv.weight": "attn.qkv.weight", "attn.scale_mul_1H11": "attn.log_temp",
    "ada_lin.1.weight": "ada.weight", "ada_lin.1.bias": "ada.bias",
    **{f"attn.{n}": f"attn.{n}" for n in ("q_bias", "v_bias", "proj.weight", "proj.bias")},
    **{f"ffn.{n}": f"mlp.{n}" for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")},
}
_TOP_RENAMES = {
    "class_emb.weight": "class_embed.weight", "pos_1LC": "pos_embed", "lvl_embed.weight": "level_embed.weight",
    "head_nm.ada_lin.1.weight": "head.ada.weight", "head_nm.ada_lin.1.bias": "head.ada.bias",
    "head.weight": "head.out.weight", "head.bias": "head.out.bias",
    **{n: n for n in ("word_embed.weight", "word_embed.bias", "pos_start")},
}
# Buffers VAR stores that our model derives itself (level ids, dense block-causal mask, zero k bias).
_IGNORED_TOP = {"lvl_1L", "attn_bias_for_masking"}
_IGNORED_BLOCK = {"attn.zero_k_bias"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def var_key_to_ours(key: str) -> str | None:
    """Our parameter name for VAR's ``key``; None for VAR buffers that we recompute."""
    if key in _IGNORED_TOP:
        return None
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    m = _BLOCK_KEY.match(key)
    if m and m[2] in _IGNORED_BLOCK:
        return None
    if m and m[2] in _BLOCK_RENAMES:
        return f"blocks.{m[1]}.{_BLOCK_RENAMES[m[2]]}"
    if key.startswith("shared_ada_lin.") or key.endswith(".ada_gss"):
        raise ValueError(f"checkpoint uses VAR's shared AdaLN ({key}, the 512 px d36 model), which is not supported")
    raise KeyError(key)


def convert_var_state_dict(var_sd: Mapping[str, torch.Tensor], model: VARTransformer,
                           trained_patch_nums: Sequence[int] | None = None, ignore: Sequence[str] = ()
                           ) -> dict[str, torch.Tensor]:
    """VAR's transformer state dict -> ours for ``model``; raises on missing, unexpected or misshaped keys.

    ``trained_patch_nums``: the checkpoint's schedule when ``model`` runs a subset of it (:func:`take_scales`).
    ``ignore``: our parameter names or module prefixes (e.g. ``class_embed``) left out, to stay freshly initialised.
    """
    ours = model.state_dict()
    unknown = [p for p in ignore if not any(_matches(n, p) for n in ours)]
    if unknown:
        raise ValueError(f"ignore entries {unknown} name no parameter of the model; its parameters: "
                         f"{_head(sorted({n.split('.')[0] for n in ours}), 20)}")  # fmt: skip
    renamed: dict[str, tuple[str, torch.Tensor]] = {}  # our name -> (VAR's key, value)
    unexpected = []
    for key, value in var_sd.items():
        try:
            name = var_key_to_ours(key)
        except KeyError:
            unexpected.append(key)
            continue
        if name is None:
            if key.endswith("zero_k_bias") and torch.count_nonzero(value):
                raise ValueError(f"{key} is not zero; our attention has no k bias")
            continue
        if name not in ours:  # e.g. a block index beyond our depth, or a temperature without attn_l2_norm
            unexpected.append(key)
            continue
        if any(_matches(name, p) for p in ignore):
            continue
        renamed[name] = (key, value.reshape(-1) if name.endswith("log_temp") else value)  # (1, H, 1, 1) -> (H,)
    if trained_patch_nums is not None and as_schedule(trained_patch_nums) != model.patch_nums:
        values = take_scales({n: v for n, (_, v) in renamed.items()}, model.patch_nums, trained_patch_nums)
        renamed = {n: (k, values[n]) for n, (k, _) in renamed.items()}
    out: dict[str, torch.Tensor] = {}
    for name, (key, value) in renamed.items():
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ValueError(f"{key} has shape {tuple(value.shape)}, the model expects {tuple(ours[name].shape)} for "
                             f"{name}: {_shape_hint(name, model)}")
        out[name] = value.to(ours[name].dtype)
    missing = sorted(n for n in set(ours) - set(out) if not any(_matches(n, p) for p in ignore))
    if unexpected or missing:
        raise ValueError(f"VAR checkpoint does not match the model (depth={model.config.depth}, "
                         f"attn_l2_norm={model.config.attn_l2_norm}): unexpected VAR keys {_head(sorted(unexpected))}, "
                         f"our keys without a value {_head(missing)}")
    return out


def take_scales(state: Mapping[str, torch.Tensor], patch_nums: Sequence[int], trained_patch_nums: Sequence[int]
                ) -> dict[str, torch.Tensor]:
    """A :class:`VARTransformer` state dict for the schedule ``patch_nums`` from one trained on ``trained_patch_nums``.

    ``patch_nums``: a subset of the trained scales with the same first and last scale. Scale j (size pn) gets the
    level embedding and position slice of the trained scale of size pn; every other tensor is shared.
    """
    pns, trained = as_schedule(patch_nums), as_schedule(trained_patch_nums)
    idx = subset_indices(pns, trained)
    if pns[0] != trained[0]:
        raise ValueError(f"schedule {list(pns)} must start at the trained first scale {trained[0]} "
                         f"(the start token of {list(trained)})")  # fmt: skip
    level, pos = state["level_embed.weight"], state["pos_embed"]
    if level.shape[0] != len(trained) or pos.shape[1] != num_tokens(trained):
        raise ValueError(f"the weights hold {level.shape[0]} level embeddings and {pos.shape[1]} position embeddings, "
                         f"but the schedule they were trained on, {list(trained)}, has {len(trained)} scales and "
                         f"{num_tokens(trained)} tokens")  # fmt: skip
    slices = scale_slices(trained)
    out = dict(state)
    out["level_embed.weight"] = level[idx].clone()
    out["pos_embed"] = torch.cat([pos[:, slices[i]] for i in idx], dim=1)
    return out


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def unnest_var_checkpoint(sd: object) -> object:
    """VAR's trainer checkpoints (``ar-ckpt-*.pth``) nest the model under trainer/var_wo_ddp; released files do not."""
    if isinstance(sd, Mapping) and isinstance(sd.get("trainer"), Mapping) and "var_wo_ddp" in sd["trainer"]:
        return sd["trainer"]["var_wo_ddp"]
    return sd


def is_var_transformer_state_dict(sd: object) -> bool:
    """Whether ``sd`` (after :func:`unnest_var_checkpoint`) holds VAR's transformer weights (``var_d16.pth`` ...)."""
    return isinstance(sd, Mapping) and "class_emb.weight" in sd and "pos_1LC" in sd and "lvl_embed.weight" in sd


def _head(keys: list[str], n: int = 8) -> str:
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


def _shape_hint(name: str, model: VARTransformer) -> str:
    cfg = model.config
    vocab, pns = f"set vocab_size (now {cfg.vocab_size})", f"set patch_nums (now {list(cfg.patch_nums)})"
    hints = {
        "class_embed.weight": f"set num_classes (now {cfg.num_classes}; the table has num_classes + 1 rows)",
        "head.out.weight": vocab, "head.out.bias": vocab, "word_embed.weight": f"set latent_dim (now {cfg.latent_dim})",
        "pos_embed": pns, "pos_start": pns, "level_embed.weight": pns,
    }
    return hints.get(name, f"check depth/width/num_heads (now {cfg.depth}/{cfg.width}/{cfg.num_heads})")


def load_var_transformer(src: str | os.PathLike | Mapping[str, torch.Tensor], config: str | GeneratorConfig = "var-d16",
                         **overrides) -> VARTransformer:
    """Build our model from VAR's weights (a path or a state dict), in eval mode like ``load_var_vae``.
    ``config``: a preset name (``attn`` then defaults to "causal", VAR's function) or a :class:`GeneratorConfig`."""
    if isinstance(src, Mapping):  # the caller keeps its dict: do not alias its tensors into the model
        var_sd = {k: v.clone() for k, v in src.items()}
    elif not os.path.isfile(src):
        raise FileNotFoundError(f"VAR transformer checkpoint not found: {os.fspath(src)!r}. Download VAR's "
                                "released weights (var_d16.pth ... var_d30.pth) and give that file's path; nothing is "
                                "downloaded at run time")
    else:
        var_sd = unnest_var_checkpoint(torch.load(src, map_location="cpu", weights_only=True))
        if not isinstance(var_sd, Mapping):
            raise ValueError(f"{os.fspath(src)!r} does not hold a state dict (got {type(var_sd).__name__})")
    if isinstance(config, str):
        cfg = generator_config(config, **{"attn": "causal", **overrides})
    else:
        if overrides:
            raise TypeError("pass overrides with a preset name, or put them in the GeneratorConfig")
        cfg = config
    with torch.device("meta"):  # no wasted random init: every tensor is replaced below
        model = VARTransformer(cfg)
    model.load_state_dict(convert_var_state_dict(var_sd, model), strict=True, assign=True)
    return model.eval()
