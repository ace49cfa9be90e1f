"""Stage 2: the generator over a frozen tokenizer — VAR (``attn="causal"``) or SRDD's Markov form (``attn="markov"``).

VAR's recipe (DESIGN §2.2, notes/var-reference.md §1.5): ground-truth tokens come from the frozen tokenizer (or a token
cache of its fingerprint and schedule, ``srdd data tokenize``), every scale is predicted in one teacher-forced pass,

    loss = mean_b  sum_l (1/L) · CE(logits_bl, r_bl)          (the Markov chain's ELBO, DESIGN §2.2)

with AdamW, VAR's warmup and ``lin0`` decay, gradient clipping and label dropout to the null class (classifier-free
guidance); validation, grids and FID use the ``ema`` callback's weights. The frozen tokenizer is not saved but reloaded
from ``tokenizer_ckpt``, whose file and fingerprint the checkpoint records. A step's randomness (label dropout,
drop-path) comes from one CPU generator seeded per micro-batch from (run seed, rank, optimizer step, batch index), so a
resumed run draws what an uninterrupted one would. DDP, bf16-mixed, FSDP (``strategies.GeneratorFSDP``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from srdd_lightning.callbacks.ema import ema_weights
from srdd_lightning.loading import (
    CKPT_TOKENIZER_KEY,
    STAGE_KEY,
    load_tokenizer,
    read_checkpoint,
    resolve_checkpoint,
    resolve_tokenizer_checkpoint,
    stage_state,
)
from srdd_lightning.models.scales import flatten_tokens, scale_slices, split_tokens, subset_indices
from srdd_lightning.models.transformer import InitConfig, VARTransformer, generator_config
from srdd_lightning.utils.seeding import mix_seed

INIT_FROM_OPTION = "model.init_args.init_from"


def _clean(name: str) -> str:
    """Parameter name without the prefixes FSDP / activation checkpointing / compile insert."""
    for p in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(p, "")
    return name


def _typed(cls, value):
    """A dataclass option given as a dict (a checkpoint's hyper_parameters, plain Python) or an instance."""
    return value if isinstance(value, cls) else cls(**(value or {}))


class StageModule:
    """Mixin of a stage (before ``pl.LightningModule`` in its bases) whose checkpoints name the class that wrote them
    (``STAGE_KEY``) and are refused by any other stage; a plain class, so LightningCLI does not offer it as a model."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cls = type(self)
        checkpoint[STAGE_KEY] = f"{cls.__module__}.{cls.__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        self._weights_set = True  # a later setup() must not re-apply init_from over these weights

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another stage (e.g. a tokenizer's), naming both."""
        stage, cls = checkpoint.get(STAGE_KEY), type(self)
        if stage is not None and stage != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(f"the checkpoint was written by {stage}, not by {cls.__qualname__}: give a "
                             f"{cls.__qualname__} checkpoint (a run of the same stage)")  # fmt: skip


# ---- options ----------------------------------------------------------------------------------


@dataclass
class GeneratorArch:
    """Changes to the generator preset's architecture; null keeps the preset's value."""
    depth: int | None = None
    """Number of transformer blocks."""
    width: int | None = None
    """Model width C (VAR: 64·depth)."""
    num_heads: int | None = None
    """Attention heads (VAR: depth)."""
    mlp_ratio: float | None = None
    """MLP hidden width / width (VAR: 4)."""
    drop_path: float | None = None
    """Stochastic-depth rate of the last block, linear from 0 over blocks (VAR: 0.1·depth/24)."""
    attn_l2_norm: bool | None = None
    """Cosine attention with a learned per-head temperature (VAR: true)."""
    init_std: float | None = None
    """Trunc-normal std of the weights (VAR: sqrt(1/(3·width)))."""
    init_head: float | None = None
    """Multiplier on the output head's initial weight (VAR's --hd: 0.02)."""
    init_adaln: float | None = None
    """Multiplier on the AdaLN scale/shift rows (VAR's --aln: 0.5)."""
    init_adaln_gate: float | None = None
    """Multiplier on the AdaLN gate rows (VAR's --alng: 1e-5; its README uses 1e-3 for d16/d20)."""

    def apply(self, preset: str, **fields) -> Any:
        """The preset's GeneratorConfig with these changes and ``fields`` (sizes from the tokenizer and data)."""
        base = generator_config(preset, **fields)
        arch = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and not k.startswith("init_")}
        init = {k[len("init_"):]: v for k, v in dataclasses.asdict(self).items() if v is not None and k.startswith("init_")}
        return dataclasses.replace(base, **arch, init=dataclasses.replace(base.init or InitConfig(), **init))


