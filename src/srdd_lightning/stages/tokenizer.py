"""Stage 1: ``TokenizerModule`` trains a multi-scale residual tokenizer (DESIGN §2.1) as a VQGAN.

One training iteration (one batch x in [-1, 1]):

    f = quant_conv(encoder(x));  f_hat, L_vq, tokens = quantizer(f);  x̂ = decoder(post_quant_conv(f_hat))
    L_rec = w_l1·|x − x̂| + w_l2·(x − x̂)² + w_lpips·LPIPS(x̂, x)
    L_G   = L_rec + w_vq·L_vq + [it ≥ disc_start]·w_disc·λ·(−D(x̂))
    L_D   = ½·(E relu(1 − D(x)) + E relu(1 + D(sg[x̂])))          hinge, trained from iteration 0

λ = ‖∇_w L_rec‖ / ‖∇_w (−D(x̂))‖ at w = the decoder's last conv (taming's adaptive weight), and
L_vq = β·‖sg[f_hat_k] − f‖² + ‖f_hat_k − sg[f]‖² on the cumulative f_hat after each scale k (the quantizer).

**One backward, two optimizer steps.** L_G's adversarial term is built with D's parameters frozen and L_D
sees sg[x̂], so L_G + L_D sends L_G's gradient only to the tokenizer and L_D's only to D: one backward, then
``opt_g.step()`` and ``opt_d.step()``. That is the same update as the usual alternating G-step/D-step
(D is unchanged during the G step, and the D step uses the same x̂), but every parameter receives its
gradient in the single backward, so plain DDP works (no ``find_unused_parameters``) and gradients are
all-reduced once per iteration. Both optimizers step every iteration, from the first:
**``trainer.global_step`` = 2 × iterations, so ``trainer.max_steps`` and
``checkpoint.every_n_train_steps`` count 2 per iteration**; ``val_check_interval`` and ``log_every_n_steps``
count iterations. The module keeps its own iteration counter (the ``train_iter`` buffer, checkpointed) for
``disc_start``, code restarts and image logging.

**The discriminator trains from iteration 0**; ``disc_start`` switches on the generator's adversarial term.
The alternatives were worse: multiplying L_D by 0 still moves D (AdamW's decoupled weight decay) and its
Adam state, and skipping D's step would make ``global_step`` count 1 then 2 per iteration. Training D
early is a warm-up: by ``disc_start`` it is a calibrated critic, and λ scales its gradient to the
reconstruction's anyway.

Validation runs on the EMA weights: loss terms, PSNR, SSIM, per-scale codebook usage over the whole pass
(hit counts summed over ranks), and a grid of fixed validation images decoded after each scale.
Precision: 32 or bf16-mixed; fp16-mixed (a GradScaler shared by two optimizers after one backward) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from srdd_lightning.models.discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss
from srdd_lightning.models.ema import EMA
from srdd_lightning.models.lpips import LPIPS
from srdd_lightning.models.quantizer import usage_from_hits
from srdd_lightning.models.tokenizer import MultiScaleTokenizer, tokenizer_config
from srdd_lightning.models.var_import import convert_var_vae_state_dict
from srdd_lightning.utils.images import image_grid

INIT_FROM_OPTION = "model.init_args.init_from"

# ---------------------------------------------------------------------------------------------
# Image quality (images in [-1, 1], compared on the [0, 1] scale as is customary)
# ---------------------------------------------------------------------------------------------


def psnr(x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, 10·log10(1 / MSE) on the [0, 1] scale; (B,)."""
    mse_B = ((x_B3HW.float() - y_B3HW.float()) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse_B.clamp_min(1e-12))


def _gaussian_kernel(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    x_B3HW: torch.Tensor, y_B3HW: torch.Tensor, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) on the [0, 1] scale; (B,).

    Gaussian window (11, σ 1.5; shrunk to the image side for small images), statistics over 'valid'
    windows, SSIM map = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)), C_i = (k_i·1)²,
    averaged over channels and positions.
    """
    x = (x_B3HW.float() + 1) / 2
    y = (y_B3HW.float() + 1) / 2
    B, C, H, W = x.shape
    win = min(window, H, W)
    win -= 1 - win % 2  # odd
    kernel = _gaussian_kernel(win, sigma, x.device).expand(C, 1, win, win)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=C)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean((1, 2, 3))


def scale_hits(tokens: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(K, V) float hit counts per scale, ignoring -1 (dropped scales); no device sync, unlike bincount."""
    rows = []
    for t in tokens:
        t = t.reshape(-1)
        rows.append(torch.zeros(vocab_size, device=t.device).scatter_add_(0, t.clamp_min(0).long(), (t >= 0).float()))
    return torch.stack(rows)


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


