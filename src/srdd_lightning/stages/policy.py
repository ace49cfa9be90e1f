"""Stage 3: the resampling policy (DESIGN §2.4) — where a frozen generator's refinement is spent, per sample and scale.

At every scale k the sampler hands the policy :class:`~srdd_lightning.sampling.sampler.ScaleStats` (the guided,
filtered p_k, its first draw r_k, the state x_k = area_down(f̂_{k−1})) and takes back a ``RefineDecision``:

    steps net   a_bk ~ softmax(StepPolicyNet(features_bk, k))   over ``steps.actions`` = [(mode, R), ...]
                (training: sampled, log-probs kept; sampling: the most likely action)      → steps_B, mode per sample
    critic      s_bi = σ(TokenCriticNet(x_k, codebook[r_k], p_k stats, class, k))_i      → ``critic``: mask
                resampling keeps r_k[i] where s_bi ≥ ``critic.threshold`` and redraws the rest from p_k,
                in place of the generator's own p_k(r_k[i]) ≥ p_resample

Two objectives (``objective``):

- ``critic`` (Token-Critic, supervised): the data's tokens r*_k and states x*_k (teacher forcing) and one
  teacher-forced generator pass with the ``sampling`` settings give p_k; each sample replaces a share
  ρ ~ U[replace_min, replace_max] of its tokens by draws from p_k; the critic learns y_bi = [token = r*_bi] by BCE,
  each scale weighted equally, and samples with ``critic.steps`` mask steps per scale (no extra generator pass).
- ``reinforce`` (REINFORCE with a baseline): reward r_b = quality_b − λ·(tokens_b / tokens_without_refinement − 1)
  of a sample drawn with the policy's actions (``reward.quality``; ``mmd``, unlike the others, does not reward
  collapsing onto the mode, which FID penalises); loss = −(r_b − b)·Σ_k log π(a_bk) − β·H(π), b a running mean of
  the reward. A sweep of λ (``reward.cost_weight``) traces a cost–quality curve; with ``reward.critic_ckpt`` the
  mask actions use a frozen critic trained by the first objective.

The generator (and its tokenizer) is frozen, loaded by path (``generator_ckpt``) and kept outside the module tree —
in no checkpoint, optimizer, EMA copy or DDP wrapper; checkpoints record its path and weight fingerprint (EMA or
not), so a policy refuses a generator with other weights, naming both. ``srdd sample --policy_ckpt`` applies it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from srdd_lightning.callbacks.ema import ema_weights
from srdd_lightning.loading import (fingerprint, load_generator, load_stage, read_checkpoint, resolve_checkpoint,
                                    stage_class, stage_state)
from srdd_lightning.models.policy import (StepPolicyConfig, StepPolicyNet, TokenCriticConfig, TokenCriticNet,
                                          token_features)
from srdd_lightning.sampling.config import RESAMPLE_MODES, SampleOutput, SamplingConfig
from srdd_lightning.sampling.sampler import (RefineDecision, Sampler, ScaleStats, draw_tokens, guided_logits,
                                             sampling_probs, scale_settings)
from srdd_lightning.stages.generator import StageModule, _typed
from srdd_lightning.utils.images import to_uint8
from srdd_lightning.utils.seeding import mix_seed

GENERATOR_OPTION = "model.init_args.generator_ckpt"
CKPT_GENERATOR_KEY = "srdd_generator"  # where a policy checkpoint records its generator (path, fingerprint)
DIGITS_SAMPLING = SamplingConfig(cfg=0.0, top_k=900, top_p=0.96)  # the best fixed digits setting (no guidance)
QUALITY_FLOOR = -10.0  # class_logprob below this is clamped: one hopeless sample must not dominate the gradient


# ---- options ---------------------------------------------------------------------------------
@dataclass
class CriticOptions:
    """The token critic: its size, how it is trained (objective ``critic``) and how it samples."""

    width: int = 64
    """Channels of the conv net over each scale's pn×pn token map."""
    depth: int = 3
    """Residual 3×3 conv blocks (each also sees the map's mean: global context)."""
    steps: int | list[int] = 2
    """Critic-driven mask-resampling steps at each scale of the sampling schedule (one value, or one per scale)."""
    threshold: float = 0.5
    """Keep a token whose critic score (probability that it is the data's token) is >= this; redraw the others."""
    replace_min: float = 0.0
    """Training: each sample replaces a share ρ ~ U[replace_min, replace_max] of the data's tokens by the generator's draws."""
    replace_max: float = 1.0

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 0:
            raise ValueError(f"model.init_args.critic.width={self.width} must be >= 1 and depth={self.depth} >= 0")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"model.init_args.critic.threshold={self.threshold} must lie in [0, 1]")
        if not 0.0 <= self.replace_min <= self.replace_max <= 1.0:
            raise ValueError(f"model.init_args.critic.replace_min={self.replace_min} and replace_max={self.replace_max} "
                             f"must satisfy 0 <= replace_min <= replace_max <= 1")  # fmt: skip
        steps = self.steps if isinstance(self.steps, list) else [self.steps]
        if not steps or any(int(s) != s or s < 0 for s in steps):
            raise ValueError(f"model.init_args.critic.steps={self.steps} must be integers >= 0 (one, or one per scale)")


