"""Stage 1: ``TokenizerModule`` trains a multi-scale residual tokenizer (DESIGN §2.1) as a VQGAN.

One training iteration (one batch x in [-1, 1]):

    f = quant_conv(encoder(x));  f_hat, L_vq, tokens = quantizer(f);  x̂ = decoder(post_quant_conv(f_hat))
    L_rec = w_l1·|x − x̂| + w_l2·(x − x̂)² + w_lpips·LPIPS(x̂, x)
    L_G   = L_rec + w_vq·L_vq + [it ≥ gan_start]·w_gan·λ·(−D(x̂))
    L_D   = ½·(E relu(1 − D(x)) + E relu(1 + D(sg[x̂])))          hinge, trained from iteration 0

λ = ‖∇_w L_rec‖ / ‖∇_w (−D(x̂))‖ at w = the decoder's last conv (taming's adaptive weight), and
L_vq = β·‖sg[f_hat_k] − f‖² + ‖f_hat_k − sg[f]‖² on the cumulative f_hat after each scale k (the quantizer).

**One backward, two optimizer steps.** L_G's adversarial term is built with D frozen and L_D sees sg[x̂], so
L_G + L_D sends L_G's gradient only to the tokenizer and L_D's only to D: the usual alternating G/D steps (D unchanged
in the G step, the D step on the same x̂) in a single backward, so plain DDP works (no ``find_unused_parameters``, one
all-reduce per iteration). **``trainer.global_step`` counts iterations**: the discriminator steps through the raw
optimizer (fp16's GradScaler, the one thing Lightning's wrapper would add, is refused), so ``trainer.max_steps``,
``checkpoint.every_n_train_steps``, ``loss.gan_start`` and ``restarts.every`` all count iterations. D trains from
iteration 0; ``loss.gan_start`` switches on the generator's adversarial term, once D is a calibrated critic.

Validation runs on the EMA weights (``callbacks.ema``): loss terms, PSNR and SSIM (torchmetrics), per-scale codebook
usage over the whole pass (summed over ranks) and a grid of images decoded after each scale. Precision: 32 or bf16.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from srdd_lightning.callbacks.ema import ema_weights, find_ema
from srdd_lightning.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from srdd_lightning.models.perceptual import build_lpips
from srdd_lightning.models.quantizer import usage_from_hits
from srdd_lightning.models.tokenizer import MultiScaleTokenizer, TokenizerConfig
from srdd_lightning.stages.generator import INIT_FROM_OPTION, StageModule, _typed
from srdd_lightning.utils.images import image_grid, save_png
from srdd_lightning.utils.seeding import mix_seed

_SCALE_DROPOUT, _RESTART = 1, 2  # what a derived seed is for (utils.seeding.mix_seed)

# ---- options ----------------------------------------------------------------------------------


@dataclass
class TokenizerLoss:
    """Weights of the tokenizer's losses (vaex / LlamaGen's recipe by default)."""
    l1: float = 0.2
    """Pixel L1."""
    l2: float = 1.0
    """Pixel L2 (MSE)."""
    vq: float = 1.0
    """VQ loss: codebook + β·commitment on the cumulative f_hat per scale (β is tokenizer.beta)."""
    lpips: float = 1.0
    """LPIPS (VGG, torchmetrics' network); 0 turns it off (and needs no weight file)."""
    lpips_vgg_path: str | None = None
    """torchvision's vgg16-397923af.pth for LPIPS' backbone (or env SRDD_LPIPS_VGG_PATH); nothing downloads."""
    gan: float = 0.4
    """Weight of the generator's adversarial term, times the adaptive λ; 0 turns it off."""
    gan_start: int = 20_000
    """Iteration (= optimizer step) from which the generator's adversarial term is on; D trains from 0."""

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "vq", "lpips", "gan", "gan_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.init_args.loss.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DiscriminatorOptions:
    """The PatchGAN discriminator and its optimizer."""
    channels: int = 64
    """Width of its first layer."""
    layers: int = 3
    """Stride-2 layers; needs images of at least 3·2^layers px (use 2 for 16 px)."""
    lr: float | None = None
    """AdamW learning rate (null: the tokenizer's optim.lr)."""
    weight_decay: float = 0.0005
    """AdamW decoupled weight decay of its conv weights."""


@dataclass
class TokenizerOptim:
    """AdamW of the tokenizer (the betas are shared with the discriminator)."""
    lr: float = 1e-4
    """Learning rate."""
    betas: tuple[float, float] = (0.5, 0.9)
    """AdamW betas of both optimizers (GAN practice)."""
    weight_decay: float = 0.005
    """Decoupled weight decay of the conv/linear weights (not biases, norms, codebook)."""
    grad_clip: float = 10.0
    """Clip each network's gradient norm to this (0: off)."""

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"model.init_args.optim: lr must be > 0, weight_decay and grad_clip >= 0, got {self}")