@dataclass
class GeneratorOptim:
    """AdamW and the learning-rate schedule of the generator."""
    lr: float = 1e-4
    """Peak learning rate for the configured global batch (data.batch_size); VAR's rule: 1e-4 · global_batch / 256."""
    weight_decay: float = 0.05
    """AdamW weight decay on weight matrices (none on biases, norms, embeddings, temperatures)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (VAR: 0.9, 0.95)."""
    warmup_steps: int = 0
    """Linear warmup from 0.005 × lr to lr over this many optimizer steps."""
    decay_to: float = 0.1
    """After warmup and a hold of 5 % of the remaining steps, decay linearly to decay_to × lr at trainer.max_steps
    (VAR's lin0; VAR uses 0.1 for d16/d20, 0.01 for d24/d30)."""
    grad_clip: float | None = 2.0
    """Clip the global gradient norm to this (null: no clipping; the norm is still logged). Not trainer.gradient_clip_val."""
    fused: bool | None = None
    """Fused AdamW kernel (one kernel for all parameters); null: fused on CUDA, the foreach kernel elsewhere."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name, ok in (("lr", self.lr > 0), ("weight_decay", self.weight_decay >= 0),
                         ("warmup_steps", self.warmup_steps >= 0), ("decay_to", 0 <= self.decay_to <= 1),
                         ("grad_clip", self.grad_clip is None or self.grad_clip > 0),
                         ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas))):  # fmt: skip
            if not ok:
                raise ValueError(f"model.init_args.optim.{name}={getattr(self, name)} is out of range")


# ---- loss and the learning-rate schedule ------------------------------------------------------


def token_cross_entropy(logits_BLV: torch.Tensor, gt_BL: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy ce_BL (float32)."""
    B, L, V = logits_BLV.shape
    ce = F.cross_entropy(logits_BLV.reshape(B * L, V).float(), gt_BL.reshape(B * L), reduction="none",
                         label_smoothing=label_smoothing)  # fmt: skip
    return ce.view(B, L)


def var_loss(ce_BL: torch.Tensor) -> torch.Tensor:
    """VAR's objective: each token weighted 1/L, summed over tokens, averaged over the batch."""
    return ce_BL.mul(1.0 / ce_BL.shape[1]).sum(dim=1).mean()


@dataclass
class WarmupLinearDecay:
    """LR multiplier of VAR's ``lin0``, per optimizer step: linear warmup from ``warmup_start`` to 1, hold 1 for the
    first ``hold`` share of the remaining steps, then linear decay to ``decay_to`` at ``total_steps`` (None: none)."""

    warmup_steps: int
    total_steps: int | None
    decay_to: float
    warmup_start: float = 0.005
    hold: float = 0.05

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        done = min(1.0, (step - self.warmup_steps) / span)
        if done < self.hold:
            return 1.0
        return self.decay_to + (1 - self.decay_to) * (1 - done) / (1 - self.hold)


# ---- the stage --------------------------------------------------------------------------------