@dataclass
class StepOptions:
    """The per-sample, per-scale choice of refinement (objective ``reinforce``)."""

    actions: list[tuple[str, int]] = field(default_factory=lambda: [("none", 0), ("mask", 2), ("renoise", 1), ("renoise", 2)])
    """The action set: (mode, refine steps) pairs, mode one of none / simple / mask / pc / renoise."""
    hidden: int = 64
    """Width of the MLP over the scale's statistics (ScaleStats.features() and the scale)."""

    def __post_init__(self) -> None:
        self.actions = [(str(m), int(s)) for m, s in self.actions]
        bad = [a for a in self.actions if a[0] not in RESAMPLE_MODES or a[1] < 0]
        if len(self.actions) < 2 or bad:
            raise ValueError(f"model.init_args.steps.actions={self.actions}: give >= 2 (mode, steps) pairs with mode in "
                             f"{RESAMPLE_MODES} and steps >= 0{f' (bad: {bad})' if bad else ''}")  # fmt: skip


@dataclass
class RewardOptions:
    """REINFORCE's reward: quality − λ·relative cost, and how the gradient is formed."""

    quality: Literal["class_logprob", "feature_distance", "mmd"] = "class_logprob"
    """``class_logprob``: log p(conditioned class | sample) under the extractor's classifier (clamped at −10);
    ``feature_distance``: −‖f − μ_class‖ / (mean distance of the real images to their class mean); ``mmd``: the
    sample's share of −MMD² between the batch and the real images, mean_y k(f, y) − mean_j k(f, f_j) (j over the
    batch), a Gaussian kernel of the real features' median pairwise distance, in units of the real images' mean
    kernel: it also rewards diversity, as FID does. (KID's polynomial kernel is unbounded: it would reward outliers.)"""
    cost_weight: float = 0.1
    """λ: reward = quality − λ·(tokens / tokens without refinement − 1)."""
    extractor: str = "digits-classifier"
    """Feature extractor: ``digits-classifier`` (needs ``classifier``) or ``inception-v3-compat``."""
    classifier: str | None = None
    """Digits classifier checkpoint (``srdd classifier``)."""
    inception_weights: str | None = None
    """torch-fidelity's Inception weights (or the env var SRDD_INCEPTION_WEIGHTS)."""
    num_reference: int | None = None
    """Real training images for the class feature means (``feature_distance``; null: the whole train split)."""
    baseline_momentum: float = 0.9
    """b ← m·b + (1 − m)·mean reward (the first batch sets it)."""
    entropy_weight: float = 0.01
    """β of the entropy bonus that keeps the policy exploring."""
    critic_ckpt: str | None = None
    """A policy run trained with ``objective: critic`` (same generator) whose critic scores the mask actions (frozen)."""

    def __post_init__(self) -> None:
        if self.cost_weight < 0 or self.entropy_weight < 0 or not 0 <= self.baseline_momentum < 1:
            raise ValueError(f"model.init_args.reward: cost_weight ({self.cost_weight}) and entropy_weight "
                             f"({self.entropy_weight}) must be >= 0, baseline_momentum ({self.baseline_momentum}) in [0, 1)")  # fmt: skip


@dataclass
class PolicyOptim:
    """AdamW on the policy's networks."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping; the norm is logged)."""