@dataclass
class CodeRestarts:
    """Dead-code restarts against the early-scale codebook collapse."""
    every: int = 0
    """Every N iterations, codes hit by no token (any scale, any rank) in those N iterations are re-initialised
    from current encoder residuals, equally many candidates per scale (0: off)."""
    until: int | None = None
    """Last iteration with restarts (null: until the end), so the final iterations adapt the decoder."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"model.init_args.restarts.every must be >= 0, got {self.every}")


def _param_groups(module: nn.Module, name: str, weight_decay: float, no_decay: Sequence[nn.Parameter] = ()) -> list[dict]:
    """Weight decay on conv/linear weights only (not on biases, norms, or the codebook: decay would drag unused
    codes to 0); the group names label LearningRateMonitor's curves."""
    skip = {id(p) for p in no_decay}
    decay = [p for p in module.parameters() if p.ndim >= 2 and id(p) not in skip]
    rest = [p for p in module.parameters() if p.ndim < 2 or id(p) in skip]
    return [{"params": decay, "weight_decay": weight_decay, "name": name},
            {"params": rest, "weight_decay": 0.0, "name": f"{name}_no_decay"}]


def scale_hits(tokens: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(K, V) float hit counts per scale, ignoring -1 (dropped scales); no device sync, unlike bincount."""
    flat = [t.reshape(-1) for t in tokens]
    zeros = [torch.zeros(vocab_size, device=t.device) for t in flat]
    return torch.stack([z.scatter_add_(0, t.clamp_min(0).long(), (t >= 0).float()) for z, t in zip(zeros, flat)])


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` do not require grad inside (graphs built there give them no gradient)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


@dataclass
class GANLosses:
    """What one training forward produced: the two losses (disjoint gradients), and what logging/restarts need."""
    loss_g: torch.Tensor
    loss_d: torch.Tensor
    f_BChw: torch.Tensor
    """Encoder output (detached): candidates for dead-code restarts."""
    tokens: list[torch.Tensor]
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


# ---- the LightningModule ----------------------------------------------------------------------

_VAL_TERMS = ("l1", "l2", "vq", "lpips", "psnr", "ssim")


class TokenizerModule(StageModule, pl.LightningModule):
    """Trains a ``MultiScaleTokenizer`` (``self.tokenizer``) with L1/L2, VQ, LPIPS and a PatchGAN hinge loss.

    Checkpoint contract (the generator stage and the sampler rely on it, ``loading.load_tokenizer``):
    ``hyper_parameters.tokenizer`` holds the TokenizerConfig fields, the weights are ``state_dict["tokenizer.*"]``
    (the EMA when the run had one, the trained weights then in ``current_model_state``).

    Args:
        tokenizer: The tokenizer's architecture and quantizer (defaults: VAR's released vae_ch160v4096z32; the
            presets of ``models/tokenizer.py`` spelled out in experiments/*/tokenizer.yaml).
        image_size: Image side of the data; filled in by the CLI and checked against ``tokenizer.image_size``.
        init_from: Start from VAR's released ``vae_ch160v4096z32.pth`` (the fine-tune path) or a TokenizerModule
            checkpoint / run folder (its EMA weights), at setup; a resumed run loads its own checkpoint over it.
        loss: Loss weights and the LPIPS backbone file.
        discriminator: The PatchGAN and its optimizer.
        optim: The tokenizer's optimizer and gradient clipping.
        restarts: Dead-code restarts.
        num_grid_images: Fixed validation images in the reconstruction grid (0: no grid).
    """

    def __init__(self, tokenizer: TokenizerConfig = TokenizerConfig(), image_size: int | None = None,
                 init_from: str | None = None, loss: TokenizerLoss = TokenizerLoss(),
                 discriminator: DiscriminatorOptions = DiscriminatorOptions(), optim: TokenizerOptim = TokenizerOptim(),
                 restarts: CodeRestarts = CodeRestarts(), num_grid_images: int = 8):
        super().__init__()
        cfg = _typed(TokenizerConfig, tokenizer)
        self.loss_opts, self.disc_opts = _typed(TokenizerLoss, loss), _typed(DiscriminatorOptions, discriminator)
        self.optim, self.restarts = _typed(TokenizerOptim, optim), _typed(CodeRestarts, restarts)
        self.save_hyperparameters()
        for name, value in (("tokenizer", cfg), ("loss", self.loss_opts), ("discriminator", self.disc_opts),
                            ("optim", self.optim), ("restarts", self.restarts)):  # fmt: skip
            self.hparams[name] = dataclasses.asdict(value)  # plain values: the checkpoint loads with weights_only
        self.automatic_optimization = False
        if image_size is not None and image_size != cfg.image_size:
            raise ValueError(f"model.init_args.image_size={image_size} (the data's image size) disagrees with "
                             f"model.init_args.tokenizer.image_size={cfg.image_size}; pack or resize the data "
                             f"(data.resolution) to {cfg.image_size} px, or set tokenizer.image_size (and a matching "
                             "tokenizer.patch_nums)")
        if num_grid_images < 0:
            raise ValueError(f"model.init_args.num_grid_images must be >= 0, got {num_grid_images}")
        disc_min = 3 * 2**self.disc_opts.layers
        if cfg.image_size < disc_min:
            raise ValueError(f"model.init_args.discriminator.layers={self.disc_opts.layers} needs images of at least "
                             f"{disc_min} px, but model.init_args.tokenizer.image_size is {cfg.image_size}; lower "
                             "discriminator.layers")

        self.tokenizer = MultiScaleTokenizer(cfg)
        self.discriminator = PatchDiscriminator(cfg.image_channels, self.disc_opts.channels, self.disc_opts.layers)
        # Code hits since the last restart, summed over ranks (identical on every rank, so DDP's buffer broadcast is harmless).
        self.register_buffer("window_hits", torch.zeros(cfg.vocab_size))
        self._seed = torch.initial_seed()  # seed_everything's seed: varies the dropout/restart draws per run
        self._weights_set = False
        self.val_metrics = nn.ModuleDict({n: MeanMetric() for n in _VAL_TERMS if n != "lpips" or self.loss_opts.lpips > 0})
        self._val_hits: torch.Tensor | None = None
        self._grid_images: torch.Tensor | None = None
        self.flops_per_batch = None  # callbacks.Throughput: samples/s only (no FLOP model of the VQGAN)
        # LPIPS is frozen and external: deliberately not a registered submodule, so its ~15 M VGG weights stay
        # out of checkpoints (and of the EMA's copy), and loading a checkpoint does not need the weight file.
        object.__setattr__(self, "_lpips", None)

    @property
    def iteration(self) -> int:
        """Training iterations done (batches) = trainer.global_step, restored on resume."""
        return self.global_step

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.tokenizer.patch_nums

    def setup(self, stage: str) -> None:
        if self._trainer is not None and str(self.trainer.precision) in ("16-mixed", "16"):
            raise ValueError(f"trainer.precision={self.trainer.precision} is not supported by TokenizerModule: fp16's "
                             "GradScaler cannot be shared by its two optimizers after one backward; use bf16-mixed or "
                             "32-true")
        if self.hparams.init_from and not self._weights_set:
            self.load_initial_weights(self.hparams.init_from)
        if self.loss_opts.lpips > 0 and self._lpips is None:
            object.__setattr__(self, "_lpips", build_lpips(self.loss_opts.lpips_vgg_path))

    @torch.no_grad()
    def load_initial_weights(self, path: str) -> None:
        """Load VAR's ``vae_ch160v4096z32.pth`` or a TokenizerModule checkpoint (EMA weights) into the tokenizer."""
        from srdd_lightning.loading import is_tokenizer_module_checkpoint, read_checkpoint, stage_state
        from srdd_lightning.models.var_import import convert_var_vae_state_dict

        file, ckpt = read_checkpoint(path, INIT_FROM_OPTION)
        if is_tokenizer_module_checkpoint(ckpt):
            state, what = stage_state(ckpt, "tokenizer.", ema=True), f"the TokenizerModule checkpoint {file}"
        elif isinstance(ckpt, dict) and "quantize.embedding.weight" in ckpt:
            state, what = convert_var_vae_state_dict(ckpt, self.tokenizer), f"VAR's tokenizer weights {file}"
        else:
            raise ValueError(f"{file} ({INIT_FROM_OPTION}) is neither a TokenizerModule checkpoint nor VAR's "
                             f"vae_ch160v4096z32.pth")  # fmt: skip
        try:
            self.tokenizer.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{what} ({INIT_FROM_OPTION}) does not fit model.init_args.tokenizer: {e}") from e
        self._weights_set = True

    def _perceptual(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS (B,) of images in [-1, 1] (torchmetrics' network, which expects that range)."""
        if self._lpips is None:  # built in setup(); a module used outside a Trainer builds it on first use
            object.__setattr__(self, "_lpips", build_lpips(self.loss_opts.lpips_vgg_path))
        if next(self._lpips.parameters()).device != x_B3HW.device:
            self._lpips.to(x_B3HW.device)
        return self._lpips(x_B3HW, y_B3HW, normalize=False).flatten()

    # ----- losses --------------------------------------------------------------------------------

    def scale_keep(self, batch: int, iteration: int) -> torch.Tensor:
        """Scale-dropout mask drawn from a generator seeded by (run, iteration, rank): a resumed run draws the same."""
        rank = self.global_rank if self._trainer is not None else 0
        gen = torch.Generator().manual_seed(mix_seed(self._seed, _SCALE_DROPOUT, iteration, rank))
        return self.tokenizer.quantizer.draw_scale_keep(batch, self.device, generator=gen)

    def gan_losses(self, img_B3HW: torch.Tensor, iteration: int) -> GANLosses:
        """L_G (to the tokenizer only) and L_D (to the discriminator only) for one batch; see the module docstring."""
        w, tok = self.loss_opts, self.tokenizer
        f_BChw = tok.encode(img_B3HW)
        q = tok.quantizer(f_BChw, keep_BK=self.scale_keep(img_B3HW.shape[0], iteration))
        rec_B3HW = tok.decode(q.f_hat, clamp=False)

        l1 = (rec_B3HW - img_B3HW).abs().mean()
        l2 = (rec_B3HW - img_B3HW).square().mean()
        rec_loss = w.l1 * l1 + w.l2 * l2
        logs = {"l1": l1.detach(), "l2": l2.detach(), "vq": q.vq_loss.detach()}
        if w.lpips > 0:
            lp = self._perceptual(rec_B3HW, img_B3HW).mean()
            rec_loss = rec_loss + w.lpips * lp
            logs["lpips"] = lp.detach()
        loss_g = rec_loss + w.vq * q.vq_loss

        zero = rec_loss.new_zeros(())
        g_adv, lam = zero, zero
        if w.gan > 0 and iteration >= w.gan_start:
            with _frozen(self.discriminator):  # the adversarial term must not train D
                g_adv = hinge_g_loss(self.discriminator(rec_B3HW))
            lam = adaptive_gan_weight(rec_loss, g_adv, tok.last_layer)
            loss_g = loss_g + w.gan * lam * g_adv

        # D on real and sg[x̂] in one batch (GroupNorm is per sample, so this equals two calls).
        logits = self.discriminator(torch.cat([img_B3HW, rec_B3HW.detach()]))
        logits_real, logits_fake = logits.chunk(2)
        loss_d = hinge_d_loss(logits_real, logits_fake)
        logs.update(
            rec=rec_loss.detach(), g_adv=g_adv.detach(), adaptive_weight=lam, gan_weight=w.gan * lam,
            loss_g=loss_g.detach(), loss_d=loss_d.detach(), d_real=logits_real.detach().mean(), d_fake=logits_fake.detach().mean(),
        )  # fmt: skip
        return GANLosses(loss_g, loss_d, f_BChw.detach(), q.tokens, logs)

    # ----- training ------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> None:
        img_B3HW = batch[0]
        it = self.global_step
        opt_g, opt_d = self.optimizers()
        out = self.gan_losses(img_B3HW, it)
        opt_g.zero_grad()
        opt_d.zero_grad()
        self.manual_backward(out.loss_g + out.loss_d)  # disjoint gradients: see the module docstring
        if (clip := self.optim.grad_clip) > 0:
            for opt in (opt_g, opt_d):
                self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_g.step()
        opt_d.optimizer.step()  # the raw optimizer: global_step counts iterations (see the module docstring)
        if self.restarts.every > 0:
            out.logs["restarted_codes"] = self._track_and_restart_codes(out, it, opt_g.optimizer)
        self.log_dict({f"train/{k}": v for k, v in out.logs.items()})
        self.log_dict({"loss_g": out.logs["loss_g"], "loss_d": out.logs["loss_d"]}, prog_bar=True, logger=False)

    @torch.no_grad()
    def _track_and_restart_codes(self, out: GANLosses, iteration: int, opt_g: torch.optim.Optimizer) -> torch.Tensor:
        """Accumulate code hits (summed over ranks); every ``restarts.every`` iterations re-seed the unused codes."""
        r, q = self.restarts, self.tokenizer.quantizer
        self.window_hits += self.trainer.strategy.reduce(scale_hits(out.tokens, q.vocab_size).sum(0), reduce_op="sum")
        n_restarted = torch.zeros((), device=self.device)
        due = (iteration + 1) % r.every == 0 and (r.until is None or iteration <= r.until)
        if not due:
            return n_restarted
        dead_V = self.window_hits == 0
        pool_NC = self._restart_candidates(out.f_BChw, iteration)
        gen = torch.Generator().manual_seed(mix_seed(self._seed, _RESTART, iteration))
        n = q.restart_dead_codes(dead_V, pool_NC, generator=gen)
        if n:
            # The EMA and Adam's moments of a restarted code describe the dead one: start them from the new code.
            weight = q.codebook.weight
            ema = find_ema(self._trainer)
            if ema is not None and hasattr(ema, "parameter"):
                ema.parameter("tokenizer.quantizer.codebook.weight")[dead_V] = weight[dead_V]
            for moment in opt_g.state.get(weight, {}).values():
                if torch.is_tensor(moment) and moment.shape == weight.shape:
                    moment[dead_V] = 0
        self.window_hits.zero_()
        return n_restarted.fill_(n)

    def _restart_candidates(self, f_BChw: torch.Tensor, iteration: int) -> torch.Tensor:
        """Residuals the quantizer saw at each scale (area_down(f − f_hat_{<k}, pn_k)), ≤ ⌈V/K⌉ per scale and rank,
        gathered over ranks so that every rank restarts the same codes to the same vectors."""
        q = self.tokenizer.quantizer
        cap = math.ceil(q.vocab_size / len(q.patch_nums))
        gen = torch.Generator().manual_seed(mix_seed(self._seed, _RESTART, iteration, 1))
        z_NC = [z_BChw.permute(0, 2, 3, 1).reshape(-1, q.dim) for z_BChw in q.quantize(f_BChw).residuals]
        picked = [z[torch.randperm(z.shape[0], generator=gen)[:cap].to(z.device)] for z in z_NC]  # one draw per scale
        return self.all_gather(torch.cat(picked)).reshape(-1, q.dim)

    def configure_optimizers(self):
        o, d = self.optim, self.disc_opts
        g_groups = _param_groups(self.tokenizer, "tokenizer", o.weight_decay, [self.tokenizer.quantizer.codebook.weight])
        d_groups = _param_groups(self.discriminator, "discriminator", d.weight_decay)
        opt_g = torch.optim.AdamW(g_groups, lr=o.lr, betas=o.betas)
        opt_d = torch.optim.AdamW(d_groups, lr=o.lr if d.lr is None else d.lr, betas=o.betas)
        return opt_g, opt_d

    # ----- validation (EMA weights, swapped in by the EMA callback) -------------------------------

    def ema_weights(self):
        """The EMA weights in ``self.tokenizer`` inside the block (the FID callback's reconstruct mode uses it)."""
        return ema_weights(self)

    def on_validation_epoch_start(self) -> None:
        self._val_hits = torch.zeros(len(self.patch_nums), self.tokenizer.vocab_size, device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        img_B3HW = batch[0]
        tok = self.tokenizer
        q = tok.quantizer(tok.encode(img_B3HW))  # eval mode: no scale dropout
        rec_B3HW = tok.decode(q.f_hat, clamp=False)
        x01, y01 = (rec_B3HW.clamp(-1, 1) + 1) / 2, (img_B3HW + 1) / 2  # PSNR / SSIM on the [0, 1] scale, as customary
        terms = {
            "l1": (rec_B3HW - img_B3HW).abs().flatten(1).mean(1),
            "l2": (rec_B3HW - img_B3HW).square().flatten(1).mean(1),
            "vq": q.vq_loss.expand(img_B3HW.shape[0]),
            "psnr": peak_signal_noise_ratio(x01, y01, data_range=1.0, reduction="none", dim=(1, 2, 3)),
            "ssim": structural_similarity_index_measure(x01, y01, data_range=1.0, reduction="none"),
        }
        if "lpips" in self.val_metrics:
            terms["lpips"] = self._perceptual(rec_B3HW, img_B3HW)
        for name, value_B in terms.items():
            self.val_metrics[name].update(value_B.detach().float())
        self._val_hits += scale_hits(q.tokens, tok.vocab_size)
        if batch_idx == 0 and self.hparams.num_grid_images > 0:
            self._grid_images = img_B3HW[: self.hparams.num_grid_images].detach().clone()

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{n}": m.compute() for n, m in self.val_metrics.items()}  # torchmetrics syncs over ranks
        # how many images (over all ranks) produced these numbers
        metrics["val/num_images"] = self.trainer.strategy.reduce(self.val_metrics["l1"].weight.clone(), reduce_op="sum")
        for m in self.val_metrics.values():
            m.reset()
        hits_KV = self.trainer.strategy.reduce(self._val_hits, reduce_op="sum")
        usage = usage_from_hits(hits_KV)
        names = {"usage_of_possible": "of_possible", "usage": "of_V", "perplexity": "perplexity", "used": "used",
                 "max_possible": "max_possible"}  # fmt: skip
        for pn, u, n in zip(self.patch_nums, usage, hits_KV.sum(1)):
            metrics[f"val_usage/{pn}x{pn}/tokens"] = n
            metrics.update({f"val_usage/{pn}x{pn}/{name}": u[key] for key, name in names.items()})
        metrics["val_usage/min_of_possible"] = min(u["usage_of_possible"] for u in usage)
        self.log_dict(metrics, sync_dist=False)  # already reduced: identical on every rank
        self.log("val_psnr", metrics["val/psnr"], prog_bar=True, logger=False)
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # a collective: every rank asks
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and self._grid_images is not None:
            from srdd_lightning.callbacks.samples import log_image

            grid = self.reconstruction_grid(self._grid_images)  # to the loggers and <run>/reconstructions/step_<k>.png
            save_png(grid, run_dir / "reconstructions" / f"step_{self.global_step}.png")
            log_image(self.trainer, "val/reconstruction", grid, self.global_step)

    @torch.no_grad()
    def reconstruction_grid(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H', W') grid, one row per image: input | decoded f_hat after scale 1 | … | after all K (final)."""
        tok = self.tokenizer
        fhats = tok.tokens_to_fhat(tok.img_to_tokens(img_B3HW), cumulative=True)
        cols = [img_B3HW] + [tok.decode(f) for f in fhats]
        x = torch.stack(cols, dim=1).flatten(0, 1)
        return image_grid(x, nrow=len(cols), upscale=max(1, 64 // img_B3HW.shape[-1]))


__all__ = ["CodeRestarts", "DiscriminatorOptions", "GANLosses", "TokenizerLoss", "TokenizerModule", "TokenizerOptim",
           "scale_hits"]  # fmt: skip
