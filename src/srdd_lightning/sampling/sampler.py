"""The one sampler: next-scale generation with guidance, top-k/top-p, per-sample seeds, refinement (resampling),
zero-shot editing and a per-sample / per-token resampling policy (DESIGN §2.3, §2.4).

For k = 0..K-1 over the sampling schedule (a subset of the trained scales ending at the last one):

    logits_k = f_θ(x_k, k, y)             x_0 = start token, x_k = area_down(f_hat_{k-1}, pn_k)
    logits_k = (1 + t_k)·cond − t_k·uncond       (classifier-free guidance, only where t_k > 0)
    p_k      = softmax(filter_{top-k, top-p}(logits_k / T_k))
    r_k      ~ p_k                        (inverse CDF with each sample's own uniforms)
    f_hat_k  = f_hat_{k-1} + φ_k(up(codebook[r_k]))

Refinement of scale k, R steps. The state before scale k, I_{k-1} = (r_0..r_{k-1}), is the chain's state: dropping
scale k's tokens *is* the forward process, so a Markov (or causal) model predicts the same p_k again and the
cheap modes reuse it (no extra pass):

    simple   r_k ← a fresh draw from p_k
    mask     keep r_k[i] where p_k(r_k[i]) ≥ p_resample (or where a token critic scores it so), redraw the rest
    pc       draw r'; keep r'[i] only where p_k(r'[i]) > p_k(r_k[i])    (predictor–corrector: probability rises)
    renoise  x̂_0 = complete the sample from I_k;  (r'_0..r'_{k-1}) = M(k-1)·x̂_0   (residual re-quantization of
             the completed latent: the forward process applied to the model's estimate of x_0, a state of the
             kind training showed the model);  p_k ← p(· | I'_{k-1});  r_k ~ p_k;  the coarse tokens become r'

Re-quantizing the *partial* f_hat_k instead (what an earlier version did) gives coarse states the model never
saw in training and rewrites them at every step, so samples drift off the data as R grows (README, Refinement).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from srdd_lightning.models.scales import Schedule, as_schedule, subset_indices
from srdd_lightning.models.tokenizer import MultiScaleTokenizer
from srdd_lightning.models.transformer import VARTransformer
from srdd_lightning.sampling.config import RESAMPLE_MODES, EditSpec, SampleOutput, SamplingConfig, SamplingCost
from srdd_lightning.sampling.config import as_seed_list

# ---- per-scale settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleSettings:
    """The resolved sampling settings of one scale of the schedule."""

    pn: int
    guidance: float
    top_k: int
    top_p: float
    temperature: float
    resample: str
    refine_steps: int
    p_resample: float
    refine_temperature: float = 1.0


def guidance_weights(config: SamplingConfig, num_scales: int) -> list[float]:
    """Guidance weight t_k per scale: ``linear`` t_k = cfg·k/(K−1) (VAR; a one-scale schedule gets cfg),
    ``constant`` t_k = cfg, or the explicit list ``cfg_schedule`` (SamplingConfig checked its values)."""
    K = num_scales
    if config.cfg_schedule == "linear":
        return [config.cfg * k / (K - 1) if K > 1 else float(config.cfg) for k in range(K)]
    if config.cfg_schedule == "constant":
        return [float(config.cfg)] * K
    return [float(t) for t in config.per_scale("cfg_schedule", K)]


def scale_settings(config: SamplingConfig, schedule: Sequence[int]) -> list[ScaleSettings]:
    """Expand ``config`` (whose values SamplingConfig checked) into one :class:`ScaleSettings` per scale."""
    K = len(schedule)
    names = ("top_k", "top_p", "temperature", "resample", "refine_steps", "p_resample", "refine_temperature")
    cols = [config.per_scale(name, K) for name in names]
    return [ScaleSettings(int(pn), t, int(top_k), float(top_p), float(temp), mode, int(steps), float(p), float(r_temp))
            for pn, t, top_k, top_p, temp, mode, steps, p, r_temp in zip(schedule, guidance_weights(config, K), *cols)]


# ---- guidance, filtering, drawing ---------------------------------------------------------------


def guided_logits(cond_BlV: torch.Tensor, uncond_BlV: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance in VAR's form: (1 + t)·cond − t·uncond."""
    return cond_BlV.mul(1.0 + t).sub_(uncond_BlV, alpha=t)