def _gaussian_kernel(a_ND: torch.Tensor, b_MD: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """k(a, b) = exp(−‖a − b‖² / (2 h²)), (N, M)."""
    return torch.cdist(a_ND.float(), b_MD.float()).pow(2).div(-2.0 * bandwidth**2).exp()


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _Shared:
    """Holds a frozen module outside the module tree; a deep copy (the EMA callback's) shares it instead of copying."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo) -> _Shared:
        return self


# ---- the policy the sampler calls ------------------------------------------------------------
class LearnedPolicy:
    """``Sampler.sample(policy=...)``: per-sample decisions from a step net and / or a token critic.

    ``explore`` draws the actions with ``generator`` and keeps their log-probabilities and entropies (with gradients)
    for REINFORCE; otherwise the most likely action is taken (independent of the batch). Without a step net every
    sample gets ``critic_steps`` critic-driven mask steps."""

    def __init__(self, codebook: nn.Embedding, trained_pns: Sequence[int], step_net: StepPolicyNet | None = None,
                 critic_net: TokenCriticNet | None = None, actions: Sequence[tuple[str, int]] = (),
                 critic_steps: int | Sequence[int] = 0, threshold: float = 0.5, explore: bool = False,
                 generator: torch.Generator | None = None) -> None:  # fmt: skip
        if step_net is None and critic_net is None:
            raise ValueError("a LearnedPolicy needs a step net, a token critic or both")
        self.codebook, self.trained_pns = codebook, list(trained_pns)
        self.step_net, self.critic_net = step_net, critic_net
        self.actions, self.critic_steps, self.threshold = list(actions), critic_steps, float(threshold)
        self.explore, self.generator = explore, generator
        self.log_probs: list[torch.Tensor] = []  # per scale (B,), explore only
        self.entropies: list[torch.Tensor] = []
        self.chosen: list[torch.Tensor] = []  # per scale: the action index of each sample (B,)

    def _trained_index(self, pn: int) -> int:
        if pn not in self.trained_pns:
            raise ValueError(f"the policy was trained on the scales {self.trained_pns}; a {pn}x{pn} scale is not "
                             f"among them")  # fmt: skip
        return self.trained_pns.index(pn)

    def critic_scores(self, stats: ScaleStats, tokens_Bl: torch.Tensor) -> torch.Tensor:
        """Keep-scores (B, pn²): the critic's probability that each token of ``tokens_Bl`` is the data's."""
        feats = token_features(stats.probs_BlV, tokens_Bl)
        labels_B = stats.labels_B if stats.labels_B is not None else torch.zeros(tokens_Bl.shape[0], dtype=torch.long)
        return self.critic_net(stats.x_BlC, self.codebook(tokens_Bl), feats, self._trained_index(stats.pn),
                               labels_B.to(tokens_Bl.device), stats.pn).sigmoid()  # fmt: skip

    def _critic_steps(self, stats: ScaleStats) -> int:
        steps = self.critic_steps
        if isinstance(steps, (list, tuple)):
            if len(steps) != stats.num_scales:
                raise ValueError(f"critic.steps {list(steps)} has {len(steps)} entries, the sampling schedule "
                                 f"{stats.num_scales} scales: give one value, or one per scale")  # fmt: skip
            return int(steps[stats.scale])
        return int(steps)

    def __call__(self, stats: ScaleStats) -> RefineDecision:
        B, device = stats.entropy_B.shape[0], stats.entropy_B.device
        critic = self.critic_scores if self.critic_net is not None else None
        p_res = self.threshold if critic is not None else stats.p_resample
        if self.step_net is None:
            return RefineDecision(torch.full((B,), self._critic_steps(stats), dtype=torch.long), "mask", p_res, critic)
        with torch.enable_grad() if self.explore else torch.no_grad():  # the sampler runs without gradients
            logp_BA = self.step_net(stats.features(), self._trained_index(stats.pn)).log_softmax(-1)
            if self.explore:
                a_B = torch.multinomial(logp_BA.detach().exp().cpu(), 1, generator=self.generator).squeeze(1).to(device)
                self.log_probs.append(logp_BA.gather(1, a_B[:, None]).squeeze(1))
                self.entropies.append(-(logp_BA.exp() * logp_BA).sum(-1))
            else:
                a_B = logp_BA.argmax(-1)
        self.chosen.append(a_B.detach())
        modes = [self.actions[a][0] for a in a_B.tolist()]
        steps_B = torch.tensor([self.actions[a][1] for a in a_B.tolist()], dtype=torch.long, device=device)
        return RefineDecision(steps_B, modes, p_res, critic)


@dataclass(eq=False)
class PolicySampler:
    """A :class:`Sampler` that applies a policy: ``.sample(labels, config, seeds=...)`` as FIDCallback calls it."""

    sampler: Sampler
    policy: LearnedPolicy

    def sample(self, labels_B, config: SamplingConfig | None = None, seeds=None, edit=None) -> SampleOutput:
        return self.sampler.sample(labels_B, config, seeds=seeds, edit=edit, policy=self.policy)


# ---- the stage -------------------------------------------------------------------------------
class ResamplingPolicyModule(StageModule, pl.LightningModule):
    """Stage 3: learn where a frozen generator's refinement is spent (see the module docstring).

    Args:
        generator_ckpt: The frozen generator: an SRDDModule run folder (its newest last.ckpt) or file (from Python,
            also a loaded generator module). Only its path and fingerprint are stored.
        objective: ``critic`` (supervised token critic) or ``reinforce`` (policy gradient on quality − λ·cost).
        sampling: The sampling settings the policy is trained for (its refinement fields are the policy's decisions).
            Default: the best fixed digits setting.
        critic: The token critic's size, training and sampling steps.
        steps: The action set and network of the per-sample step policy (``reinforce``).
        reward: Reward, baseline, entropy bonus and extractor (``reinforce``).
        optim: AdamW and gradient clipping.
        generator_ema: Use the generator's EMA weights (the fingerprint is of the weights used).
        num_classes: Real classes; filled from the data by the CLI and checked against the generator.
        image_size: Image side; filled from the data by the CLI and checked against the tokenizer.
    """

    @staticmethod
    def check_init_args(init_args: dict) -> None:
        """Called by ``srdd`` before building the module: the generator (and critic) checkpoints must exist."""
        resolve_checkpoint(init_args["generator_ckpt"], GENERATOR_OPTION)
        if critic_ckpt := (init_args.get("reward") or {}).get("critic_ckpt"):
            resolve_checkpoint(critic_ckpt, "model.init_args.reward.critic_ckpt")

    def __init__(self, generator_ckpt: str, objective: Literal["critic", "reinforce"] = "critic",
                 sampling: SamplingConfig = DIGITS_SAMPLING, critic: CriticOptions = CriticOptions(),
                 steps: StepOptions = StepOptions(), reward: RewardOptions = RewardOptions(),
                 optim: PolicyOptim = PolicyOptim(), generator_ema: bool = True, num_classes: int | None = None,
                 image_size: int | None = None):  # fmt: skip
        super().__init__()
        if objective not in ("critic", "reinforce"):
            raise ValueError(f"model.init_args.objective must be critic or reinforce, got {objective!r}")
        sampling, critic, steps = _typed(SamplingConfig, sampling), _typed(CriticOptions, critic), _typed(StepOptions, steps)
        reward, optim = _typed(RewardOptions, reward), _typed(PolicyOptim, optim)
        self.save_hyperparameters(ignore=["generator_ckpt"])  # a loaded module is no hyperparameter; its path is
        self.hparams.update(sampling=sampling.to_dict(), critic=dataclasses.asdict(critic), steps=dataclasses.asdict(steps),
                            reward=dataclasses.asdict(reward), optim=dataclasses.asdict(optim))  # fmt: skip
        self.sampling, self.critic_opts, self.step_opts, self.reward_opts, self.optim = sampling, critic, steps, reward, optim

        # ---- the frozen generator, outside the module tree
        gen_module = (generator_ckpt if isinstance(generator_ckpt, nn.Module)
                      else load_generator(resolve_checkpoint(generator_ckpt, GENERATOR_OPTION), ema=generator_ema))
        gen_module.eval().requires_grad_(False)
        self._gen, gen = _Shared(gen_module), gen_module.generator
        path = getattr(gen_module, "checkpoint_path", None) or str(generator_ckpt)
        self.hparams.generator_ckpt = path
        self.generator_info = {
            "path": path, "abspath": str(Path(path).resolve()), "fingerprint": fingerprint(gen),
            "ema": bool(getattr(gen_module, "loaded_with_ema", generator_ema)),
            "tokenizer_fingerprint": gen_module.tokenizer_info["fingerprint"],
            "patch_nums": list(gen.patch_nums), "num_classes": int(gen.num_classes)}  # fmt: skip
        if num_classes is not None and num_classes != gen.num_classes:
            raise ValueError(f"the data has {num_classes} classes but the generator {path} ({GENERATOR_OPTION}) was "
                             f"trained on {gen.num_classes}")  # fmt: skip
        if image_size is not None and image_size != gen_module.tokenizer.image_size:
            raise ValueError(f"the data gives {image_size} px images but the generator {path} ({GENERATOR_OPTION}) "
                             f"makes {gen_module.tokenizer.image_size} px")  # fmt: skip
        self.sampling_schedule = tuple(Sampler(gen, gen_module.tokenizer).schedule(sampling.schedule))
        sampling.check_schedule(self.sampling_schedule)

        # ---- the policy's own networks
        K = len(gen.patch_nums)
        use_critic = objective == "critic" or reward.critic_ckpt is not None
        self.critic_net = TokenCriticNet(TokenCriticConfig(gen.config.latent_dim, K, gen.num_classes, critic.width,
                                                           critic.depth)) if use_critic else None  # fmt: skip
        self.step_net = (StepPolicyNet(StepPolicyConfig(K, len(steps.actions), hidden=steps.hidden))
                         if objective == "reinforce" else None)
        if objective == "reinforce" and self.critic_net is not None:
            self.critic_net.requires_grad_(False)  # trained by the critic objective; loaded in setup
        self.register_buffer("baseline", torch.zeros(1))  # REINFORCE's running mean reward, once baseline_steps > 0
        self.register_buffer("baseline_steps", torch.zeros(1, dtype=torch.long))
        self.rng = torch.Generator()
        self._run_seed = torch.initial_seed()
        self._weights_set = False
        self._reward_model: _Shared | None = None  # the feature extractor (not a submodule: in no checkpoint)
        # the reward's reference, computed at the first reward: class feature means and scale, real features (N, D)
        self._class_means = self._real_features = self._base_tokens = None
        self._kernel_scale, self._bandwidth = 1.0, 1.0

    # ---- the frozen generator ---------------------------------------------------------------------
    @property
    def generator(self):
        """The frozen VARTransformer (``FIDCallback`` reads ``num_classes``)."""
        return self._gen.module.generator

    @property
    def tokenizer(self):
        return self._gen.module.tokenizer

    def _apply(self, fn, *args, **kwargs):
        """``.to()`` / ``.cuda()`` reach the frozen generator too (it is outside the module tree)."""
        super()._apply(fn, *args, **kwargs)
        self._gen.module._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self._gen.module.eval()
        return self

    # ---- policies and samplers --------------------------------------------------------------------
    def policy(self, explore: bool = False, generator: torch.Generator | None = None) -> LearnedPolicy:
        """The policy of the current weights, for ``Sampler.sample(policy=...)``."""
        return LearnedPolicy(self.tokenizer.quantizer.codebook, self.generator.patch_nums, self.step_net, self.critic_net,
                             self.step_opts.actions, self.critic_opts.steps, self.critic_opts.threshold, explore,
                             generator)  # fmt: skip

    def fingerprint(self) -> str:
        """Short hash of what the policy's decisions depend on: its weights and its decision options."""
        options = {k: self.hparams.get(k) for k in ("objective", "critic", "steps")}
        text = fingerprint(self) + json.dumps(options, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def base_sampler(self) -> Sampler:
        return Sampler(self.generator, self.tokenizer)

    def sampler(self) -> PolicySampler:
        """A sampler that applies this policy (current weights; inside ``ema_weights()`` the EMA ones)."""
        return PolicySampler(self.base_sampler(), self.policy())

    def ema_weights(self):
        """The policy's EMA weights inside the block (when the run has the EMA callback)."""
        return ema_weights(self)

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.gradient_clip_val is not None:
            raise ValueError(f"trainer.gradient_clip_val={self.trainer.gradient_clip_val} is set, but the policy clips "
                             f"itself: use model.init_args.optim.grad_clip and leave trainer.gradient_clip_val unset")  # fmt: skip
        if self.hparams.objective == "reinforce" and self.reward_opts.critic_ckpt and not self._weights_set:
            self.load_critic(self.reward_opts.critic_ckpt)

    @torch.no_grad()
    def load_critic(self, path: str) -> None:
        """The critic of a policy trained with ``objective: critic`` on the same generator weights."""
        option = "model.init_args.reward.critic_ckpt"
        file, ckpt = read_checkpoint(path, option)
        if stage_class(ckpt) != _class_path(type(self)):
            raise ValueError(f"{file} ({option}) is not a ResamplingPolicyModule checkpoint")
        self._check_generator(ckpt, f"{file} ({option})")
        state = stage_state(ckpt, "critic_net.")
        if not state:
            raise ValueError(f"{file} ({option}) holds no critic (it was trained with objective: reinforce, no critic_ckpt)")
        try:
            self.critic_net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the critic of {file} ({option}) does not fit model.init_args.critic (width "
                             f"{self.critic_opts.width}, depth {self.critic_opts.depth}); give that run's critic "
                             f"options ({ckpt['hyper_parameters'].get('critic')}): {str(e).splitlines()[0]}") from None  # fmt: skip
        self._weights_set = True

    def _step_rng(self, batch_idx: int) -> torch.Generator:
        return self.rng.manual_seed(mix_seed(self._run_seed, self.global_rank, self.global_step, batch_idx))

    # ---- objective 1: the token critic --------------------------------------------------------------
    @torch.no_grad()
    def teacher_forced_probs(self, img_B3HW: torch.Tensor, labels_B: torch.Tensor):
        """Data tokens r*_k, states x*_k (None at the first scale) and the generator's p_k per scale of the sampling
        schedule, from one teacher-forced pass (two with guidance) with the configured sampling settings."""
        sched, gen, tok = self.sampling_schedule, self.generator, self.tokenizer
        with torch.autocast(device_type=img_B3HW.device.type, enabled=False):
            tokens = tok.img_to_tokens(img_B3HW.float(), sched)
            x_BLC = tok.teacher_forcing_inputs(tokens, sched)
        settings = scale_settings(self.sampling, sched)
        cond = gen(labels_B, x_BLC, schedule=sched)
        uncond = (gen(torch.full_like(labels_B, gen.null_class), x_BLC, schedule=sched)
                  if any(st.guidance > 0 for st in settings) else None)
        out, start, n0 = [], 0, sched[0] ** 2  # x_BLC starts at the second scale
        for st, t in zip(settings, tokens):
            n = st.pn * st.pn
            logits = cond[:, start : start + n].float()
            if uncond is not None and st.guidance > 0:
                logits = guided_logits(logits, uncond[:, start : start + n].float(), st.guidance)
            x_k = None if start == 0 else x_BLC[:, start - n0 : start - n0 + n]
            out.append((t.flatten(1), x_k, sampling_probs(logits, st.top_k, st.top_p, st.temperature)))
            start += n
        return out

    def critic_forward(self, img_B3HW: torch.Tensor, labels_B: torch.Tensor, rng: torch.Generator):
        """Per scale: critic logits, targets y = [token is the data's] and the generator's p_k(token) (the baseline)."""
        lo, hi = self.critic_opts.replace_min, self.critic_opts.replace_max
        B, dev = labels_B.shape[0], labels_B.device
        rho_B = (lo + (hi - lo) * torch.rand(B, generator=rng)).to(dev)
        out, forced = [], self.teacher_forced_probs(img_B3HW, labels_B)
        for pn, (real_Bl, x_BlC, probs_BlV) in zip(self.sampling_schedule, forced):
            l = real_Bl.shape[1]
            fake_Bl = draw_tokens(probs_BlV, torch.rand(B, l, generator=rng).to(dev))
            replace_Bl = torch.rand(B, l, generator=rng).to(dev) < rho_B[:, None]
            mixed_Bl = torch.where(replace_Bl, fake_Bl, real_Bl)
            logits_Bl = self.critic_net(x_BlC, self.tokenizer.quantizer.codebook(mixed_Bl),
                                        token_features(probs_BlV, mixed_Bl), self.generator.patch_nums.index(pn),
                                        labels_B, pn)  # fmt: skip
            p_tok_Bl = probs_BlV.gather(-1, mixed_Bl.unsqueeze(-1)).squeeze(-1)
            out.append((logits_Bl, (mixed_Bl == real_Bl).float(), p_tok_Bl))
        return out

    def _critic_step(self, batch, batch_idx: int) -> torch.Tensor:
        img, labels = batch
        per_scale = self.critic_forward(img, labels, self._step_rng(batch_idx))
        # each scale weighted equally: the 1x1 and 2x2 maps count as much as 8x8
        loss = torch.stack([F.binary_cross_entropy_with_logits(lg, y) for lg, y, _ in per_scale]).mean()
        B = labels.shape[0]
        with torch.no_grad():
            accs = [((lg > 0).float() == y).float().mean() for lg, y, _ in per_scale]
            metrics = {"train/critic_loss": loss, **{f"train/critic_acc_{pn}x{pn}": acc for pn, acc in
                                                     zip(self.sampling_schedule, accs)}}  # fmt: skip
            metrics["train/critic_acc"] = torch.stack(accs).mean()
            metrics["train/data_token_share"] = torch.cat([y.flatten() for _, y, _ in per_scale]).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict(metrics, batch_size=B)
        return loss

    # ---- objective 2: REINFORCE ---------------------------------------------------------------------
    def _prepare_reward(self) -> None:
        """The extractor, and for ``feature_distance`` the real class feature means (train split)."""
        if self._reward_model is not None:
            return
        from srdd_lightning import evaluation as ev

        r = self.reward_opts
        ext = ev.extractor_from_options(r.extractor, r.classifier, r.inception_weights, self.device)
        index = getattr(getattr(self._trainer, "datamodule", None), "index", None)
        if index is not None:
            ev.check_extractor_fits(ext, index, self.tokenizer.image_size, option="model.init_args.reward.classifier")
        if r.quality == "class_logprob" and (not ext.has_logits or ext.num_classes != self.generator.num_classes):
            raise ValueError(f"reward.quality: class_logprob needs an extractor whose classifier has the generator's "
                             f"{self.generator.num_classes} classes ({r.extractor} has "
                             f"{ext.num_classes if ext.has_logits else 'no'} logits); use feature_distance")  # fmt: skip
        if r.quality in ("feature_distance", "mmd"):
            if index is None:
                raise ValueError(f"reward.quality: {r.quality} needs the datamodule's real images (data.root)")
            feats, labels, n = [], [], 0
            for img, lab in ev.iter_split_uint8(index, "train", self.tokenizer.image_size):
                feats.append(ext(img.to(ext.device)).float().cpu())
                labels.append(lab)
                n += len(lab)
                if r.num_reference is not None and n >= r.num_reference:
                    break
            f_ND, y_N = torch.cat(feats)[: r.num_reference], torch.cat(labels)[: r.num_reference]
            self._real_features = f_ND.to(self.device)
            d_NN = torch.cdist(f_ND, f_ND)
            self._bandwidth = float(d_NN[~torch.eye(len(f_ND), dtype=torch.bool)].median())
            k_NN = _gaussian_kernel(f_ND, f_ND, self._bandwidth)
            self._kernel_scale = float((k_NN.sum() - k_NN.diagonal().sum()) / (len(f_ND) * (len(f_ND) - 1)))
            C = max(self.generator.num_classes, int(y_N.max()) + 1)
            mu_CD = torch.stack([f_ND[y_N == c].mean(0) if (y_N == c).any() else f_ND.mean(0) for c in range(C)])
            scale = (f_ND - mu_CD[y_N]).norm(dim=1).mean()
            self._class_means = (mu_CD.to(self.device), scale.to(self.device))
        self._reward_model = _Shared(ext)

    @torch.no_grad()
    def quality(self, images_B3HW: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """The per-sample quality score of the reward (see ``reward.quality``)."""
        self._prepare_reward()
        ext = self._reward_model.module
        u8 = to_uint8(images_B3HW).to(ext.device)
        if self.reward_opts.quality == "class_logprob":
            logits = ext.logits(u8).float()
            logp = logits.log_softmax(-1).gather(1, labels_B.to(logits.device)[:, None].clamp_max(logits.shape[1] - 1))
            return logp.squeeze(1).clamp_min(QUALITY_FLOOR).to(self.device)
        f = ext(u8).float().to(self.device)
        if self.reward_opts.quality == "mmd":
            # −½ ∂MMD²(q, p)/∂q(f_i) for the batch's empirical q = (1/n) Σ_j δ_{f_j} (itself included: a sample far
            # from the data and from the batch still pays its own 1/n): realism − similarity to the batch
            k_batch_B = _gaussian_kernel(f, f, self._bandwidth).mean(1)
            return (_gaussian_kernel(f, self._real_features, self._bandwidth).mean(1) - k_batch_B) / self._kernel_scale
        mu_CD, scale = self._class_means
        return -(f - mu_CD[labels_B.clamp_max(mu_CD.shape[0] - 1)]).norm(dim=1) / scale

    def base_tokens(self, labels_B: torch.Tensor) -> float:
        """Query tokens per image without refinement (the cost unit of the reward)."""
        if self._base_tokens is None:
            plain = dataclasses.replace(self.sampling, resample="none", refine_steps=0)
            out = self.base_sampler().sample(labels_B[:1], plain, seeds=[0])
            self._base_tokens = float(out.tokens_per_sample[0])
        return self._base_tokens

    def rollout(self, labels_B: torch.Tensor, rng: torch.Generator | None, explore: bool, first_seed: int = 0):
        """Sample with the policy (exploring with ``rng``'s seeds and actions, or greedy on the seeds first_seed, ...):
        (output, policy, quality_B, relative cost_B, reward_B)."""
        policy = self.policy(explore=explore, generator=rng)
        if rng is not None:
            seeds = torch.randint(0, 2**62, (labels_B.shape[0],), generator=rng).tolist()
        else:
            seeds = list(range(first_seed, first_seed + labels_B.shape[0]))
        out = self.base_sampler().sample(labels_B, self.sampling, seeds=seeds, policy=policy)
        q_B = self.quality(out.images, labels_B)
        cost_B = out.tokens_per_sample.to(self.device) / self.base_tokens(labels_B) - 1.0
        return out, policy, q_B, cost_B, q_B - self.reward_opts.cost_weight * cost_B

    def _reinforce_step(self, batch, batch_idx: int) -> torch.Tensor:
        _, labels = batch
        out, policy, q_B, cost_B, r_B = self.rollout(labels, self._step_rng(batch_idx), explore=True)
        if self.baseline_steps == 0:
            self.baseline.fill_(float(r_B.mean()))
        adv_B = r_B - self.baseline
        logp_B = torch.stack(policy.log_probs).sum(0)
        entropy = torch.stack(policy.entropies).mean()
        loss = -(adv_B.detach() * logp_B).mean() - self.reward_opts.entropy_weight * entropy
        m = self.reward_opts.baseline_momentum
        self.baseline.mul_(m).add_((1 - m) * r_B.mean().detach())
        self.baseline_steps += 1
        B = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict({"train/reward": r_B.mean(), "train/quality": q_B.mean(), "train/cost_rel": cost_B.mean(),
                       "train/cost_tokens_per_image": out.tokens_per_sample.float().mean(), "train/baseline": self.baseline,
                       "train/policy_entropy": entropy}, batch_size=B)  # fmt: skip
        self._log_decisions("train", policy)
        return loss

    def _log_decisions(self, prefix: str, policy: LearnedPolicy) -> None:
        """The share of each action per scale (scalars) and, on TensorBoard, their histogram per scale."""
        names = [f"{m}{s}" for m, s in self.step_opts.actions]
        shares = {}
        for pn, a_B in zip(self.sampling_schedule, policy.chosen):
            counts = torch.bincount(a_B.cpu(), minlength=len(names)).float() / a_B.numel()
            shares.update({f"{prefix}/action_{pn}x{pn}/{n}": c for n, c in zip(names, counts)})
        self.log_dict(shares, batch_size=policy.chosen[0].numel() if policy.chosen else 1)
        if self._trainer is None or self.global_step % max(1, self._trainer.log_every_n_steps) != 0:
            return
        for logger in self._trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for pn, a_B in zip(self.sampling_schedule, policy.chosen):
                    logger.experiment.add_histogram(f"{prefix}/decisions_{pn}x{pn}", a_B.cpu(), self.global_step,
                                                    bins=torch.arange(len(names) + 1).float() - 0.5)  # fmt: skip

    # ---- steps ------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        step = self._critic_step if self.hparams.objective == "critic" else self._reinforce_step
        return step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._val = {}

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int) -> None:
        img, labels = batch
        if self.critic_net is not None:  # critic accuracy and AUC, against the generator's own p_k as the score
            rng = torch.Generator().manual_seed(mix_seed(1, self.global_rank, batch_idx))
            for k, (lg, y, p) in enumerate(self.critic_forward(img, labels, rng)):
                self._val.setdefault(k, []).append((lg.flatten().cpu(), y.flatten().cpu(), p.flatten().cpu()))
        if self.step_net is not None:
            out, policy, q_B, cost_B, r_B = self.rollout(labels, None, explore=False, first_seed=batch_idx * len(labels))
            self.log_dict({"val/reward": r_B.mean(), "val/quality": q_B.mean(), "val/cost_rel": cost_B.mean(),
                           "val/cost_tokens_per_image": out.tokens_per_sample.float().mean()},
                          batch_size=labels.shape[0], sync_dist=True)  # fmt: skip
            self._log_decisions("val", policy)

    def on_validation_epoch_end(self) -> None:
        from torchmetrics.functional.classification import binary_auroc

        if not self._val:
            return
        accs, aucs = [], []
        for k, parts in sorted(self._val.items()):
            pn, (lg, y, p) = self.sampling_schedule[k], (torch.cat(t) for t in zip(*parts))
            accs.append(((lg > 0).float() == y).float().mean())
            both = 0 < float(y.mean()) < 1  # an AUC needs both classes
            aucs.append(binary_auroc(lg.sigmoid(), y.long()) if both else torch.tensor(float("nan")))
            p_auc = binary_auroc(p, y.long()) if both else torch.tensor(float("nan"))
            self.log_dict({f"val/critic_acc_{pn}x{pn}": accs[-1], f"val/critic_auc_{pn}x{pn}": aucs[-1],
                           f"val/p_auc_{pn}x{pn}": p_auc}, sync_dist=True)  # fmt: skip
        self.log("val/critic_acc", torch.stack(accs).mean(), sync_dist=True)
        self.log("val/critic_auc", torch.stack(aucs).nanmean(), prog_bar=True, sync_dist=True)
        self._val = {}

    # ---- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.log("train/grad_norm", torch.nn.utils.clip_grad_norm_(params, self.optim.grad_clip or math.inf))

    # ---- checkpoints: the generator is referenced, not stored -----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CKPT_GENERATOR_KEY] = dict(self.generator_info)

    def _check_generator(self, checkpoint: dict[str, Any], what: str) -> None:
        now = self.generator_info
        _refuse_other_generator(checkpoint, what, f"the generator given now is {now['path']}", now["fingerprint"],
                                now["ema"], "its decisions and critic were learned for another generator's "
                                "predictions; use the generator (and --ema)")  # fmt: skip

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another stage, or one trained on another generator (both named)."""
        super().check_checkpoint(checkpoint)
        self._check_generator(checkpoint, "this policy")


def _refuse_other_generator(checkpoint: dict[str, Any], what: str, paired: str, now: str, ema, use: str) -> None:
    """Refuse a policy checkpoint whose recorded generator weights are not ``now``, naming both."""
    saved = checkpoint.get(CKPT_GENERATOR_KEY) or {}
    if saved.get("fingerprint") not in (None, now):
        raise ValueError(f"{what} was trained on the generator {saved.get('path')} (weights "
                         f"{saved.get('fingerprint')}, EMA {saved.get('ema')}), but {paired} (weights {now}, EMA "
                         f"{ema}): {use} it was trained on, or train a policy for this one")  # fmt: skip


def load_policy(path: str, generator_module=None, option: str = "--policy_ckpt") -> ResamplingPolicyModule:
    """A policy checkpoint or run folder, in eval mode, on ``generator_module`` (an already loaded SRDDModule, e.g.
    ``srdd sample``'s) or, without one, on the generator it records. A generator whose weights differ from the ones
    the policy was trained on is refused before anything is built, with both named."""
    file, ckpt = read_checkpoint(path, option)
    if (what := stage_class(ckpt)) != _class_path(ResamplingPolicyModule):
        raise ValueError(f"{file} ({option}) is not a resampling-policy checkpoint"
                         f"{f': it was written by {what}' if what else ''}")  # fmt: skip
    if generator_module is None:
        return load_stage(file, expect=ResamplingPolicyModule, option=option)
    given = getattr(generator_module, "checkpoint_path", "the given generator")
    _refuse_other_generator(ckpt, f"{file} ({option})", f"it is paired with {given}",
                            fingerprint(generator_module.generator), getattr(generator_module, "loaded_with_ema", None),
                            "use the generator (--ckpt, --ema)")  # fmt: skip
    return load_stage(file, expect=ResamplingPolicyModule, option=option, generator_ckpt=generator_module)


__all__ = ["CKPT_GENERATOR_KEY", "CriticOptions", "LearnedPolicy", "PolicyOptim", "PolicySampler",
           "ResamplingPolicyModule", "RewardOptions", "StepOptions", "load_policy"]  # fmt: skip
