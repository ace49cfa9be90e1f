"""Stage 2: the generator over a frozen tokenizer — VAR (``attn="causal"``) or SRDD's Markov form (``attn="markov"``).

Training is VAR's recipe (DESIGN §2.2, notes/var-reference.md §1.5): ground-truth tokens are computed on the
fly from the frozen tokenizer, the transformer predicts every scale in one teacher-forced pass, and the loss
is the per-token cross-entropy with each token weighted 1/L:

    loss = mean_b  sum_l (1/L) · CE(logits_bl, r_bl)          (the Markov chain's ELBO, DESIGN §2.2)

AdamW (no decay on biases, norms, embeddings, temperatures), linear warmup then VAR's ``lin0`` decay,
gradient clipping, label dropout to the null class (classifier-free guidance), and an EMA of the
generator that validation and sample grids use.

The tokenizer is a frozen submodule (moved with the module, never trained) but it is *not* saved in the
generator's checkpoints: it is reloaded from ``tokenizer_ckpt``, whose resolved file and weight
fingerprint the checkpoint records, so a generator cannot silently meet a different tokenizer.

Strategies: DDP (every generator parameter is used: no ``find_unused_parameters``; the EMA and tokenizer
buffers are not re-broadcast each step), bf16-mixed, and FSDP with one unit per transformer block through
:class:`srdd_lightning.strategies.GeneratorFSDP` (``auto_wrap_policy={AdaLNBlock}``, fp32 master weights,
bf16 compute under autocast). The embeddings and the head stay in the root unit. The tokenizer and the EMA
are FSDP ``ignored_modules`` (set by :meth:`SRDDModule.setup`), gradient clipping uses the root's
``clip_grad_norm_`` and the EMA reads the gathered full parameters. The model is built in ``__init__`` (no
``configure_model``): VAR-d16..d30 fit in host memory, and FSDP shards them when it wraps.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from srdd_lightning.loading import load_tokenizer, resolve_tokenizer_checkpoint
from srdd_lightning.models.ema import EMA
from srdd_lightning.models.scales import flatten_tokens, scale_slices, subset_indices
from srdd_lightning.models.transformer import VARTransformer, generator_config

# Where a checkpoint records which tokenizer the generator was trained with.
CKPT_TOKENIZER_KEY = "srdd_tokenizer"
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    """Parameter name without the prefixes FSDP / activation checkpointing / compile insert."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