def filter_logits(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """VAR's ``sample_with_top_k_top_p_`` filter into a new tensor, removed tokens at −inf: top-k keeps the tokens >=
    the k-th largest logit (0 or k >= V: off); top-p sorts ascending and removes the tail of cumulative probability
    <= 1 − p, keeping the smallest nucleus of mass >= p (0 or 1: off). The most likely token is always kept."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, -math.inf)
    if 0.0 < top_p < 1.0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)
        remove = sorted_BlV.softmax(dim=-1).cumsum_(dim=-1) <= (1.0 - top_p)
        remove[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(remove.scatter(-1, order_BlV, remove), -math.inf)
    return logits_BlV


def sampling_probs(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """p = softmax(filter(logits / T)); T = 0 is greedy (only the most likely token)."""
    if temperature == 0.0:
        top_k, temperature = 1, 1.0
    scaled = logits_BlV if temperature == 1.0 else logits_BlV / temperature
    return filter_logits(scaled, top_k, top_p).softmax(dim=-1)


def draw_tokens(probs_BlV: torch.Tensor, u_Bl: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds u·total (u in [0, 1)); a token of
    probability 0 (filtered out) is never returned."""
    cdf_BlV = probs_BlV.cumsum(dim=-1)
    target = (u_Bl.to(cdf_BlV.dtype) * cdf_BlV[..., -1]).unsqueeze(-1)
    idx_Bl = torch.searchsorted(cdf_BlV, target, right=True).squeeze(-1)
    # u·total can round up to total: fall back to the last token with a positive probability
    last_Bl = probs_BlV.shape[-1] - 1 - (probs_BlV.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(idx_Bl, last_Bl)


# ---- the resampling policy hook -----------------------------------------------------------------


@dataclass
class ScaleStats:
    """What a resampling policy sees at one scale, per sample: the guided, filtered p_k of the first draw r_k and its
    entropy H = mean_i −Σ_v p log p (nats), max-probability mean_i max_v p, share of p(r_k[i]) < p_resample."""

    scale: int  # index of the scale in the sampling schedule
    num_scales: int
    pn: int
    guidance: float  # guidance weight t at this scale
    p_resample: float  # the threshold of low_prob_share_B
    vocab_size: int
    entropy_B: torch.Tensor
    max_prob_B: torch.Tensor
    low_prob_share_B: torch.Tensor
    labels_B: torch.Tensor | None = None  # the requested classes (B,)
    probs_BlV: torch.Tensor | None = None  # p_k, (B, pn², V)
    tokens_Bl: torch.Tensor | None = None  # the first draw r_k, (B, pn²)
    x_BlC: torch.Tensor | None = None  # the input area_down(f_hat_{k−1}, pn_k) as (B, pn², Cvae); None at scale 0

    def features(self) -> torch.Tensor:
        """(B, 5) float features for a small policy network: k/(K−1), t, H/log V, max-prob, low-prob share."""
        B = self.entropy_B.shape[0]
        rel = self.scale / (self.num_scales - 1) if self.num_scales > 1 else 1.0
        const = self.entropy_B.new_tensor([rel, self.guidance]).expand(B, 2)
        per_sample = torch.stack((self.entropy_B / math.log(self.vocab_size), self.max_prob_B, self.low_prob_share_B), 1)
        return torch.cat((const, per_sample), dim=1)


# critic(stats, tokens_Bl) -> keep-scores (B, pn²): mask resampling keeps a token where its score >= p_resample
TokenCritic = Callable[[ScaleStats, torch.Tensor], torch.Tensor]


@dataclass
class RefineDecision:
    """A policy's decision at one scale, per sample: how many steps, which mode, which threshold — and which
    tokens (``critic``: mask resampling keeps the tokens it scores >= the threshold, instead of p_k)."""

    steps_B: torch.Tensor  # (B,) refinement steps per sample (0: none)
    mode: str | list[str] = "mask"  # one of RESAMPLE_MODES for all samples, or one per sample
    p_resample_B: torch.Tensor | float = 0.5  # (B,) or one threshold
    critic: TokenCritic | None = None


# policy(stats) -> RefineDecision, or (mode, refine_steps, p_resample) for the whole batch
ResamplingPolicy = Callable[[ScaleStats], "RefineDecision | tuple[str, int, float]"]


def _as_decision(decision, k: int, batch: int, device) -> RefineDecision:
    """A policy's answer as a per-sample :class:`RefineDecision`, validated."""
    if not isinstance(decision, RefineDecision):
        try:
            mode, steps, p = decision
        except (TypeError, ValueError):
            raise TypeError(f"a resampling policy must return a RefineDecision or (mode, refine_steps, p_resample), "
                            f"got {decision!r} at scale {k}") from None  # fmt: skip
        decision = RefineDecision(torch.full((batch,), int(steps), dtype=torch.long), mode, float(p))
    modes = [decision.mode] * batch if isinstance(decision.mode, str) else list(decision.mode)
    bad = sorted({m for m in modes if m not in RESAMPLE_MODES})
    if bad or len(modes) != batch:
        raise ValueError(f"the resampling policy returned mode(s) {bad or modes!r} at scale {k}; expected one of "
                         f"{RESAMPLE_MODES}, one per sample ({batch})")  # fmt: skip
    steps_B = torch.as_tensor(decision.steps_B).to(device=device, dtype=torch.long).reshape(-1)
    if steps_B.shape != (batch,) or (steps_B < 0).any():
        raise ValueError(f"the resampling policy returned refine_steps {steps_B.tolist()} at scale {k}: "
                         f"need {batch} values >= 0")  # fmt: skip
    steps_B = torch.where(torch.tensor([m == "none" for m in modes], device=device), 0, steps_B)
    p_B = torch.as_tensor(decision.p_resample_B, dtype=torch.float32, device=device).expand(batch)
    return RefineDecision(steps_B, modes, p_B, decision.critic)


# ---- helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Switch modules to eval mode and restore each submodule's own mode afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def check_compatible(generator: VARTransformer, tokenizer: MultiScaleTokenizer) -> None:
    """Raise if the generator was not built for this tokenizer's codes (V, latent dim, a subset of its scales)."""
    g = generator.config
    pairs = [(name, int(getattr(g, name)), int(getattr(tokenizer, name))) for name in ("vocab_size", "latent_dim")]
    bad = [f"generator {name}={a} vs tokenizer {name}={b}" for name, a, b in pairs if a != b]
    try:  # a fewer-scale generator runs on a subset of the tokenizer's scales ending at the last one
        subset_indices(g.patch_nums, tokenizer.patch_nums)
    except ValueError:
        bad.append(f"generator patch_nums={list(g.patch_nums)} is not a subset of tokenizer patch_nums="
                   f"{list(tokenizer.patch_nums)} ending at its last scale")
    if bad:
        raise ValueError("the generator does not match the tokenizer (" + "; ".join(bad) + "): load the generator "
                         "trained on this tokenizer's codes, or the tokenizer it was trained with")


@dataclass
class _Forced:
    """Tokens forced at one scale: where (``keep``, broadcastable to (B, pn, pn)) and what (``ref``)."""

    keep: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    full: bool = False


def _forced_per_scale(edit: EditSpec | None, sched: Schedule, batch: int, tokenizer: MultiScaleTokenizer, device) -> list[_Forced]:
    """Resolve an :class:`EditSpec` on the schedule: a scale k < keep_scales is fully forced; elsewhere a
    position keeps the reference where the keep mask, area-resized to pn×pn, is >= 0.5 (at least half of
    the cell's area is known)."""
    K = len(sched)
    if edit is None:
        return [_Forced() for _ in range(K)]
    if len(edit.tokens) != K:
        raise ValueError(f"EditSpec.tokens has {len(edit.tokens)} scales, the sampling schedule {list(sched)} has {K}")
    refs = []
    for k, (t, pn) in enumerate(zip(edit.tokens, sched)):
        if t.dim() != 3 or tuple(t.shape[1:]) != (pn, pn) or t.shape[0] not in (1, batch):
            raise ValueError(f"EditSpec.tokens[{k}] must be ({batch} or 1, {pn}, {pn}) for schedule {list(sched)}, got {tuple(t.shape)}")
        refs.append(t.to(device=device, dtype=torch.long))
    tokenizer.quantizer.check_token_ids(refs)
    if not 0 <= edit.keep_scales <= K:
        raise ValueError(f"EditSpec.keep_scales must lie in [0, {K}] (scales of {list(sched)}), got {edit.keep_scales}")
    mask = edit.mask_Bhw
    if mask is not None:
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.dim() != 3 or mask.shape[0] not in (1, batch):
            raise ValueError(f"EditSpec.mask_Bhw must be ({batch} or 1, h, w), got {tuple(edit.mask_Bhw.shape)}")
        mask = mask.to(device=device, dtype=torch.float32).unsqueeze(1)
    return [_Forced(torch.ones(1, 1, 1, dtype=torch.bool, device=device), ref, full=True) if k < edit.keep_scales
            else _Forced(F.interpolate(mask, size=(pn, pn), mode="area")[:, 0] >= 0.5, ref) if mask is not None
            else _Forced() for k, (ref, pn) in enumerate(zip(refs, sched))]


# ---- the sampler ---------------------------------------------------------------------------------


class Sampler:
    """Generates images from a generator and its tokenizer; used by callbacks, ``srdd sample``, evaluation
    and the resampling policy (one implementation of every sampling option)."""

    def __init__(self, generator: VARTransformer, tokenizer: MultiScaleTokenizer, channels_last_decode: bool = False) -> None:
        """``channels_last_decode``: decode in the NHWC layout (``MultiScaleTokenizer.decode``; pixels within 2e-4)."""
        check_compatible(generator, tokenizer)
        self.generator, self.tokenizer = generator, tokenizer
        self.channels_last_decode = channels_last_decode

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def schedule(self, schedule: Sequence[int] | None = None) -> Schedule:
        """The validated sampling schedule: a subset of the trained ``patch_nums`` ending at the last one."""
        trained = tuple(self.generator.config.patch_nums)
        if schedule is None:
            return trained
        sched = as_schedule(schedule)
        subset_indices(sched, trained)
        return sched

    @torch.no_grad()
    def sample(self, labels_B: torch.Tensor | Sequence[int], config: SamplingConfig | None = None,
               seeds: Sequence[int] | torch.Tensor | int | None = None, edit: EditSpec | None = None,
               policy: ResamplingPolicy | None = None) -> SampleOutput:
        """One image per label (``generator.null_class``: unconditional), in eval mode without gradients.

        ``seeds``: one per sample (an int s gives s, s+1, ...), so sample i depends only on its seed; None: the global
        RNG. ``edit`` forces known tokens (``sampling.editing``). ``policy(stats)`` returns a RefineDecision (per
        sample) or ``(mode, refine_steps, p_resample)`` (the batch), replacing the refinement settings at every scale
        an edit does not force entirely; one needing gradients wraps its computation in ``torch.enable_grad()``.
        """
        config = SamplingConfig() if config is None else config
        labels_B = torch.as_tensor(labels_B, dtype=torch.long).to(self.device).reshape(-1)
        sched = self.schedule(config.schedule)
        run = _Run(self, labels_B, sched, scale_settings(config, sched), as_seed_list(seeds, labels_B.shape[0]), edit, policy)
        with eval_mode(self.generator, self.tokenizer):
            f_hat, tokens = run()
            images = self.tokenizer.decode(f_hat, channels_last=self.channels_last_decode).float()
        return SampleOutput(images=images, tokens=tokens, cost=run.cost, schedule=sched,
                            tokens_per_sample=run.tokens_B.cpu())


class _Run:
    """State of one ``Sampler.sample`` call: condition, cache, generators, forced tokens, inputs, cost."""

    def __init__(self, sampler: Sampler, labels_B, sched, settings, seeds, edit, policy) -> None:
        self.gen, self.tok = sampler.generator, sampler.tokenizer
        self.sched, self.settings, self.policy = sched, settings, policy
        self.K, self.B, self.device = len(sched), labels_B.shape[0], labels_B.device
        self.labels_B = labels_B
        self.attn = self.gen.config.attn
        self.rngs = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]
        self.forced = _forced_per_scale(edit, sched, self.B, self.tok, self.device)
        any_guidance = any(st.guidance > 0 for st in settings)
        # markov scales are independent passes: double only where t > 0. The cached masks attend to
        # earlier scales' K/V, so their batch stays doubled throughout once any scale is guided.
        self.doubled = [any_guidance and (self.attn != "markov" or st.guidance > 0) for st in settings]
        cond_2BD = self.gen.embed_condition(labels_B, with_null=any_guidance)
        self.cond_BD, self.cond_2BD = cond_2BD[: self.B], cond_2BD
        self.cache = self.gen.new_cache(sched) if self.attn != "markov" else None
        self.cost = SamplingCost(per_scale_passes=[0] * self.K)
        self.tokens_B = torch.zeros(self.B, device=self.device)  # per-sample query tokens (the policy's cost)
        # x_k (B, C, pn, pn) actually used at each scale; markov keeps only the current one
        self.inputs: list[torch.Tensor | None] = [None] * self.K
        self.stats: ScaleStats | None = None

    # ---- one transformer pass, with its cost ---------------------------------------------------

    def forward(self, j: int, x_BChw: torch.Tensor | None, charge_to: int, who_B: torch.Tensor | None = None) -> torch.Tensor:
        """Logits_BlV of scale j (guided when t_j > 0); its cost is charged to scale ``charge_to`` and to the
        samples ``who_B`` (bool (B,), default all) that needed the pass."""
        doubled, t = self.doubled[j], self.settings[j].guidance
        x_BlC = None if x_BChw is None else x_BChw.flatten(2).transpose(1, 2)
        if doubled and x_BlC is not None:
            x_BlC = torch.cat((x_BlC, x_BlC))
        cond = self.cond_2BD if doubled else self.cond_BD
        logits = self.gen.forward_scale(j, cond, x_BlC, self.cache, schedule=None if self.cache else self.sched)
        self._charge(j, 2 if doubled else 1, charge_to, who_B)
        if not doubled:
            return logits
        cond_BlV, uncond_BlV = logits.chunk(2)
        return cond_BlV if t == 0 else guided_logits(cond_BlV, uncond_BlV, t)

    def _charge(self, j: int, rows: int, charge_to: int, who_B: torch.Tensor | None) -> None:
        # per image: pn² query tokens (×2 with guidance); keys per the mask; a pass that only some samples
        # needed costs each image its share
        share = 1.0 if who_B is None else float(who_B.float().mean())
        q = self.sched[j] ** 2
        lo = {"markov": j, "markov_prev": max(j - 1, 0), "causal": 0}[self.attn]
        keys = sum(p * p for p in self.sched[lo : j + 1])
        self.cost.forward_passes += share
        self.cost.tokens += rows * q * share
        self.cost.attention_pairs += rows * q * keys * share
        self.cost.per_scale_passes[charge_to] += share
        self.tokens_B += rows * q * (1.0 if who_B is None else who_B.float())

    # ---- forcing an edit's tokens, drawing ----------------------------------------------------------

    def force(self, k: int, r_Bhw: torch.Tensor) -> torch.Tensor:
        fz = self.forced[k]
        return r_Bhw if fz.keep is None else torch.where(fz.keep, fz.ref, r_Bhw)

    def probs(self, logits_BlV: torch.Tensor, st: ScaleSettings, refine: bool = False) -> torch.Tensor:
        return sampling_probs(logits_BlV, st.top_k, st.top_p, st.refine_temperature if refine else st.temperature)

    def draw(self, probs_BlV: torch.Tensor, who_B: torch.Tensor | None = None) -> torch.Tensor:
        """r ~ p with U[0, 1) draws: each sample's from its own ``torch.Generator(seed)`` (on the CPU, so a seed gives
        the same draws on any device and in any batch), else the global RNG. Only the samples ``who_B`` (bool (B,),
        default all) draw, the others get zeros, so a sample's stream never depends on the rest of its batch."""
        n = probs_BlV.shape[1]
        if self.rngs is None:
            return draw_tokens(probs_BlV, torch.rand(self.B, n, device=self.device))
        rows = [True] * self.B if who_B is None else who_B.tolist()
        zero = torch.zeros(n)
        u_Bl = torch.stack([torch.rand(n, generator=g) if r else zero for g, r in zip(self.rngs, rows)])
        return draw_tokens(probs_BlV, u_Bl.to(self.device, non_blocking=True))

    # ---- refinement ------------------------------------------------------------------------------

    def replay_cache(self, k: int, who_B: torch.Tensor) -> None:
        """Recompute the K/V of the coarser scales from the current inputs (causal: 1..k−1, scale 0's start token
        is unchanged; markov_prev: 0..k−1, since the completion left only the last scales in its cache)."""
        for j in {"causal": range(1, k), "markov_prev": range(0, k)}.get(self.attn, ()):
            self.forward(j, self.inputs[j], charge_to=k, who_B=who_B)

    def complete(self, k: int, f_hat: torch.Tensor, who_B: torch.Tensor) -> torch.Tensor:
        """x̂_0: the scales after k drawn with their own settings (no refinement, edits forced), from f_hat."""
        x = self.tok.next_input(f_hat, k, self.sched)
        for j in range(k + 1, self.K):
            st, pn = self.settings[j], self.settings[j].pn
            drawn_Bl = self.draw(self.probs(self.forward(j, x, charge_to=k, who_B=who_B), st), who_B)
            f_hat, x = self.tok.next_state(j, f_hat, self.force(j, drawn_Bl.view(self.B, pn, pn)), self.sched)
        return f_hat

    def refine(self, k: int, st: ScaleSettings, dec: RefineDecision, r_Bl, probs_BlV, f_prev, tokens) -> tuple:
        """R refinement steps of scale k (per-sample steps and modes); returns (r_Bl, f_prev) and updates ``tokens``
        (the coarse ones change under renoise)."""
        B, pn = self.B, st.pn
        modes = dec.mode
        for step in range(int(dec.steps_B.max()) if dec.steps_B.numel() else 0):
            active_B = dec.steps_B > step
            for mode in sorted(set(modes)):
                sel_B = active_B & torch.tensor([m == mode for m in modes], device=self.device)
                if not sel_B.any():
                    continue
                if mode == "renoise" and k > 0:
                    probs_BlV, f_prev = self._renoise(k, st, r_Bl, probs_BlV, f_prev, tokens, sel_B)
                cand_Bl = self.draw(probs_BlV, sel_B)
                if mode == "mask":
                    score_Bl = (dec.critic(self.stats, r_Bl) if dec.critic is not None
                                else probs_BlV.gather(-1, r_Bl.unsqueeze(-1)).squeeze(-1))  # fmt: skip
                    cand_Bl = torch.where(score_Bl >= dec.p_resample_B[:, None], r_Bl, cand_Bl)
                elif mode == "pc":
                    p_cur = probs_BlV.gather(-1, r_Bl.unsqueeze(-1)).squeeze(-1)
                    p_new = probs_BlV.gather(-1, cand_Bl.unsqueeze(-1)).squeeze(-1)
                    cand_Bl = torch.where(p_new > p_cur, cand_Bl, r_Bl)
                cand_Bl = self.force(k, cand_Bl.view(B, pn, pn)).view(B, -1)
                r_Bl = torch.where(sel_B[:, None], cand_Bl, r_Bl)
        return r_Bl, f_prev

    def _renoise(self, k: int, st: ScaleSettings, r_Bl, probs_BlV, f_prev, tokens, sel_B):
        """M(k−1)·x̂_0 for the selected samples: new coarse tokens and state, and p_k predicted from it."""
        B, pn = self.B, st.pn
        f_k, _ = self.tok.next_state(k, f_prev, r_Bl.view(B, pn, pn), self.sched)
        coarse = self.tok.quantizer.quantize(self.complete(k, f_k, sel_B), self.sched, num_scales=k, force=self.force)
        pick = sel_B.view(B, 1, 1, 1)
        for j in range(k):
            tokens[j] = torch.where(sel_B.view(B, 1, 1), coarse.tokens[j], tokens[j])
            if j + 1 < k and self.cache is not None:  # markov keeps no inputs of earlier scales (no replay)
                x = self.tok.next_input(coarse.f_hats[j], j, self.sched)
                self.inputs[j + 1] = torch.where(pick, x, self.inputs[j + 1])
        f_prev = torch.where(pick, coarse.f_hat, f_prev)
        self.inputs[k] = self.tok.next_input(f_prev, k - 1, self.sched)
        self.replay_cache(k, sel_B)
        new_BlV = self.probs(self.forward(k, self.inputs[k], charge_to=k, who_B=sel_B), st, refine=True)
        return torch.where(sel_B[:, None, None], new_BlV, probs_BlV), f_prev

    # ---- the loop ----------------------------------------------------------------------------------

    def decision(self, k: int, st: ScaleSettings, probs_BlV, drawn_Bl) -> RefineDecision:
        x_BlC = None if self.inputs[k] is None else self.inputs[k].flatten(2).transpose(1, 2)
        p_drawn_Bl = probs_BlV.gather(-1, drawn_Bl.unsqueeze(-1)).squeeze(-1)
        self.stats = ScaleStats(
            scale=k, num_scales=self.K, pn=st.pn, guidance=st.guidance, p_resample=st.p_resample,
            vocab_size=probs_BlV.shape[-1], entropy_B=torch.special.entr(probs_BlV).sum(-1).mean(-1),
            max_prob_B=probs_BlV.amax(-1).mean(-1), low_prob_share_B=(p_drawn_Bl < st.p_resample).float().mean(-1),
            labels_B=self.labels_B, probs_BlV=probs_BlV, tokens_Bl=drawn_Bl, x_BlC=x_BlC)  # fmt: skip
        if self.policy is not None:
            return _as_decision(self.policy(self.stats), k, self.B, self.device)
        steps = st.refine_steps if st.resample != "none" else 0
        return _as_decision((st.resample, steps, st.p_resample), k, self.B, self.device)

    def __call__(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, sched, tok = self.B, self.sched, self.tok
        f_hat = torch.zeros(B, self.gen.config.latent_dim, sched[-1], sched[-1], device=self.device)
        tokens: list[torch.Tensor] = []
        for k, st in enumerate(self.settings):
            pn, fz = st.pn, self.forced[k]
            if fz.full:
                # known scale: the pass only feeds the cache of later scales (markov needs none)
                if self.cache is not None:
                    self.forward(k, self.inputs[k], charge_to=k)
                r_Bhw = fz.ref.expand(B, pn, pn).contiguous()
            else:
                logits_BlV = self.forward(k, self.inputs[k], charge_to=k)
                probs_BlV = self.probs(logits_BlV, st)
                drawn_Bl = self.force(k, self.draw(probs_BlV).view(B, pn, pn)).view(B, -1)
                dec = self.decision(k, st, probs_BlV, drawn_Bl)
                if st.refine_temperature != st.temperature:  # redraws from the same logits at another temperature
                    probs_BlV = self.probs(logits_BlV, st, refine=True)
                r_Bl, f_hat = self.refine(k, st, dec, drawn_Bl, probs_BlV, f_hat, tokens)
                r_Bhw = r_Bl.view(B, pn, pn)
                # free this scale's (B, pn², V) tensors before the next, larger scale's pass: peak memory is then
                # one scale's, not two (the policy's statistics hold p_k too)
                del logits_BlV, probs_BlV, drawn_Bl, dec, r_Bl
                self.stats = None
            f_hat, x_next = tok.next_state(k, f_hat, r_Bhw, sched)
            tokens.append(r_Bhw)
            if k + 1 < self.K:
                self.inputs[k + 1] = x_next
            if self.cache is None:  # markov: only the cache replay reads the inputs of earlier scales
                self.inputs[k] = None
        return f_hat, tokens


__all__ = [
    "RESAMPLE_MODES", "RefineDecision", "ResamplingPolicy", "Sampler", "ScaleSettings", "ScaleStats", "TokenCritic",
    "check_compatible", "draw_tokens", "eval_mode", "filter_logits", "guidance_weights", "guided_logits",
    "sampling_probs", "scale_settings",
]  # fmt: skip
