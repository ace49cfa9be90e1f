"""The one sampler: next-scale generation with guidance, top-k/top-p, per-sample seeds, resampling
(refinement), zero-shot editing and an optional resampling policy (DESIGN §2.3).

For k = 0..K-1 over the sampling schedule (a subset of the trained scales ending at the last one):

    logits_k = f_θ(x_k, k, y)             x_0 = start token, x_k = area_down(f_hat_{k-1}, pn_k)
    logits_k = (1 + t_k)·cond − t_k·uncond       (classifier-free guidance, only where t_k > 0)
    p_k      = softmax(filter_{top-k, top-p}(logits_k / T_k))
    r_k      ~ p_k                        (inverse CDF with each sample's own uniforms)
    f_hat_k  = f_hat_{k-1} + φ_k(up(codebook[r_k]))

Refinement at scale k (R steps; ``simple`` or ``mask``), each step:

    (r'_0..r'_{k-1}, f'_{k-1}) = M(k-1)·f_hat_k     re-degrade: residual re-quantization of the sample
    p'_k  = p(· | area_down(f'_{k-1}, pn_k))       one forward pass (causal/markov_prev: + cache replay)
    r_k   ← redraw all (simple) | keep r_k[i] where p'_k(r_k[i]) ≥ p_resample, redraw the rest (mask)
    f_hat_k = f'_{k-1} + φ_k(up(codebook[r_k]))     the coarse tokens become r'_0..r'_{k-1}
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
from srdd_lightning.sampling.config import (
    EditSpec,
    SampleOutput,
    SamplingConfig,
    SamplingCost,
    as_seed_list,
)

RESAMPLE_MODES: tuple[str, ...] = ("none", "simple", "mask")


# --------------------------------------------------------------------------------------------
# Per-scale settings
# --------------------------------------------------------------------------------------------


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


def guidance_weights(config: SamplingConfig, num_scales: int) -> list[float]:
    """Guidance weight t_k per scale: ``linear`` t_k = cfg·k/(K−1) (VAR; a one-scale schedule gets cfg),
    ``constant`` t_k = cfg, or the explicit list ``cfg_schedule``."""
    K, sched = num_scales, config.cfg_schedule
    if isinstance(sched, str):
        if sched == "linear":
            return [config.cfg * k / (K - 1) if K > 1 else float(config.cfg) for k in range(K)]
        if sched == "constant":
            return [float(config.cfg)] * K
        raise ValueError(f"cfg_schedule must be 'linear', 'constant' or a list of weights, got {sched!r}")
    weights = [float(t) for t in config.per_scale("cfg_schedule", K)]
    if any(t < 0 for t in weights):
        raise ValueError(f"cfg_schedule weights must be >= 0, got {weights}")
    return weights


def scale_settings(config: SamplingConfig, schedule: Sequence[int]) -> list[ScaleSettings]:
    """Expand and validate ``config`` into one :class:`ScaleSettings` per scale of ``schedule``."""
    K = len(schedule)
    cols = {name: config.per_scale(name, K) for name in ("top_k", "top_p", "temperature", "resample", "refine_steps", "p_resample")}
    out = []
    for k, (pn, t) in enumerate(zip(schedule, guidance_weights(config, K))):
        top_k, top_p, temp = int(cols["top_k"][k]), float(cols["top_p"][k]), float(cols["temperature"][k])
        mode, steps, p_res = cols["resample"][k], int(cols["refine_steps"][k]), float(cols["p_resample"][k])
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {top_k} at scale {k}")
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1] (0 or 1: off), got {top_p} at scale {k}")
        if temp < 0 or not math.isfinite(temp):
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temp} at scale {k}")
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {mode!r} at scale {k}")
        if steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {steps} at scale {k}")
        out.append(ScaleSettings(int(pn), t, top_k, top_p, temp, mode, steps, p_res))
    return out


# --------------------------------------------------------------------------------------------
# Guidance, filtering, drawing
# --------------------------------------------------------------------------------------------


def guided_logits(cond_BlV: torch.Tensor, uncond_BlV: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance in VAR's form: (1 + t)·cond − t·uncond."""
    return cond_BlV.mul(1.0 + t).sub_(uncond_BlV, alpha=t)