class SRDDModule(StageModule, pl.LightningModule):
    """Stage 2: train VAR's next-scale generator (``attn=causal``) or SRDD's Markov form (``attn=markov``).

    Args:
        tokenizer_ckpt: Frozen tokenizer: a TokenizerModule run folder (``runs/digits/tokenizer``: its newest
            ``version_*/checkpoints/last.ckpt``) or file, or VAR's ``vae_ch160v4096z32.pth``; recorded, not stored.
        generator: Generator preset (``tiny``, ``small``, ``var-d16``, ``var-d20``, ``var-d24``, ``var-d30``).
        architecture: Changes to the preset (depth, width, heads, drop path, init); sizes come from tokenizer and data.
        attn: Attention mask: ``markov`` (SRDD: each scale attends to itself), ``causal`` (VAR: scales <= own),
            ``markov_prev`` (own and previous scale, an ablation).
        num_classes: Real classes (the null class is added by the generator); filled from the data by the CLI.
        image_size: Image side in pixels; filled from the data by the CLI and checked against the tokenizer.
        schedule: Train on this subset of the tokenizer's patch_nums ending at its last scale, e.g. ``[1, 3, 5, 8, 13,
            16]`` (ground-truth tokens re-quantized on it). None: all scales.
        cond_drop: Probability of replacing a label by the null class in training (classifier-free guidance).
        label_smoothing: Label smoothing of the cross-entropy (VAR: 0).
        optim: AdamW, learning-rate schedule and gradient clipping.
        tokenizer_ema: Load the tokenizer's EMA weights when its checkpoint has them.
        init_from: Start from VAR's released ``var_d16.pth`` … ``var_d30.pth`` (``generator: var-d16`` …: the file's
            depth, width, heads) or a generator run / checkpoint (its EMA weights), any ``attn``; with a ``schedule``
            the scales of the same size are taken. A resumed run loads its own checkpoint over it.
        init_from_ignore: Parameters (or modules) of ``init_from`` kept freshly initialised: ``[class_embed]``
            fine-tunes on another class count (e.g. ImageNet's VAR on SUN397).
        attention: ``flex`` (one block-sparse ``flex_attention`` call, compiled on CUDA), ``sdpa`` (SDPA per scale for
            the markov masks, the cached block-causal mask for causal), ``auto`` (flex on CUDA for the markov masks,
            sdpa otherwise). Same numbers either way.
        compile: ``torch.compile`` the training forward (slow first steps; sampling stays eager; same checkpoint names).
        tf32: Allow TF32 matmuls and convolutions on Ampere or newer GPUs for the fp32 parts of training.
    """

    frozen_submodules = ("tokenizer",)  # the EMA callback shares it instead of averaging a copy
    trains_from_tokens = True  # batches may be (idx_BL, label_B) from a token cache of this tokenizer and schedule

    @staticmethod
    def check_init_args(init_args: dict) -> None:
        """Called by ``srdd`` before building the module: the tokenizer (and ``init_from``) checkpoints must exist."""
        resolve_tokenizer_checkpoint(init_args["tokenizer_ckpt"], option="model.init_args.tokenizer_ckpt")
        if init_args.get("init_from"):
            _resolve_init_from(init_args["init_from"])

    def __init__(self, tokenizer_ckpt: str, generator: str = "tiny", architecture: GeneratorArch = GeneratorArch(),
                 attn: Literal["markov", "causal", "markov_prev"] = "markov", num_classes: int | None = None,
                 image_size: int | None = None, schedule: list[int] | None = None, cond_drop: float = 0.1,
                 label_smoothing: float = 0.0, optim: GeneratorOptim = GeneratorOptim(), tokenizer_ema: bool = True,
                 init_from: str | None = None, init_from_ignore: list[str] | None = None,
                 attention: Literal["auto", "flex", "sdpa"] = "auto", compile: bool = False, tf32: bool = True):
        super().__init__()
        architecture, optim = _typed(GeneratorArch, architecture), _typed(GeneratorOptim, optim)
        self.save_hyperparameters()
        # plain values in the checkpoint, so it loads with weights_only=True
        self.hparams.architecture, self.hparams.optim = dataclasses.asdict(architecture), dataclasses.asdict(optim)
        self.optim = optim
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"model.init_args.label_smoothing={label_smoothing} must lie in [0, 1)")
        if num_classes is None:
            raise ValueError("model.init_args.num_classes is unset: the CLI fills it from the data index; "
                             "give it when building SRDDModule yourself")  # fmt: skip

        # ---- the frozen tokenizer (pinned to the resolved file, so a resume cannot pick a newer one)
        self.tokenizer, self.tokenizer_info = tokenizer, info = load_tokenizer(tokenizer_ckpt, ema=tokenizer_ema)
        self.hparams.tokenizer_ckpt = info["path"]
        if image_size is not None and image_size != tokenizer.image_size:
            raise ValueError(f"the data gives image_size={image_size} (data.resolution or the packed resolution), but "
                             f"the tokenizer {info['path']} (model.init_args.tokenizer_ckpt) was built for "
                             f"{tokenizer.image_size} px")

        # ---- the generator, sized by the tokenizer
        tok_pns = tuple(info["patch_nums"])
        pns = tuple(schedule) if schedule is not None else tok_pns
        try:
            subset_indices(pns, tok_pns)
        except ValueError as e:
            raise ValueError(f"model.init_args.schedule {list(pns)} does not fit the tokenizer {info['path']} "
                             f"(model.init_args.tokenizer_ckpt), whose patch_nums are {list(tok_pns)}: {e}") from None  # fmt: skip
        cfg = architecture.apply(generator, attn=attn, cond_drop=cond_drop, num_classes=num_classes,
                                 vocab_size=info["vocab_size"], latent_dim=info["latent_dim"], patch_nums=pns)  # fmt: skip
        self.generator = VARTransformer(cfg)
        self.generator.attention = attention
        self.patch_nums: tuple[int, ...] = tuple(self.generator.patch_nums)
        self.no_decay_names = self.generator.no_weight_decay_names()  # unwrapped names, fixed before any wrapping
        self.register_load_state_dict_post_hook(_ignore_missing_tokenizer_keys)
        self.rng = torch.Generator()  # the training step's randomness (reseeded per micro-batch, see the docstring)
        self._run_seed = torch.initial_seed()  # what seed_everything set before the CLI built the module
        self._val_hits_V: torch.Tensor | None = None
        self.flops_per_batch: int | None = None  # read by callbacks.Throughput (FLOPs/s, MFU); set per step
        self.tokens_per_sample = sum(p * p for p in self.patch_nums)  # callbacks.Throughput's tokens/s
        self._flops_by_batch: dict[int, int] = {}
        self._weights_set = False  # init_from applied, or weights restored from a checkpoint

    # ---- frozen tokenizer stays frozen and in eval mode --------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()
        return self

    def _tokenizer_to_device(self) -> None:
        """Under FSDP the tokenizer is an ignored module, which FSDP does not move."""
        t = next(self.tokenizer.parameters(), None)
        if t is not None and t.device != self.device:
            self.tokenizer.to(self.device)

    @torch.no_grad()
    def chain_targets(self, x0_BChw: torch.Tensor, patch_nums=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens gt_BL of M(·)·x_0 on ``patch_nums`` (default: the generator's) and teacher-forcing inputs x_BLC."""
        pns = self.patch_nums if patch_nums is None else tuple(patch_nums)
        with torch.autocast(device_type=x0_BChw.device.type, enabled=False):
            tokens = self.tokenizer.quantizer.quantize(x0_BChw.float(), pns).tokens
            x_BLC = self.tokenizer.teacher_forcing_inputs(tokens, pns)
        return flatten_tokens(tokens), x_BLC

    @torch.no_grad()
    def tokens_and_inputs(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground-truth tokens gt_BL on the generator's schedule and the teacher-forcing inputs x_BLC (fp32)."""
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            return self.chain_targets(self.tokenizer.encode(img_B3HW.float()))

    @torch.no_grad()
    def inputs_from_tokens(self, idx_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached tokens idx_BL on the generator's schedule -> (gt_BL int64, x_BLC fp32), as ``tokens_and_inputs``."""
        gt_BL = idx_BL.long()
        with torch.autocast(device_type=gt_BL.device.type, enabled=False):
            x_BLC = self.tokenizer.teacher_forcing_inputs(split_tokens(gt_BL, self.patch_nums), self.patch_nums)
        return gt_BL, x_BLC

    def check_token_cache(self, datamodule) -> None:
        """Refuse a token cache written by another tokenizer or on another schedule (one line naming both)."""
        cache = getattr(datamodule, "token_info", None)
        if cache is None:
            return
        root = getattr(datamodule, "root", "data.root")
        if not self.trains_from_tokens:
            raise ValueError(f"data.root {root} is a token cache, but {type(self).__name__} trains on images: give "
                             f"data.root the packed images it was written from ({datamodule.image_root})")  # fmt: skip
        ours = self.tokenizer_info
        if cache["fingerprint"] != ours["fingerprint"]:
            ema = "" if cache.get("ema") in (None, ours.get("ema")) else (
                f" (the cache used {'the EMA' if cache['ema'] else 'the trained'} weights: match "
                f"model.init_args.tokenizer_ema and srdd data tokenize --ema)")  # fmt: skip
            raise ValueError(f"the token cache {root} (data.root) was written by the tokenizer {cache['tokenizer']} "
                             f"(weights {cache['fingerprint']}), but model.init_args.tokenizer_ckpt gives "
                             f"{ours['path']} (weights {ours['fingerprint']}){ema}: its codes mean other things; "
                             f"re-tokenize with `srdd data tokenize --tokenizer {ours['path']}` or point data.root at "
                             "the images")
        if tuple(cache["patch_nums"]) != self.patch_nums:
            raise ValueError(f"the token cache {root} (data.root) holds tokens on patch_nums {cache['patch_nums']}, "
                             f"but the generator trains on {list(self.patch_nums)} (model.init_args.schedule): tokens "
                             "of one schedule are not those of another (each scale quantizes what the previous ones "
                             "left); write a cache with `srdd data tokenize --patch_nums "
                             f"[{','.join(map(str, self.patch_nums))}]`, or train from the images")

    # ---- strategies ----------------------------------------------------------------------------

    def _fsdp_root(self):
        if self._trainer is None:
            return None
        model = self.trainer.strategy.model
        return model if isinstance(model, FullyShardedDataParallel) else None

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            ignored = list(strategy.kwargs.get("ignored_modules") or [])
            if self.tokenizer not in ignored:
                strategy.kwargs["ignored_modules"] = ignored + [self.tokenizer]
        elif isinstance(strategy, DDPStrategy):
            # The tokenizer is constant: no per-step broadcast of its buffers and parameters.
            names = [n for n, _ in [*self.named_buffers(), *self.named_parameters()] if n.startswith("tokenizer.")]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)
        if stage == "fit" and self.trainer.gradient_clip_val is not None:
            raise ValueError(f"trainer.gradient_clip_val={self.trainer.gradient_clip_val} is set, but SRDDModule clips "
                             f"itself: use model.init_args.optim.grad_clip (now {self.optim.grad_clip}) and leave "
                             "trainer.gradient_clip_val unset")
        if self._trainer is not None:
            self.check_token_cache(getattr(self.trainer, "datamodule", None))
        if self.hparams.get("init_from") and not self._weights_set:
            self.load_initial_weights(self.hparams.init_from)
        if stage == "fit":
            if (self.hparams.get("tf32", True) and torch.cuda.is_available() and self.device.type == "cuda"
                    and torch.cuda.get_device_capability(self.device)[0] >= 8):
                torch.set_float32_matmul_precision("high")
                torch.backends.cudnn.allow_tf32 = True
            if self.hparams.get("compile") and self.generator._compiled_call_impl is None:
                # in place (nn.Module.compile): the state dict keeps its names, the sampler's forward_scale stays eager
                self.generator.compile(dynamic=False)

    # ---- fine-tuning: init_from -----------------------------------------------------------------

    @torch.no_grad()
    def load_initial_weights(self, path: str) -> None:
        """Load VAR's ``var_d*.pth`` or a generator checkpoint / run folder (EMA weights) into ``self.generator``."""
        from srdd_lightning.models.var_import_transformer import (convert_var_state_dict, is_var_transformer_state_dict,
                                                                  unnest_var_checkpoint)

        file, ckpt = read_checkpoint(_resolve_init_from(path), INIT_FROM_OPTION)
        ckpt = unnest_var_checkpoint(ckpt)
        ignore = list(self.hparams.get("init_from_ignore") or [])
        tok_pns = list(self.tokenizer_info["patch_nums"])
        hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if isinstance(hp, dict) and "tokenizer_ckpt" in hp:  # a generator run of this framework
            recorded = ckpt.get(CKPT_TOKENIZER_KEY) or {}
            if recorded.get("fingerprint") not in (None, self.tokenizer_info["fingerprint"]):
                raise ValueError(f"{file} ({INIT_FROM_OPTION}) was trained with the tokenizer {recorded.get('path')} "
                                 f"(weights {recorded.get('fingerprint')}), but model.init_args.tokenizer_ckpt gives "
                                 f"{self.tokenizer_info['path']} (weights {self.tokenizer_info['fingerprint']}): its "
                                 "codes mean other things; use that tokenizer")
            trained = hp.get("schedule") or recorded.get("patch_nums") or tok_pns
            self.init_generator_from(stage_state(ckpt, "generator."), trained, f"the generator checkpoint {file}", ignore)
        elif is_var_transformer_state_dict(ckpt):
            self._check_classes(ckpt["class_emb.weight"].shape[0] - 1, f"VAR's weights {file}", ignore)
            try:
                state = convert_var_state_dict(ckpt, self.generator, trained_patch_nums=tok_pns, ignore=ignore)
            except ValueError as e:
                raise ValueError(f"VAR's weights {file} ({INIT_FROM_OPTION}) do not fit the generator: {e}") from None
            self._load_generator_state(state, ignore, f"VAR's weights {file}")
        else:
            raise ValueError(f"{file} ({INIT_FROM_OPTION}) is neither VAR's var_d*.pth transformer weights nor a "
                             f"generator (SRDDModule) checkpoint or run folder")  # fmt: skip
        self._weights_set = True

    @torch.no_grad()
    def init_generator_from(self, state: dict[str, torch.Tensor], trained_patch_nums, what: str,
                            ignore: list[str] | None = None) -> None:
        """Load a VARTransformer ``state`` trained on ``trained_patch_nums`` into ``self.generator`` (its schedule a
        subset of those scales: the embeddings of the scales of the same size are taken; ``ignore`` stays as is)."""
        from srdd_lightning.models.var_import_transformer import take_scales

        ignore = list(ignore or [])
        if "class_embed.weight" in state:
            self._check_classes(state["class_embed.weight"].shape[0] - 1, what, ignore)
        if tuple(trained_patch_nums) != self.patch_nums:
            try:
                state = take_scales(state, self.patch_nums, trained_patch_nums)
            except ValueError as e:
                raise ValueError(f"{what} ({INIT_FROM_OPTION}) cannot start the schedule {list(self.patch_nums)} "
                                 f"(model.init_args.schedule): {e}") from None  # fmt: skip
        self._load_generator_state({k: v for k, v in state.items() if not _ignored(k, ignore)}, ignore, what)

    def _check_classes(self, theirs: int, what: str, ignore: list[str]) -> None:
        ours = self.generator.num_classes
        if theirs != ours and not any(p in ("class_embed", "class_embed.weight") for p in ignore):
            raise ValueError(f"{what} ({INIT_FROM_OPTION}) was trained on {theirs} classes, but the data has {ours}: "
                             "to fine-tune on another class count, add model.init_args.init_from_ignore: [class_embed] "
                             "(the class embedding, null class included, is then freshly initialised; the rest of the "
                             "weights are loaded)")

    def _load_generator_state(self, state: dict[str, torch.Tensor], ignore: list[str], what: str) -> None:
        current = self.generator.state_dict()
        try:
            self.generator.load_state_dict({**state, **{k: v for k, v in current.items() if _ignored(k, ignore)}})
        except RuntimeError as e:
            mismatch = next((f"(first mismatch: {k} {tuple(state[k].shape)} vs the generator's {tuple(v.shape)})"
                             for k, v in current.items() if k in state and state[k].shape != v.shape), "")  # fmt: skip
            raise ValueError(f"{what} ({INIT_FROM_OPTION}) does not fit the generator (model.init_args.generator / "
                             f"architecture / schedule): {str(e).splitlines()[0]} {mismatch}") from None  # fmt: skip

    def on_fit_start(self) -> None:
        self._tokenizer_to_device()

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[VARTransformer]:
        """The EMA weights in ``self.generator`` inside the block (full parameters under FSDP; all ranks enter it)."""
        self._tokenizer_to_device()
        root = self._fsdp_root()
        full = (contextlib.nullcontext() if root is None
                else FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True))
        with ema_weights(self), full:
            yield self.generator

    def sampler(self):
        """A :class:`~srdd_lightning.sampling.Sampler` over this generator and tokenizer (current weights)."""
        from srdd_lightning.sampling.sampler import Sampler

        self._tokenizer_to_device()
        return Sampler(self.generator, self.tokenizer)

    # ---- steps ---------------------------------------------------------------------------------

    def _step_rng(self, batch_idx: int) -> torch.Generator:
        """The module's generator, seeded for this micro-batch (see the module docstring)."""
        return self.rng.manual_seed(mix_seed(self._run_seed, self.global_rank, self.global_step, batch_idx))

    def _forward_loss(self, batch, rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ce_BL, logits_BLV, gt_BL of ``(img_B3HW, label_B)`` or of cached tokens ``(idx_BL, label_B)``; ``rng``
        given = training (label dropout, drop-path)."""
        x, label_B = batch
        from_cache = x.dim() == 2 and not x.is_floating_point()  # (B, L) token indices, not (B, 3, H, W) images
        gt_BL, x_BLC = self.inputs_from_tokens(x) if from_cache else self.tokens_and_inputs(x)
        if rng is not None:
            label_B = self.generator.drop_labels(label_B, p=self.hparams.cond_drop, generator=rng)
        logits_BLV = self.generator(label_B, x_BLC, generator=rng)
        ce_BL = token_cross_entropy(logits_BLV, gt_BL, self.hparams.label_smoothing)
        return ce_BL, logits_BLV, gt_BL

    def _metrics(self, prefix: str, ce_BL: torch.Tensor, logits_BLV: torch.Tensor, gt_BL: torch.Tensor):
        """Loss and accuracy per scale, named by the scale's size (``loss_4x4``), and the predicted codes."""
        with torch.no_grad():
            pred_BL = logits_BLV.argmax(dim=-1)
            correct_BL = (pred_BL == gt_BL).float()
            out = {f"{prefix}/acc": correct_BL.mean()}
            for pn, s in zip(self.patch_nums, scale_slices(self.patch_nums)):
                out[f"{prefix}/loss_{pn}x{pn}"] = ce_BL[:, s].mean()
                out[f"{prefix}/acc_{pn}x{pn}"] = correct_BL[:, s].mean()
            # an index fill, not bincount: bincount reads its maximum on the host (a device sync every step)
            hits_V = torch.zeros(logits_BLV.shape[-1], dtype=torch.bool, device=pred_BL.device)
            hits_V[pred_BL.flatten()] = True
        return out, hits_V

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ce_BL, logits_BLV, gt_BL = self._forward_loss(batch, self._step_rng(batch_idx))
        loss = var_loss(ce_BL)
        metrics, hits_V = self._metrics("train", ce_BL, logits_BLV, gt_BL)
        metrics["train/codebook_share"] = hits_V.float().mean()
        B = gt_BL.shape[0]
        if B not in self._flops_by_batch:
            self._flops_by_batch[B] = self.generator.training_flops(B)
        self.flops_per_batch = self._flops_by_batch[B]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict(metrics, batch_size=B)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._tokenizer_to_device()
        self._val_hits_V = None

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx, prefix="test")

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end(prefix="test")

    def validation_step(self, batch, batch_idx: int, *, prefix: str = "val") -> None:
        ce_BL, logits_BLV, gt_BL = self._forward_loss(batch, None)
        metrics, hits_V = self._metrics(prefix, ce_BL, logits_BLV, gt_BL)
        self._val_hits_V = hits_V if self._val_hits_V is None else self._val_hits_V | hits_V
        self.log(f"{prefix}/loss", var_loss(ce_BL), prog_bar=True, sync_dist=True, batch_size=gt_BL.shape[0])
        self.log_dict(metrics, sync_dist=True, batch_size=gt_BL.shape[0])

    def on_validation_epoch_end(self, *, prefix: str = "val") -> None:
        """The share of the codebook the model predicts anywhere in the whole pass (summed over ranks)."""
        hits_V = self._val_hits_V
        if hits_V is None:  # this rank saw no batch
            hits_V = torch.zeros(self.generator.config.vocab_size, dtype=torch.bool, device=self.device)
        hits_V = self.trainer.strategy.reduce(hits_V.float(), reduce_op="sum") > 0
        self.log(f"{prefix}/codebook_share", hits_V.float().mean(), sync_dist=True)  # equal on every rank already
        self._val_hits_V = None

    # ---- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        opt = self.optim
        named = [(_clean(n), p) for n, p in self.generator.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if n not in self.no_decay_names]
        no_decay = [p for n, p in named if n in self.no_decay_names]
        fused = opt.fused if opt.fused is not None else all(p.is_cuda for _, p in named)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": opt.weight_decay, "name": "weights"},
             {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}],
            lr=opt.lr, betas=tuple(opt.betas), fused=fused,
        )  # fmt: skip
        steps = self.trainer.max_steps
        total = steps if steps and steps > 0 else self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else None
        if total is not None and opt.warmup_steps >= total:
            raise ValueError(f"model.init_args.optim.warmup_steps={opt.warmup_steps} must be below trainer.max_steps={total}")
        schedule = WarmupLinearDecay(opt.warmup_steps, total, opt.decay_to)
        # a plain function, so LambdaLR's state holds no copy of the schedule: a resumed run follows its config
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        max_norm = self.optim.grad_clip or math.inf
        if (root := self._fsdp_root()) is not None:
            norm = root.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None], max_norm)
        self.log("train/grad_norm", norm)

    # ---- checkpoints: the tokenizer is referenced, not stored ---------------------------------------

    @staticmethod
    def _drop_tokenizer(checkpoint: dict[str, Any]) -> None:
        """Remove ``tokenizer.*`` from the weights (also the EMA callback's, which has run already: callbacks first)."""
        for key in ("state_dict", "current_model_state"):
            sd = checkpoint.get(key) or {}
            for k in [k for k in sd if _clean(k).startswith("tokenizer.")]:
                del sd[k]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._drop_tokenizer(checkpoint)
        super().on_save_checkpoint(checkpoint)
        info = self.tokenizer_info
        checkpoint[CKPT_TOKENIZER_KEY] = {"path": info["path"], "abspath": str(Path(info["path"]).resolve()),
                                          **{k: info[k] for k in ("fingerprint", "kind", "vocab_size", "latent_dim",
                                                                  "patch_nums")}}  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._drop_tokenizer(checkpoint)  # the tokenizer always comes from tokenizer_ckpt
        super().on_load_checkpoint(checkpoint)

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another stage, or one trained with another tokenizer (both named)."""
        super().check_checkpoint(checkpoint)
        saved, now = checkpoint.get(CKPT_TOKENIZER_KEY), self.tokenizer_info
        if saved and saved.get("fingerprint") != now["fingerprint"]:
            raise ValueError(f"this generator was trained with the tokenizer {saved.get('path')} (weights "
                             f"{saved.get('fingerprint')}; {_sizes(saved)}), but model.init_args.tokenizer_ckpt now "
                             f"gives {now['path']} with different weights ({now['fingerprint']}; {_sizes(now)}); point "
                             "tokenizer_ckpt at the tokenizer it was trained with")


def _resolve_init_from(path: str):
    """``init_from``'s file (a run folder gives its last.ckpt); a missing VAR file says where to get it."""
    try:
        return resolve_checkpoint(path, INIT_FROM_OPTION)
    except FileNotFoundError as e:
        if Path(path).name.startswith("var_d"):
            raise FileNotFoundError(f"{e}. Download VAR's released {Path(path).name} (Hugging Face FoundationVision/var) "
                                    f"and give its path; nothing is downloaded automatically") from None  # fmt: skip
        raise


def _ignored(key: str, ignore: list[str]) -> bool:
    """``key`` is one of the ``ignore`` parameters or inside one of its modules."""
    return any(key == p or key.startswith(p + ".") for p in ignore)


def _sizes(info: dict) -> str:
    return f"vocab_size {info.get('vocab_size')}, latent_dim {info.get('latent_dim')}, patch_nums {info.get('patch_nums')}"


def _ignore_missing_tokenizer_keys(module: nn.Module, incompatible_keys) -> None:
    """Strict loading accepts checkpoints without ``tokenizer.*`` (they never hold it)."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not _clean(k).startswith("tokenizer.")]


__all__ = ["GeneratorArch", "GeneratorOptim", "SRDDModule", "WarmupLinearDecay", "token_cross_entropy", "var_loss"]