def _param_groups(module: nn.Module, weight_decay: float, no_decay: Sequence[nn.Parameter] = ()) -> list[dict]:
    """Weight decay on conv/linear weights only (not on biases, norms, or the codebook: decay would drag unused codes to 0)."""
    skip = {id(p) for p in no_decay}
    decay = [p for p in module.parameters() if p.ndim >= 2 and id(p) not in skip]
    rest = [p for p in module.parameters() if p.ndim < 2 or id(p) in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@dataclass
class GANLosses:
    """What one training forward produced: the two losses (disjoint gradients), and what logging/restarts need."""

    loss_g: torch.Tensor
    loss_d: torch.Tensor
    f_BChw: torch.Tensor
    """Encoder output (detached): candidates for dead-code restarts."""
    tokens: list[torch.Tensor]
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------


class TokenizerModule(pl.LightningModule):
    """Trains a ``MultiScaleTokenizer`` (``self.tokenizer``) with L1/L2, VQ, LPIPS and a PatchGAN hinge loss.

    Checkpoint contract (the generator stage and the sampler rely on it): ``hyper_parameters`` holds
    ``preset`` and ``overrides`` (rebuild with ``build_tokenizer(preset, **overrides)``), the weights are
    ``state_dict["tokenizer.*"]`` and their EMA ``state_dict["ema.shadow__<param name, '.' -> '__'>"]``.
    """

    def __init__(
        self,
        preset: str,
        overrides: dict[str, Any] | None = None,
        image_size: int | None = None,
        init_from: str | None = None,
        l1_weight: float = 0.2,
        l2_weight: float = 1.0,
        vq_weight: float = 1.0,
        lpips_weight: float = 1.0,
        lpips_vgg_path: str | None = None,
        lpips_heads_path: str | None = None,
        disc_weight: float = 0.4,
        disc_start: int = 20_000,
        disc_channels: int = 64,
        disc_layers: int = 3,
        lr: float = 1e-4,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.005,
        disc_weight_decay: float = 0.0005,
        grad_clip: float = 10.0,
        ema_decay: float = 0.9999,
        restart_every: int = 0,
        restart_until: int | None = None,
        num_grid_images: int = 8,
    ):
        """Build the tokenizer, its discriminator and its EMA.

        Args:
            preset: Tokenizer preset (``var-vae-f16``, ``digits``, ``tiny``, ``tiny-16``; models/tokenizer.py).
            overrides: TokenizerConfig fields replacing the preset's, e.g. ``{vocab_size: 256, lookup: cosine,
                scale_dropout: 0.1}``. Stored in the checkpoint with ``preset``.
            image_size: Image side of the data; filled in by the CLI from the data and checked against the
                preset's ``image_size`` (leave unset).
            init_from: Start from these weights instead of a random init: VAR's released
                ``vae_ch160v4096z32.pth`` (preset ``var-vae-f16``; the fine-tune path) or a TokenizerModule
                checkpoint (its EMA weights). Applied at setup; a resumed run then loads its own checkpoint over it.
            l1_weight: Weight of the pixel L1 loss.
            l2_weight: Weight of the pixel L2 (MSE) loss.
            vq_weight: Weight of the VQ loss (codebook + β·commitment on the cumulative f_hat per scale; β is
                the TokenizerConfig field ``beta``).
            lpips_weight: Weight of the LPIPS (VGG) perceptual loss; 0 turns it off (and needs no weight files).
            lpips_vgg_path: torchvision's ``vgg16-397923af.pth`` (or env SRDD_LPIPS_VGG_PATH); nothing downloads.
            lpips_heads_path: LPIPS' linear heads ``vgg.pth`` v0.1 (or env SRDD_LPIPS_HEADS_PATH).
            disc_weight: Weight of the generator's adversarial term, times the adaptive λ; 0 turns it off.
            disc_start: Training iteration (not optimizer step) from which the generator's adversarial term is on.
            disc_channels: Width of the PatchGAN's first layer.
            disc_layers: Stride-2 layers of the PatchGAN; needs image_size >= 3·2^disc_layers (2 for 16 px).
            lr: AdamW learning rate of the tokenizer.
            disc_lr: AdamW learning rate of the discriminator (default: ``lr``).
            betas: AdamW betas of both optimizers (GAN practice: (0.5, 0.9)).
            weight_decay: Decoupled weight decay of the tokenizer's conv/linear weights (not biases, norms, codebook).
            disc_weight_decay: The same for the discriminator.
            grad_clip: Clip each network's gradient norm to this (0: off).
            ema_decay: Decay of the EMA of the tokenizer's weights (validated, sampled and exported).
            restart_every: Every N iterations, codes hit by no token (any scale, any rank) during those N iterations
                are re-initialised from current encoder residuals, equally many candidates per scale (0: off).
            restart_until: Last iteration at which restarts happen (None: until the end), so the final
                iterations adapt the decoder to a settled codebook.
            num_grid_images: Fixed validation images in the reconstruction grid (0: no grid).
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        cfg = tokenizer_config(preset, **(overrides or {}))
        if image_size is not None and image_size != cfg.image_size:
            raise ValueError(
                f"model.init_args.image_size={image_size} (the data's image size) disagrees with the tokenizer's "
                f"image_size={cfg.image_size} (model.init_args.preset={preset!r} with model.init_args.overrides="
                f"{overrides or {}}); pack or resize the data (data.resolution) to {cfg.image_size} px, or set "
                f"overrides.image_size (and a matching overrides.patch_nums)"
            )
        non_negative = ("l1_weight", "l2_weight", "vq_weight", "lpips_weight", "disc_weight", "disc_start", "weight_decay",
                        "disc_weight_decay", "grad_clip", "restart_every", "num_grid_images")  # fmt: skip
        for name in non_negative:
            if getattr(self.hparams, name) < 0:
                raise ValueError(f"model.init_args.{name} must be >= 0, got {getattr(self.hparams, name)}")
        disc_min = 3 * 2**disc_layers
        if cfg.image_size < disc_min:
            raise ValueError(
                f"model.init_args.disc_layers={disc_layers} needs images of at least {disc_min} px, but the tokenizer's "
                f"image_size is {cfg.image_size}; lower disc_layers"
            )

        self.tokenizer = MultiScaleTokenizer(cfg)
        self.discriminator = PatchDiscriminator(cfg.image_channels, disc_channels, disc_layers)
        self.ema = EMA(self.tokenizer, decay=ema_decay)
        # Iterations done (global_step counts optimizer steps: 2 per iteration).
        self.register_buffer("train_iter", torch.zeros((), dtype=torch.long))
        # Code hits since the last restart, summed over ranks (identical on every rank, so DDP's buffer broadcast is harmless).
        self.register_buffer("window_hits", torch.zeros(cfg.vocab_size))
        self._iter = 0  # python mirror of train_iter (no device sync per iteration)
        self._seed = torch.initial_seed() % 2**31  # seed_everything's seed: varies the dropout/restart draws per run
        self._weights_set = False
        self._ema_swap: ExitStack | None = None
        self._val_sums: dict[str, torch.Tensor] = {}
        self._val_hits: torch.Tensor | None = None
        self._grid_images: torch.Tensor | None = None
        # LPIPS is frozen and external: deliberately not a registered submodule, so its ~15 M VGG weights stay
        # out of checkpoints and loading a checkpoint does not need the weight files.
        object.__setattr__(self, "_lpips", None)

    # ----- properties ----------------------------------------------------------------------------

    @property
    def iteration(self) -> int:
        """Training iterations done (batches), restored on resume; global_step is 2 × this."""
        return self._iter

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.tokenizer.patch_nums

    # ----- setup: precision, initial weights, LPIPS ----------------------------------------------

    def setup(self, stage: str) -> None:
        if self._trainer is not None and str(self.trainer.precision) in ("16-mixed", "16"):
            raise ValueError(
                f"trainer.precision={self.trainer.precision} is not supported by TokenizerModule: fp16's GradScaler "
                f"cannot be shared by its two optimizers after one backward; use bf16-mixed or 32-true"
            )
        if self.hparams.init_from and not self._weights_set:
            self.load_initial_weights(self.hparams.init_from)
        if self.hparams.lpips_weight > 0 and self._lpips is None:
            object.__setattr__(self, "_lpips", LPIPS(self.hparams.lpips_vgg_path, self.hparams.lpips_heads_path))

    @torch.no_grad()
    def load_initial_weights(self, path: str) -> None:
        """Load VAR's ``vae_ch160v4096z32.pth`` or a TokenizerModule checkpoint (EMA weights) into the tokenizer; reset the EMA."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"init_from file not found: {str(p)!r} (set by `{INIT_FROM_OPTION}`); give VAR's vae_ch160v4096z32.pth "
                f"or a TokenizerModule checkpoint. Nothing is downloaded."
            )
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "state_dict" in obj and "preset" in (obj.get("hyper_parameters") or {}):
            sd = obj["state_dict"]
            state = {k[len("tokenizer.") :]: v for k, v in sd.items() if k.startswith("tokenizer.")}
            for name, _ in self.tokenizer.named_parameters():
                state[name] = sd.get(f"ema.{EMA._key(name)}", state.get(name))
            what = f"the TokenizerModule checkpoint {str(p)!r} (preset {obj['hyper_parameters']['preset']!r})"
        elif isinstance(obj, dict):
            what = f"VAR's tokenizer weights {str(p)!r} (`{INIT_FROM_OPTION}`)"
            try:
                state = convert_var_vae_state_dict(obj, self.tokenizer)
            except ValueError as e:
                raise ValueError(f"{what} do not fit model.init_args.preset={self.hparams.preset!r}: {e}") from e
        else:
            raise ValueError(f"{str(p)!r} (`{INIT_FROM_OPTION}`) holds neither a state dict nor a Lightning checkpoint")
        try:
            self.tokenizer.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"{what} does not fit this tokenizer (model.init_args.preset={self.hparams.preset!r}, overrides="
                f"{self.hparams.overrides or {}}): {e}"
            ) from e
        self.ema = EMA(self.tokenizer, decay=self.hparams.ema_decay)
        self._weights_set = True

    def _perceptual(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        if self._lpips is None:  # built in setup(); a module used outside a Trainer builds it on first use
            object.__setattr__(self, "_lpips", LPIPS(self.hparams.lpips_vgg_path, self.hparams.lpips_heads_path))
        if self._lpips.shift.device != x_B3HW.device:
            self._lpips.to(x_B3HW.device)
        return self._lpips(x_B3HW, y_B3HW)

    # ----- losses --------------------------------------------------------------------------------

    def scale_keep(self, batch: int, iteration: int) -> torch.Tensor:
        """Scale-dropout mask drawn from a generator seeded by (iteration, rank): a resumed run draws the same."""
        rank = self.global_rank if self._trainer is not None else 0
        gen = torch.Generator().manual_seed(self._seed + 1_000_003 * iteration + rank)
        return self.tokenizer.quantizer.draw_scale_keep(batch, self.device, generator=gen)

    def gan_losses(self, img_B3HW: torch.Tensor, iteration: int) -> GANLosses:
        """L_G (to the tokenizer only) and L_D (to the discriminator only) for one batch; see the module docstring."""
        hp, tok = self.hparams, self.tokenizer
        f_BChw = tok.encode(img_B3HW)
        q = tok.quantizer(f_BChw, keep_BK=self.scale_keep(img_B3HW.shape[0], iteration))
        rec_B3HW = tok.decode(q.f_hat, clamp=False)

        l1 = (rec_B3HW - img_B3HW).abs().mean()
        l2 = (rec_B3HW - img_B3HW).square().mean()
        rec_loss = hp.l1_weight * l1 + hp.l2_weight * l2
        logs = {"l1": l1.detach(), "l2": l2.detach(), "vq": q.vq_loss.detach()}
        if hp.lpips_weight > 0:
            lp = self._perceptual(rec_B3HW, img_B3HW).mean()
            rec_loss = rec_loss + hp.lpips_weight * lp
            logs["lpips"] = lp.detach()
        loss_g = rec_loss + hp.vq_weight * q.vq_loss

        zero = rec_loss.new_zeros(())
        g_adv, lam = zero, zero
        if hp.disc_weight > 0 and iteration >= hp.disc_start:
            with _frozen(self.discriminator):  # the adversarial term must not train D
                g_adv = hinge_g_loss(self.discriminator(rec_B3HW))
            lam = adaptive_gan_weight(rec_loss, g_adv, tok.last_layer)
            loss_g = loss_g + hp.disc_weight * lam * g_adv

        # D on real and sg[x̂] in one batch (GroupNorm is per sample, so this equals two calls).
        logits = self.discriminator(torch.cat([img_B3HW, rec_B3HW.detach()]))
        logits_real, logits_fake = logits.chunk(2)
        loss_d = hinge_d_loss(logits_real, logits_fake)
        logs.update(
            rec=rec_loss.detach(), g_adv=g_adv.detach(), adaptive_weight=lam, gan_weight=hp.disc_weight * lam,
            loss_g=loss_g.detach(), loss_d=loss_d.detach(), d_real=logits_real.detach().mean(), d_fake=logits_fake.detach().mean(),
        )  # fmt: skip
        return GANLosses(loss_g, loss_d, f_BChw.detach(), q.tokens, logs)

    # ----- training ------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        self._iter = int(self.train_iter)  # after a resume restored the buffer

    def training_step(self, batch, batch_idx: int) -> None:
        img_B3HW = batch[0]
        it = self._iter
        opt_g, opt_d = self.optimizers()
        out = self.gan_losses(img_B3HW, it)
        opt_g.zero_grad()
        opt_d.zero_grad()
        self.manual_backward(out.loss_g + out.loss_d)  # disjoint gradients: see the module docstring
        for opt in (opt_g, opt_d):
            if self.hparams.grad_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
        self.ema.update(self.tokenizer)
        if self.hparams.restart_every > 0:
            out.logs["restarted_codes"] = self._track_and_restart_codes(out, it, opt_g.optimizer)

        self._iter = it + 1
        self.train_iter.fill_(self._iter)
        logs = {f"train/{k}": v for k, v in out.logs.items()}
        logs["lr/tokenizer"] = opt_g.param_groups[0]["lr"]
        logs["lr/discriminator"] = opt_d.param_groups[0]["lr"]
        self.log_dict(logs)
        self.log_dict({"loss_g": out.logs["loss_g"], "loss_d": out.logs["loss_d"]}, prog_bar=True, logger=False)

    @torch.no_grad()
    def _track_and_restart_codes(self, out: GANLosses, iteration: int, opt_g: torch.optim.Optimizer) -> torch.Tensor:
        """Accumulate code hits (summed over ranks); every ``restart_every`` iterations re-seed the unused codes."""
        hp, q = self.hparams, self.tokenizer.quantizer
        self.window_hits += self.trainer.strategy.reduce(scale_hits(out.tokens, q.vocab_size).sum(0), reduce_op="sum")
        n_restarted = torch.zeros((), device=self.device)
        due = (iteration + 1) % hp.restart_every == 0 and (hp.restart_until is None or iteration <= hp.restart_until)
        if not due:
            return n_restarted
        dead_V = self.window_hits == 0
        pool_NC = self._restart_candidates(out.f_BChw, iteration)
        n = q.restart_dead_codes(dead_V, pool_NC, generator=torch.Generator().manual_seed(self._seed + iteration))
        if n:
            # The EMA and Adam's moments of a restarted code describe the dead one: start them from the new code.
            weight = q.codebook.weight
            getattr(self.ema, EMA._key("quantizer.codebook.weight"))[dead_V] = weight[dead_V].float()
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
        gen = torch.Generator().manual_seed(self._seed + iteration)
        per_scale = []
        for z_BChw in q.quantize(f_BChw).residuals:
            z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, q.dim)
            pick = torch.randperm(z_NC.shape[0], generator=gen)[:cap]
            per_scale.append(z_NC[pick.to(z_NC.device)])
        return self.all_gather(torch.cat(per_scale)).reshape(-1, q.dim)

    def configure_optimizers(self):
        hp = self.hparams
        betas = tuple(hp.betas)
        g_groups = _param_groups(self.tokenizer, hp.weight_decay, no_decay=[self.tokenizer.quantizer.codebook.weight])
        d_groups = _param_groups(self.discriminator, hp.disc_weight_decay)
        opt_g = torch.optim.AdamW(g_groups, lr=hp.lr, betas=betas)
        opt_d = torch.optim.AdamW(d_groups, lr=hp.lr if hp.disc_lr is None else hp.disc_lr, betas=betas)
        return opt_g, opt_d

    # ----- validation (EMA weights) --------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._ema_swap = ExitStack()
        self._ema_swap.enter_context(self.ema.swapped(self.tokenizer))
        # The same keys on every rank, even one without batches: they are reduced together at the end.
        names = ["count", "l1", "l2", "vq", "psnr", "ssim"] + (["lpips"] if self.hparams.lpips_weight > 0 else [])
        self._val_sums = {n: torch.zeros((), device=self.device) for n in names}
        self._val_hits = torch.zeros(len(self.patch_nums), self.tokenizer.vocab_size, device=self.device)

    def _add(self, name: str, value_B: torch.Tensor) -> None:
        self._val_sums[name] += value_B.detach().float().sum()

    def validation_step(self, batch, batch_idx: int) -> None:
        img_B3HW = batch[0]
        tok, B = self.tokenizer, img_B3HW.shape[0]
        q = tok.quantizer(tok.encode(img_B3HW))  # eval mode: no scale dropout
        rec_B3HW = tok.decode(q.f_hat, clamp=False)
        out_B3HW = rec_B3HW.clamp(-1, 1)
        self._add("count", torch.ones(B, device=self.device))
        self._add("l1", (rec_B3HW - img_B3HW).abs().flatten(1).mean(1))
        self._add("l2", (rec_B3HW - img_B3HW).square().flatten(1).mean(1))
        self._add("vq", q.vq_loss.expand(B))
        if self.hparams.lpips_weight > 0:
            self._add("lpips", self._perceptual(rec_B3HW, img_B3HW))
        self._add("psnr", psnr(out_B3HW, img_B3HW))
        self._add("ssim", ssim(out_B3HW, img_B3HW))
        self._val_hits += scale_hits(q.tokens, tok.vocab_size)
        if batch_idx == 0 and self.hparams.num_grid_images > 0:
            self._grid_images = img_B3HW[: self.hparams.num_grid_images].detach().clone()

    def on_validation_epoch_end(self) -> None:
        names = sorted(self._val_sums)
        reduce = self.trainer.strategy.reduce
        totals = dict(zip(names, reduce(torch.stack([self._val_sums[n] for n in names]), reduce_op="sum")))
        hits_KV = reduce(self._val_hits, reduce_op="sum")
        count = totals.pop("count").clamp_min(1)
        metrics = {f"val/{n}": v / count for n, v in totals.items()}
        metrics["val/num_images"] = count  # how many images (over all ranks) produced these numbers
        usage = usage_from_hits(hits_KV)
        names = {"usage_of_possible": "of_possible", "usage": "of_V", "perplexity": "perplexity", "used": "used",
                 "max_possible": "max_possible"}  # fmt: skip
        for pn, u, n in zip(self.patch_nums, usage, hits_KV.sum(1)):
            metrics[f"val_usage/{pn}x{pn}/tokens"] = n
            metrics.update({f"val_usage/{pn}x{pn}/{name}": u[key] for key, name in names.items()})
        metrics["val_usage/min_of_possible"] = min(u["usage_of_possible"] for u in usage)
        self.log_dict(metrics, sync_dist=True)  # already reduced: identical on every rank
        self.log("val_psnr", metrics["val/psnr"], prog_bar=True, logger=False, sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and self._grid_images is not None:
            self._log_grid(self.reconstruction_grid(self._grid_images))
        if self._ema_swap is not None:
            self._ema_swap.close()
            self._ema_swap = None

    @torch.no_grad()
    def reconstruction_grid(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H', W') grid, one row per image: input | decoded f_hat after scale 1 | … | after all K (final)."""
        tok = self.tokenizer
        fhats = tok.tokens_to_fhat(tok.img_to_tokens(img_B3HW), cumulative=True)
        cols = [img_B3HW] + [tok.decode(f) for f in fhats]
        x = torch.stack(cols, dim=1).flatten(0, 1)
        return image_grid(x, nrow=len(cols), upscale=max(1, 64 // img_B3HW.shape[-1]))

    def _log_grid(self, grid: torch.Tensor) -> None:
        """Rows: input | after scale 1 | … | final (see ``reconstruction_grid``), at the current iteration."""
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/reconstruction", grid, global_step=self._iter)

    # ----- checkpoints ---------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_set = True  # a later setup() must not re-apply init_from over these weights
        sd = checkpoint.get("state_dict", {})
        self._iter = int(sd["train_iter"]) if "train_iter" in sd else checkpoint.get("global_step", 0) // 2


__all__ = ["TokenizerModule", "GANLosses", "psnr", "ssim", "scale_hits"]