def filter_logits(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """VAR's ``sample_with_top_k_top_p_`` filter; removed tokens get −inf (a new tensor is returned).

    top-k keeps the tokens >= the k-th largest logit (0 or k >= V: off). top-p sorts ascending and
    removes the tail whose cumulative probability is <= 1 − p, i.e. keeps the smallest nucleus with
    mass >= p (0 or 1: off). The most likely token is always kept.
    """
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
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds u·total (u in [0, 1)).

    A token of probability 0 is never returned, so a filtered-out token cannot be drawn.
    """
    cdf_BlV = probs_BlV.cumsum(dim=-1)
    target = (u_Bl.to(cdf_BlV.dtype) * cdf_BlV[..., -1]).unsqueeze(-1)
    idx_Bl = torch.searchsorted(cdf_BlV, target, right=True).squeeze(-1)
    # u·total can round up to total: fall back to the last token with a positive probability
    last_Bl = probs_BlV.shape[-1] - 1 - (probs_BlV.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(idx_Bl, last_Bl)


class _Uniforms:
    """U[0, 1) draws: each sample from its own ``torch.Generator(seed)`` (on the CPU, so a seed gives the
    same draws on any device and in any batch), or from the global RNG when there are no seeds."""

    def __init__(self, seeds: list[int] | None, batch: int, device: torch.device) -> None:
        self.batch, self.device = batch, device
        self.gens = None if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, n: int) -> torch.Tensor:
        if self.gens is None:
            return torch.rand(self.batch, n, device=self.device)
        return torch.stack([torch.rand(n, generator=g) for g in self.gens]).to(self.device, non_blocking=True)


# --------------------------------------------------------------------------------------------
# The resampling policy hook
# --------------------------------------------------------------------------------------------


@dataclass
class ScaleStats:
    """Cheap statistics of the prediction at one scale, handed to a resampling policy (per sample: ``(B,)``).

    Computed from the guided, filtered distribution p_k of the scale's first draw r_k:
    entropy H = mean_i −Σ_v p log p (nats), max-probability mean_i max_v p, and the share of drawn tokens
    with p(r_k[i]) < p_resample (the config's threshold at this scale).
    """

    scale: int
    """Index of the scale in the sampling schedule."""
    num_scales: int
    pn: int
    guidance: float
    """Guidance weight t at this scale."""
    p_resample: float
    """Threshold used for ``low_prob_share_B``."""
    vocab_size: int
    entropy_B: torch.Tensor
    max_prob_B: torch.Tensor
    low_prob_share_B: torch.Tensor

    def features(self) -> torch.Tensor:
        """(B, 5) float features for a small policy network: k/(K−1), t, H/log V, max-prob, low-prob share."""
        B = self.entropy_B.shape[0]
        rel = self.scale / (self.num_scales - 1) if self.num_scales > 1 else 1.0
        const = self.entropy_B.new_tensor([rel, self.guidance]).expand(B, 2)
        per_sample = torch.stack((self.entropy_B / math.log(self.vocab_size), self.max_prob_B, self.low_prob_share_B), 1)
        return torch.cat((const, per_sample), dim=1)


# policy(stats) -> (mode, refine_steps, p_resample) for that scale and batch
ResamplingPolicy = Callable[[ScaleStats], tuple[str, int, float]]


def _scale_stats(k: int, st: ScaleSettings, K: int, probs_BlV: torch.Tensor, drawn_Bl: torch.Tensor) -> ScaleStats:
    p_drawn_Bl = probs_BlV.gather(-1, drawn_Bl.unsqueeze(-1)).squeeze(-1)
    return ScaleStats(
        scale=k, num_scales=K, pn=st.pn, guidance=st.guidance, p_resample=st.p_resample, vocab_size=probs_BlV.shape[-1],
        entropy_B=torch.special.entr(probs_BlV).sum(-1).mean(-1),
        max_prob_B=probs_BlV.amax(-1).mean(-1),
        low_prob_share_B=(p_drawn_Bl < st.p_resample).float().mean(-1),
    )  # fmt: skip


def _check_decision(decision, k: int) -> tuple[str, int, float]:
    try:
        mode, steps, p = decision
    except (TypeError, ValueError):
        raise TypeError(f"a resampling policy must return (mode, refine_steps, p_resample), got {decision!r} at scale {k}") from None
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"the resampling policy returned mode {mode!r} at scale {k}; expected one of {RESAMPLE_MODES}")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"the resampling policy returned refine_steps={steps} < 0 at scale {k}")
    return mode, steps, float(p)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


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
    pairs = [
        ("vocab_size", int(g.vocab_size), int(tokenizer.vocab_size)),
        ("latent_dim", int(g.latent_dim), int(tokenizer.latent_dim)),
    ]
    bad = [f"generator {name}={a} vs tokenizer {name}={b}" for name, a, b in pairs if a != b]
    try:  # a fewer-scale generator runs on a subset of the tokenizer's scales ending at the last one
        subset_indices(g.patch_nums, tokenizer.patch_nums)
    except ValueError:
        bad.append(f"generator patch_nums={list(g.patch_nums)} is not a subset of tokenizer patch_nums="
                   f"{list(tokenizer.patch_nums)} ending at its last scale")
    if bad:
        raise ValueError(
            "the generator does not match the tokenizer (" + "; ".join(bad) + "): load the generator trained on "
            "this tokenizer's codes, or the tokenizer it was trained with"
        )


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
    out = []
    for k, (ref, pn) in enumerate(zip(refs, sched)):
        if k < edit.keep_scales:
            out.append(_Forced(torch.ones(1, 1, 1, dtype=torch.bool, device=device), ref, full=True))
        elif mask is not None:
            keep = F.interpolate(mask, size=(pn, pn), mode="area")[:, 0] >= 0.5
            out.append(_Forced(keep, ref))
        else:
            out.append(_Forced())
    return out


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


class Sampler:
    """Generates images from a generator and its tokenizer; used by callbacks, ``srdd sample``, evaluation
    and the resampling policy (one implementation of every sampling option)."""

    def __init__(self, generator: VARTransformer, tokenizer: MultiScaleTokenizer) -> None:
        check_compatible(generator, tokenizer)
        self.generator, self.tokenizer = generator, tokenizer

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
    def sample(
        self,
        labels_B: torch.Tensor | Sequence[int],
        config: SamplingConfig | None = None,
        seeds: Sequence[int] | torch.Tensor | int | None = None,
        edit: EditSpec | None = None,
        policy: ResamplingPolicy | None = None,
    ) -> SampleOutput:
        """Sample one image per label (``generator.null_class`` = unconditional).

        ``seeds``: one per sample (or an int s, giving s, s+1, ...): sample i then depends only on its seed,
        not on the batch; None uses the global RNG. ``edit`` forces known tokens (``sampling.editing``).
        ``policy(stats) -> (mode, refine_steps, p_resample)`` overrides the refinement settings per scale
        (for the whole batch; not consulted at scales an edit forces entirely).
        Runs without gradients in eval mode (restored afterwards); a policy needing gradients wraps its
        own computation in ``torch.enable_grad()``.
        """
        config = SamplingConfig() if config is None else config
        device = self.device
        labels_B = torch.as_tensor(labels_B, dtype=torch.long).to(device).reshape(-1)
        sched = self.schedule(config.schedule)
        run = _Run(self, labels_B, sched, scale_settings(config, sched), as_seed_list(seeds, labels_B.shape[0]), edit, policy)
        with eval_mode(self.generator, self.tokenizer):
            f_hat, tokens = run()
            images = self.tokenizer.decode(f_hat).float()
        return SampleOutput(images=images, tokens=tokens, cost=run.cost, schedule=sched)


class _Run:
    """State of one ``Sampler.sample`` call: condition, cache, uniforms, forced tokens, cost."""

    def __init__(self, sampler: Sampler, labels_B, sched, settings, seeds, edit, policy) -> None:
        self.gen, self.tok = sampler.generator, sampler.tokenizer
        self.sched, self.settings, self.policy = sched, settings, policy
        self.K, self.B, self.device = len(sched), labels_B.shape[0], labels_B.device
        self.attn = self.gen.config.attn
        self.uniforms = _Uniforms(seeds, self.B, self.device)
        self.forced = _forced_per_scale(edit, sched, self.B, self.tok, self.device)
        any_guidance = any(st.guidance > 0 for st in settings)
        # markov scales are independent passes: double only where t > 0. The cached masks attend to
        # earlier scales' K/V, so their batch stays doubled throughout once any scale is guided.
        self.doubled = [any_guidance and (self.attn != "markov" or st.guidance > 0) for st in settings]
        cond_2BD = self.gen.embed_condition(labels_B, with_null=any_guidance)
        self.cond_BD, self.cond_2BD = cond_2BD[: self.B], cond_2BD
        self.cache = self.gen.new_cache(sched) if self.attn != "markov" else None
        self.cost = SamplingCost(per_scale_passes=[0] * self.K)

    # ---- one transformer pass, with its cost ---------------------------------------------------

    def forward(self, j: int, x_BChw: torch.Tensor | None, charge_to: int) -> torch.Tensor:
        """Logits_BlV of scale j (guided when t_j > 0); its cost is charged to scale ``charge_to``."""
        doubled, t = self.doubled[j], self.settings[j].guidance
        x_BlC = None if x_BChw is None else x_BChw.flatten(2).transpose(1, 2)
        if doubled and x_BlC is not None:
            x_BlC = torch.cat((x_BlC, x_BlC))
        cond = self.cond_2BD if doubled else self.cond_BD
        if self.cache is None:
            logits = self.gen.forward_scale(j, cond, x_BlC, schedule=self.sched)
        else:
            logits = self.gen.forward_scale(j, cond, x_BlC, self.cache)
        self._charge(j, 2 if doubled else 1, charge_to)
        if not doubled:
            return logits
        cond_BlV, uncond_BlV = logits.chunk(2)
        return cond_BlV if t == 0 else guided_logits(cond_BlV, uncond_BlV, t)

    def _charge(self, j: int, rows: int, charge_to: int) -> None:
        # per image: pn² query tokens (×2 with guidance); keys per the mask
        q = self.sched[j] ** 2
        lo = {"markov": j, "markov_prev": max(j - 1, 0), "causal": 0}[self.attn]
        keys = sum(p * p for p in self.sched[lo : j + 1])
        self.cost.forward_passes += 1
        self.cost.tokens += rows * q
        self.cost.attention_pairs += rows * q * keys
        self.cost.per_scale_passes[charge_to] += 1

    # ---- editing -----------------------------------------------------------------------------

    def force(self, k: int, r_Bhw: torch.Tensor) -> torch.Tensor:
        fz = self.forced[k]
        return r_Bhw if fz.keep is None else torch.where(fz.keep, fz.ref, r_Bhw)

    # ---- refinement ------------------------------------------------------------------------------

    def redegrade(self, f_hat_BChw: torch.Tensor, k: int) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """M(k−1) applied to the sample: residual re-quantization of ``f_hat`` onto scales 0..k−1 (forced
        tokens stay forced). Returns the coarse tokens, the state f'_{k−1} and the inputs of scales 1..k."""
        q = self.tok.quantizer
        coarse = q.quantize(f_hat_BChw, self.sched, num_scales=k, force=self.force)
        inputs = [q.next_input(f, j, self.sched) for j, f in enumerate(coarse.f_hats)]
        return coarse.tokens, coarse.f_hat, inputs

    def replay_cache(self, k: int, inputs: list[torch.Tensor]) -> None:
        """Recompute the K/V of the coarser scales from the re-degraded states (causal: 1..k−1, scale 0's
        start token is unchanged; markov_prev: 0..k−1 since its cache only holds scale k−1 and k)."""
        if self.attn == "causal":
            scales = range(1, k)
        elif self.attn == "markov_prev":
            scales = range(0, k) if k >= 2 else range(0)
        else:
            return
        for j in scales:
            self.forward(j, None if j == 0 else inputs[j - 1], charge_to=k)

    # ---- the loop ----------------------------------------------------------------------------------

    def __call__(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        B, sched, tok = self.B, self.sched, self.tok
        size = sched[-1]
        f_hat = torch.zeros(B, self.gen.config.latent_dim, size, size, device=self.device)
        x_next: torch.Tensor | None = None
        tokens: list[torch.Tensor] = []
        for k, st in enumerate(self.settings):
            pn, fz = st.pn, self.forced[k]
            if fz.full:
                # known scale: the pass only feeds the cache of later scales (markov needs none)
                if self.cache is not None:
                    self.forward(k, x_next, charge_to=k)
                r_Bhw = fz.ref.expand(B, pn, pn).contiguous()
                f_hat, x_next = tok.next_state(k, f_hat, r_Bhw, sched)
                tokens.append(r_Bhw)
                continue

            probs_BlV = sampling_probs(self.forward(k, x_next, charge_to=k), st.top_k, st.top_p, st.temperature)
            drawn_Bl = draw_tokens(probs_BlV, self.uniforms(pn * pn))
            mode, steps, p_res = st.resample, st.refine_steps, st.p_resample
            if self.policy is not None:
                mode, steps, p_res = _check_decision(self.policy(_scale_stats(k, st, self.K, probs_BlV, drawn_Bl)), k)
            r_Bhw = self.force(k, drawn_Bl.view(B, pn, pn))
            f_prev = f_hat
            f_new, x_new = tok.next_state(k, f_prev, r_Bhw, sched)
            for _ in range(steps if mode != "none" else 0):
                if k > 0:  # at k = 0 the input is the start token: the prediction is unchanged, reuse it
                    coarse, f_prev, inputs = self.redegrade(f_new, k)
                    self.replay_cache(k, inputs)
                    logits = self.forward(k, inputs[-1], charge_to=k)
                    probs_BlV = sampling_probs(logits, st.top_k, st.top_p, st.temperature)
                    tokens[:k] = coarse
                redrawn_Bl = draw_tokens(probs_BlV, self.uniforms(pn * pn))
                r_Bl = r_Bhw.reshape(B, pn * pn)
                if mode == "mask":
                    p_cur_Bl = probs_BlV.gather(-1, r_Bl.unsqueeze(-1)).squeeze(-1)
                    redrawn_Bl = torch.where(p_cur_Bl >= p_res, r_Bl, redrawn_Bl)
                r_Bhw = self.force(k, redrawn_Bl.view(B, pn, pn))
                f_new, x_new = tok.next_state(k, f_prev, r_Bhw, sched)
            tokens.append(r_Bhw)
            f_hat, x_next = f_new, x_new
        return f_hat, tokens


__all__ = [
    "RESAMPLE_MODES",
    "ResamplingPolicy",
    "Sampler",
    "ScaleSettings",
    "ScaleStats",
    "check_compatible",
    "draw_tokens",
    "eval_mode",
    "filter_logits",
    "guidance_weights",
    "guided_logits",
    "sampling_probs",
    "scale_settings",
]