class _CleanNames:
    """A module's ``named_parameters`` under their unwrapped names (what :class:`EMA` keys its shadows by)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for n, p in self.module.named_parameters():
            yield _clean(n), p


# --------------------------------------------------------------------------------------------
# Loss and the learning-rate schedule
# --------------------------------------------------------------------------------------------


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
    """LR multiplier of VAR's ``lin0`` schedule, stepped per optimizer step.

    Linear warmup from ``warmup_start`` to 1 over ``warmup_steps``; then hold 1 for the first ``hold`` share
    of the remaining steps and decay linearly to ``decay_to`` at ``total_steps`` (None: no decay).
    """

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


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


class SRDDModule(pl.LightningModule):
    """Stage 2: train VAR's next-scale generator (``attn=causal``) or SRDD's Markov form (``attn=markov``).

    Args:
        tokenizer_ckpt: Frozen tokenizer: a TokenizerModule run folder (``runs/digits/tokenizer``: its newest
            ``version_*/checkpoints/last.ckpt``) or file, or VAR's ``vae_ch160v4096z32.pth``. The resolved
            file is recorded, and the generator's checkpoints do not contain the tokenizer.
        generator: Generator preset (``tiny``, ``small``, ``var-d16``, ``var-d20``, ``var-d24``, ``var-d30``).
        generator_overrides: GeneratorConfig fields changing the preset (e.g. ``{depth: 4, width: 256}``).
            vocab_size, latent_dim and patch_nums are taken from the tokenizer; giving different ones is an error.
        attn: Attention mask: ``markov`` (SRDD: each scale attends to itself), ``causal`` (VAR: scales <= own),
            ``markov_prev`` (own and previous scale, an ablation).
        num_classes: Real classes (the null class is added by the generator); filled from the data by the CLI.
        image_size: Image side in pixels; filled from the data by the CLI and checked against the tokenizer.
        schedule: Train a fewer-scale model on this subset of the tokenizer's patch_nums (ending at its last
            scale), e.g. ``[1, 3, 5, 8, 13, 16]``; ground-truth tokens are re-quantized on it. None: all scales.
        cond_drop: Probability of replacing a label by the null class in training (classifier-free guidance).
        lr: Peak learning rate for the configured *global* batch (``data.batch_size``), not rescaled
            automatically. VAR's rule: 1e-4 · global_batch / 256.
        weight_decay: AdamW weight decay on weight matrices (none on biases, norms, embeddings, temperatures).
        betas: AdamW betas (VAR: 0.9, 0.95).
        warmup_steps: Linear warmup from 0.005 × lr to lr over this many optimizer steps.
        decay_to: After warmup and a hold of 5 % of the remaining steps, decay linearly to decay_to × lr at
            trainer.max_steps (VAR's ``lin0``; VAR uses 0.1 for d16/d20, 0.01 for d24/d30).
        grad_clip: Clip the global gradient norm to this (None: no clipping, the norm is still logged).
            Use this instead of trainer.gradient_clip_val.
        label_smoothing: Label smoothing of the cross-entropy (VAR: 0).
        ema_decay: Decay of the generator's EMA (ramped up over the first updates); validation and sample
            grids use the EMA weights.
        tokenizer_ema: Load the tokenizer's EMA weights when its checkpoint has them.
    """

    @staticmethod
    def check_init_args(init_args: dict) -> None:
        """Called by ``srdd`` before building the module: the tokenizer checkpoint must exist."""
        resolve_tokenizer_checkpoint(init_args["tokenizer_ckpt"], option="model.init_args.tokenizer_ckpt")

    def __init__(
        self,
        tokenizer_ckpt: str,
        generator: str = "tiny",
        generator_overrides: dict[str, Any] | None = None,
        attn: Literal["markov", "causal", "markov_prev"] = "markov",
        num_classes: int | None = None,
        image_size: int | None = None,
        schedule: list[int] | None = None,
        cond_drop: float = 0.1,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        decay_to: float = 0.1,
        grad_clip: float | None = 2.0,
        label_smoothing: float = 0.0,
        ema_decay: float = 0.9999,
        tokenizer_ema: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        for name, value, ok in (("lr", lr, lr > 0), ("weight_decay", weight_decay, weight_decay >= 0),
                                ("warmup_steps", warmup_steps, warmup_steps >= 0),
                                ("decay_to", decay_to, 0 <= decay_to <= 1),
                                ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1),
                                ("grad_clip", grad_clip, grad_clip is None or grad_clip > 0)):  # fmt: skip
            if not ok:
                raise ValueError(f"model.init_args.{name}={value} is out of range")

        # ---- the frozen tokenizer (pinned to the resolved file, so a resume cannot pick a newer one)
        tokenizer, info = load_tokenizer(tokenizer_ckpt, ema=tokenizer_ema)
        self.tokenizer = tokenizer
        self.tokenizer_info = info
        self.hparams.tokenizer_ckpt = info["path"]
        if image_size is not None and image_size != tokenizer.image_size:
            raise ValueError(
                f"the data gives image_size={image_size} (data.resolution or the packed resolution), but the tokenizer "
                f"{info['path']} (model.init_args.tokenizer_ckpt) was built for {tokenizer.image_size} px"
            )

        # ---- the generator, sized by the tokenizer
        cfg = generator_config(generator, **self._generator_fields(generator_overrides, attn, cond_drop, num_classes,
                                                                   schedule, info))  # fmt: skip
        self.generator = VARTransformer(cfg)
        self.patch_nums: tuple[int, ...] = tuple(self.generator.patch_nums)
        self.ema = EMA(self.generator, decay=ema_decay)
        self.no_decay_names = self.generator.no_weight_decay_names()  # unwrapped names, fixed before any wrapping
        self.register_load_state_dict_post_hook(_ignore_missing_tokenizer_keys)
        self._ema_ctx: contextlib.ExitStack | None = None
        self._val_hits_V: torch.Tensor | None = None

    def _generator_fields(self, overrides, attn, cond_drop, num_classes, schedule, info) -> dict[str, Any]:
        """GeneratorConfig fields: overrides + mask + classes + what the tokenizer defines, checked for conflicts."""
        fields = dict(overrides or {})
        tok = f"the tokenizer {info['path']} (model.init_args.tokenizer_ckpt)"
        for key, value in (("attn", attn), ("cond_drop", cond_drop)):
            if key in fields and fields[key] != value:
                raise ValueError(f"model.init_args.generator_overrides.{key}={fields[key]} disagrees with "
                                 f"model.init_args.{key}={value}; set only model.init_args.{key}")
            fields[key] = value
        if num_classes is None:
            if "num_classes" not in fields:
                raise ValueError("model.init_args.num_classes is unset: the CLI fills it from the data index; "
                                 "give it when building SRDDModule yourself")
        elif fields.get("num_classes", num_classes) != num_classes:
            raise ValueError(f"model.init_args.generator_overrides.num_classes={fields['num_classes']} disagrees with "
                             f"model.init_args.num_classes={num_classes} (from the data)")
        else:
            fields["num_classes"] = num_classes
        for key in ("vocab_size", "latent_dim"):
            theirs = info[key]
            if key in fields and int(fields[key]) != theirs:
                raise ValueError(
                    f"generator {key}={fields[key]} (model.init_args.generator_overrides.{key}) disagrees with {tok}, "
                    f"which has {key}={theirs}; remove the override to take it from the tokenizer, or point "
                    f"model.init_args.tokenizer_ckpt at a tokenizer with {key}={fields[key]}"
                )
            fields[key] = theirs
        tok_pns = tuple(info["patch_nums"])
        if schedule is not None and "patch_nums" in fields and tuple(fields["patch_nums"]) != tuple(schedule):
            raise ValueError(f"model.init_args.generator_overrides.patch_nums={list(fields['patch_nums'])} disagrees with "
                             f"model.init_args.schedule={list(schedule)}; set only model.init_args.schedule")
        pns = tuple(schedule if schedule is not None else fields.get("patch_nums", tok_pns))
        try:
            subset_indices(pns, tok_pns)
        except ValueError as e:
            raise ValueError(
                f"generator patch_nums {list(pns)} (model.init_args.schedule / generator_overrides.patch_nums) do not fit "
                f"{tok}, whose patch_nums are {list(tok_pns)}: {e}"
            ) from None
        fields["patch_nums"] = pns
        return fields

    # ---- frozen tokenizer stays frozen and in eval mode --------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()
        return self

    def _aux_to_device(self) -> None:
        """Under FSDP the tokenizer and the EMA are ignored modules, which FSDP does not move."""
        for m in (self.tokenizer, self.ema):
            t = next(m.buffers(), None) if m is self.ema else next(m.parameters(), None)
            if t is not None and t.device != self.device:
                m.to(self.device)

    @torch.no_grad()
    def tokens_and_inputs(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground-truth tokens gt_BL on the generator's schedule and the teacher-forcing inputs x_BLC (fp32)."""
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            tokens = self.tokenizer.img_to_tokens(img_B3HW.float(), self.patch_nums)
            x_BLC = self.tokenizer.teacher_forcing_inputs(tokens, self.patch_nums)
        return flatten_tokens(tokens), x_BLC

    # ---- strategies ----------------------------------------------------------------------------

    def _fsdp_root(self):
        if self._trainer is None:
            return None
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.trainer.strategy.model
        return model if isinstance(model, FullyShardedDataParallel) else None

    def _full_params(self, writeback: bool):
        """Gathered full parameters under FSDP (a collective: every rank must call it); a no-op otherwise."""
        root = self._fsdp_root()
        if root is None:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(root, writeback=writeback, recurse=True)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, FSDPStrategy):
            ignored = list(strategy.kwargs.get("ignored_modules") or [])
            strategy.kwargs["ignored_modules"] = ignored + [m for m in (self.tokenizer, self.ema) if m not in ignored]
        elif isinstance(strategy, DDPStrategy):
            # The EMA evolves identically on every rank and the tokenizer is constant: no per-step buffer broadcast.
            from torch.nn.parallel import DistributedDataParallel

            names = [n for n, _ in self.named_buffers() if n.startswith(("ema.", "tokenizer."))]
            names += [n for n, _ in self.named_parameters() if n.startswith("tokenizer.")]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)
        if stage == "fit" and self.trainer.gradient_clip_val is not None:
            raise ValueError(
                f"trainer.gradient_clip_val={self.trainer.gradient_clip_val} is set, but SRDDModule clips itself: "
                f"use model.init_args.grad_clip (now {self.hparams.grad_clip}) and leave trainer.gradient_clip_val unset"
            )

    def on_fit_start(self) -> None:
        self._aux_to_device()
        if int(self.ema.num_updates) == 0:  # fresh run: start the EMA from the weights as the strategy set them
            with torch.no_grad(), self._full_params(writeback=False):
                for name, p in _CleanNames(self.generator).named_parameters():
                    getattr(self.ema, EMA._key(name)).copy_(p.detach().float())

    # ---- EMA -----------------------------------------------------------------------------------

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with self._full_params(writeback=False):
            self.ema.update(_CleanNames(self.generator))

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[VARTransformer]:
        """Temporarily load the EMA weights into ``self.generator`` (all ranks must enter it under FSDP)."""
        self._aux_to_device()
        names = _CleanNames(self.generator)
        with torch.no_grad(), self._full_params(writeback=True):
            backup = {n: p.detach().clone() for n, p in names.named_parameters()}
            self.ema.copy_to(names)
        try:
            yield self.generator
        finally:
            with torch.no_grad(), self._full_params(writeback=True):
                for n, p in names.named_parameters():
                    p.copy_(backup[n])

    def sampler(self):
        """A :class:`~srdd_lightning.sampling.Sampler` over this generator and tokenizer (current weights)."""
        from srdd_lightning.sampling.sampler import Sampler

        self._aux_to_device()
        return Sampler(self.generator, self.tokenizer)

    # ---- steps ---------------------------------------------------------------------------------

    def _step_seed(self) -> int:
        # Label dropout and drop-path draw from a generator seeded by (seed, step, rank): a resumed run
        # draws exactly what the uninterrupted one would have.
        base = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        return (base * 1_000_003 + self.global_step * 7_919 + self.global_rank) % (2**63 - 1)

    def _forward_loss(self, batch, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img_B3HW, label_B = batch
        gt_BL, x_BLC = self.tokens_and_inputs(img_B3HW)
        if train:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                torch.random.default_generator.manual_seed(self._step_seed())
                if devices:
                    torch.cuda.manual_seed(self._step_seed())
                label_B = self.generator.drop_labels(label_B, p=self.hparams.cond_drop)
                logits_BLV = self.generator(label_B, x_BLC)
        else:
            logits_BLV = self.generator(label_B, x_BLC)
        ce_BL = token_cross_entropy(logits_BLV, gt_BL, self.hparams.label_smoothing)
        return ce_BL, logits_BLV, gt_BL

    def _metrics(self, prefix: str, ce_BL: torch.Tensor, logits_BLV: torch.Tensor, gt_BL: torch.Tensor):
        with torch.no_grad():
            pred_BL = logits_BLV.argmax(dim=-1)
            correct_BL = (pred_BL == gt_BL).float()
            out = {f"{prefix}/acc": correct_BL.mean()}
            for k, s in enumerate(scale_slices(self.patch_nums)):
                out[f"{prefix}/loss_s{k}"] = ce_BL[:, s].mean()
                out[f"{prefix}/acc_s{k}"] = correct_BL[:, s].mean()
            hits_V = torch.bincount(pred_BL.flatten(), minlength=logits_BLV.shape[-1]) > 0
        return out, hits_V

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ce_BL, logits_BLV, gt_BL = self._forward_loss(batch, train=True)
        loss = var_loss(ce_BL)
        metrics, hits_V = self._metrics("train", ce_BL, logits_BLV, gt_BL)
        metrics["train/codebook_share"] = hits_V.float().mean()
        metrics["train/lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        B = gt_BL.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict(metrics, batch_size=B)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._ema_ctx = contextlib.ExitStack()
        self._ema_ctx.enter_context(self.ema_weights())
        self._val_hits_V = None

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, batch, prefix: str) -> None:
        ce_BL, logits_BLV, gt_BL = self._forward_loss(batch, train=False)
        metrics, hits_V = self._metrics(prefix, ce_BL, logits_BLV, gt_BL)
        self._val_hits_V = hits_V if self._val_hits_V is None else self._val_hits_V | hits_V
        self.log(f"{prefix}/loss", var_loss(ce_BL), prog_bar=True, sync_dist=True, batch_size=gt_BL.shape[0])
        self.log_dict(metrics, sync_dist=True, batch_size=gt_BL.shape[0])

    def _eval_epoch_end(self, prefix: str) -> None:
        """Log the pass's codebook share, then put the training weights back (swapped out at epoch start)."""
        try:
            hits_V = self._val_hits_V
            if hits_V is None:  # this rank saw no batch
                hits_V = torch.zeros(self.generator.config.vocab_size, dtype=torch.bool, device=self.device)
            hits_V = self.trainer.strategy.reduce(hits_V.float(), reduce_op="sum") > 0
            # share of the codebook the (EMA) model predicts anywhere in the whole pass
            self.log(f"{prefix}/codebook_share", hits_V.float().mean(), sync_dist=True)  # equal on every rank already
            self._val_hits_V = None
        finally:
            if self._ema_ctx is not None:
                self._ema_ctx.close()
                self._ema_ctx = None

    # ---- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        named = [(n, p) for n, p in _CleanNames(self.generator).named_parameters() if p.requires_grad]
        decay = [p for n, p in named if n not in self.no_decay_names]
        no_decay = [p for n, p in named if n in self.no_decay_names]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=tuple(hp.betas),
        )  # fmt: skip
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if total is None:
            est = self.trainer.estimated_stepping_batches
            total = int(est) if math.isfinite(est) else None
        if total is not None and hp.warmup_steps >= total:
            raise ValueError(f"model.init_args.warmup_steps={hp.warmup_steps} must be below trainer.max_steps={total}")
        schedule = WarmupLinearDecay(hp.warmup_steps, total, hp.decay_to)
        # a plain function, so LambdaLR's state holds no copy of the schedule: a resumed run follows its config
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        max_norm = self.hparams.grad_clip or math.inf
        root = self._fsdp_root()
        if root is not None:
            norm = root.clip_grad_norm_(max_norm)
        else:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.log("train/grad_norm", norm)

    # ---- checkpoints: the tokenizer is referenced, not stored ---------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if _clean(k).startswith("tokenizer.")]:
            del sd[k]
        info = self.tokenizer_info
        checkpoint[CKPT_TOKENIZER_KEY] = {
            "path": info["path"], "abspath": str(Path(info["path"]).resolve()), "fingerprint": info["fingerprint"],
            "kind": info["kind"], "preset": info["preset"], "vocab_size": info["vocab_size"],
            "latent_dim": info["latent_dim"], "patch_nums": info["patch_nums"],
        }  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if _clean(k).startswith("tokenizer.")]:
            del sd[k]  # the tokenizer always comes from tokenizer_ckpt
        saved = checkpoint.get(CKPT_TOKENIZER_KEY)
        now = self.tokenizer_info
        if saved and saved.get("fingerprint") != now["fingerprint"]:
            raise ValueError(
                f"this generator was trained with the tokenizer {saved.get('path')} (weights {saved.get('fingerprint')}; "
                f"{_sizes(saved)}), but model.init_args.tokenizer_ckpt now gives {now['path']} with different weights "
                f"({now['fingerprint']}; {_sizes(now)}); point tokenizer_ckpt at the tokenizer it was trained with"
            )


def _sizes(info: dict) -> str:
    return f"vocab_size {info.get('vocab_size')}, latent_dim {info.get('latent_dim')}, patch_nums {info.get('patch_nums')}"


def _ignore_missing_tokenizer_keys(module: nn.Module, incompatible_keys) -> None:
    """Strict loading accepts checkpoints without ``tokenizer.*`` (they never hold it)."""
    keep = [k for k in incompatible_keys.missing_keys if not _clean(k).startswith("tokenizer.")]
    incompatible_keys.missing_keys[:] = keep


__all__ = ["CKPT_TOKENIZER_KEY", "SRDDModule", "WarmupLinearDecay", "token_cross_entropy", "var_loss"]
