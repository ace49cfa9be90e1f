"""The stage-2 generator: VAR's transformer with a switchable attention mask.

``attn="causal"`` is VAR (scale k attends to scales <= k); ``"markov"`` is SRDD (scale k attends to itself only,
its input already summarises the coarser scales); ``"markov_prev"`` adds the previous scale (an ablation).
``x_BLC`` concatenates the scales coarse-to-fine; the first scale's input is a start token from the class embedding.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from srdd_lightning.models.scales import VAR_PATCH_NUMS_256, Schedule, as_schedule, num_tokens, scale_ids, scale_slices, subset_indices

AttnMode = Literal["markov", "causal", "markov_prev"]
ATTN_MODES: tuple[str, ...] = get_args(AttnMode)
# How a teacher-forced sequence is attended: "flex" = one block-sparse flex_attention call (compiled on CUDA),
# "sdpa" = one SDPA call per scale (markov) or with the cached dense block-causal mask (causal), "auto" = flex on
# CUDA for the markov masks, sdpa otherwise (on the CPU the per-scale loop measured ~5x faster than compiled flex).
AttentionBackend = Literal["auto", "flex", "sdpa"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)

# q, k, v (B, H, l, c) and the softmax scale -> attended values (B, H, l, c)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


# ---- Config ----------------------------------------------------------------------------------


@dataclass
class InitConfig:
    """VAR's initialisation (``init_weights``), with its command-line names noted."""

    std: float | None = None  # trunc-normal std of every weight and learned embedding; None = sqrt(1/(3·width))
    head: float = 0.02  # multiplier on the output head's weight (VAR's ``--hd``)
    adaln: float = 0.5  # multiplier on the AdaLN scale/shift rows (VAR's ``--aln``)
    adaln_gate: float = 1e-5  # on the AdaLN gate rows γ1, γ2 (VAR's ``--alng``; its README: 1e-3 for d16/d20)


@dataclass
class GeneratorConfig:
    """Size, schedule and mask of the generator transformer."""

    depth: int = 16  # number of transformer blocks
    width: int | None = None  # model width C; None = 64·depth (VAR's rule)
    num_heads: int | None = None  # attention heads; None = depth (head dim 64 with the default width)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    num_classes: int = 1000  # real classes; index num_classes is the null class of guidance; 1 = unconditional
    vocab_size: int = 4096  # codebook size V of the tokenizer (logits per token)
    latent_dim: int = 32  # code dimension Cvae of the tokenizer (input features per token)
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS_256  # trained schedule: a level/position embedding per token
    attn: AttnMode = "markov"  # "markov" (own scale, SRDD), "causal" (scales <= own, VAR), "markov_prev" (own + prev)
    drop_path: float | None = None  # stochastic depth of the last block (linear from 0); None = 0.1·depth/24 (VAR)
    attn_l2_norm: bool = True  # cosine attention: L2-normalised q/k, learned per-head temperature (VAR's --anorm)
    cond_drop: float = 0.1  # probability of a label becoming the null class in training (:meth:`drop_labels`)
    norm_eps: float = 1e-6  # LayerNorm epsilon (VAR's value)
    init: InitConfig = field(default_factory=InitConfig)  # weight initialisation

    def __post_init__(self) -> None:
        self.patch_nums = as_schedule(self.patch_nums)
        if isinstance(self.init, dict):  # from YAML / kwargs
            self.init = InitConfig(**self.init)
        if self.attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {self.attn!r}")
        for name in ("depth", "num_classes", "vocab_size", "latent_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        width, heads, drop_path = self._auto()
        if width < 1 or heads < 1:
            raise ValueError(f"width and num_heads must be >= 1, got width={width}, num_heads={heads}")
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by num_heads ({heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if self.init.std is not None and self.init.std <= 0:
            raise ValueError(f"init.std must be > 0 or None (automatic), got {self.init.std}")

    def _auto(self) -> tuple[int, int, float]:
        """(width, num_heads, drop_path), each None replaced by VAR's rule."""
        width = int(self.width) if self.width is not None else 64 * int(self.depth)
        heads = int(self.num_heads) if self.num_heads is not None else int(self.depth)
        return width, heads, float(self.drop_path) if self.drop_path is not None else 0.1 * self.depth / 24

    def resolved(self) -> GeneratorConfig:
        """A copy with every automatic (None) field replaced by its value."""
        width, heads, drop_path = self._auto()
        std = self.init.std if self.init.std is not None else math.sqrt(1 / (3 * width))
        return dataclasses.replace(self, width=width, num_heads=heads, drop_path=drop_path,
                                   init=dataclasses.replace(self.init, std=std))


# ---- Blocks ----------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, x / (1-p) when kept (so E[output] = x)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, u_B: torch.Tensor | None = None) -> torch.Tensor:
        """``u_B``: per-sample uniforms drawn by the caller (kept iff u >= p); None draws from the global RNG."""
        if self.p == 0.0 or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if u_B is None:
            keep = x.new_empty(shape).bernoulli_(1 - self.p)
        else:
            keep = (u_B >= self.p).to(x.dtype).view(shape)
        return x * keep.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def cpu_uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniforms drawn on the CPU (device-independent), moved without a host sync (pinned, non-blocking on CUDA)."""
    u = torch.rand(shape, generator=generator)
    if device.type == "cuda":
        return u.pin_memory().to(device, non_blocking=True)
    return u.to(device)


class SelfAttention(nn.Module):
    """Multi-head attention, VAR-style: qkv without bias plus learned q/v biases (k bias 0), cosine q·k."""

    def __init__(self, width: int, num_heads: int, l2_norm: bool) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)
        if l2_norm:
            # softmax(τ_h · q̂·k̂), τ_h = exp(min(log_temp_h, log 100)), log_temp init log 4
            self.log_temp = nn.Parameter(torch.full((num_heads,), math.log(4.0)))
            self.scale = 1.0
        else:
            self.register_parameter("log_temp", None)
            self.scale = 0.25 / math.sqrt(self.head_dim)  # VAR's scale without l2 norm

    def forward(self, x_BLC: torch.Tensor, attend: Attend) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_BLC, self.qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, c)
        if self.log_temp is not None:
            temp = self.log_temp.clamp(max=math.log(100.0)).exp().view(1, -1, 1, 1)
            q = F.normalize(q, dim=-1).mul(temp)
            k = F.normalize(k, dim=-1)
        out = attend(q, k, v, self.scale)  # (B, H, L, c)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class AdaLNBlock(nn.Module):
    """Transformer block with LayerNorm (no affine) modulated by the class condition (AdaLN)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, l2_norm: bool, drop_path: float, eps: float):
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada = nn.Linear(width, 6 * width)  # applied to SiLU(cond)
        self.attn = SelfAttention(width, num_heads, l2_norm)
        hidden = round(width * mlp_ratio)  # Linear -> GELU(tanh) -> Linear
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(approximate="tanh"),
                                             fc2=nn.Linear(hidden, width)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attend: Attend,
                u_2B: torch.Tensor | None = None) -> torch.Tensor:
        """``u_2B``: the drop-path uniforms of the attention and MLP branches (None: the global RNG)."""
        u_attn, u_mlp = (None, None) if u_2B is None else u_2B.unbind(0)
        # [γ1, γ2, scale1, scale2, shift1, shift2] = Linear(SiLU(cond))    (VAR's row order)
        g1, g2, s1, s2, b1, b2 = self.ada(F.silu(cond_BD)).view(-1, 1, 6, self.width).unbind(2)
        # x <- x + drop_path(attn(LN(x)·(1+scale1) + shift1)·γ1);  same for the MLP with index 2
        x_BLC = x_BLC + self.drop_path(self.attn(self.norm(x_BLC) * (1 + s1) + b1, attend) * g1, u_attn)
        x_BLC = x_BLC + self.drop_path(self.mlp(self.norm(x_BLC) * (1 + s2) + b2) * g2, u_mlp)
        return x_BLC


class AdaLNHead(nn.Module):
    """logits = Linear(LN(x)·(1+scale) + shift), [scale, shift] = Linear(SiLU(cond))."""

    def __init__(self, width: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada(F.silu(cond_BD)).view(-1, 1, 2, self.width).unbind(2)
        return self.out(self.norm(x_BLC) * (1 + scale) + shift)


# ---- KV cache for step-wise sampling -----------------------------------------------------------


class KVCache:
    """K/V of earlier scales for :meth:`VARTransformer.forward_scale`, owned by the caller; re-running a scale
    (resampling) replaces its entry and drops later ones.

    Per block, K/V buffers (B, H, T, c) are allocated once and each scale writes into its slice (a concatenating
    cache copied all past scales at every block of every scale, O(K²)). ``causal``: T = all tokens. ``markov_prev``:
    T = the two largest consecutive scales, [previous | current] right-aligned, the previous moved forward once when
    the next begins (n_si grows: the copies never overlap). Key order is the sequence order: logits equal forward's.
    """

    def __init__(self, schedule: Schedule, attn: str) -> None:
        self.schedule = schedule
        self.attn = attn
        self._sizes = [p * p for p in schedule]
        if attn == "causal":
            self._length = sum(self._sizes)
        elif attn == "markov_prev":
            self._length = max(a + b for a, b in zip([0, *self._sizes], self._sizes))
        else:
            self._length = 0
        self._k: list[torch.Tensor] = []  # per block, (B, H, T, c)
        self._v: list[torch.Tensor] = []
        self._offset: dict[int, int] = {}  # cached scale -> start of its slice in the buffers
        self._si = -1  # the scale being run

    def key_scales(self, si: int) -> range:
        """Scales whose tokens a query at scale ``si`` attends to (including ``si``)."""
        return _key_scales(self.attn, si)

    @property
    def cached_scales(self) -> list[int]:
        return sorted(self._offset)

    @property
    def nbytes(self) -> int:
        """Bytes held by the K/V buffers (0 before the first pass and for ``markov``)."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def _home(self, j: int, si: int) -> int:
        """Offset of scale j's slice while scale si (j ∈ key_scales(si)) runs."""
        if self.attn == "causal":
            return sum(self._sizes[:j])
        return self._length - sum(self._sizes[j : si + 1])  # markov_prev: [prev | current] right-aligned

    def _begin(self, si: int) -> None:
        needed = [j for j in self.key_scales(si) if j != si]
        missing = [j for j in needed if j not in self._offset]
        if missing:
            raise RuntimeError(f"KVCache ({self.attn}) lacks scales {missing} needed by scale {si}: call forward_scale "
                               f"for the scales of {list(self.schedule)} in order, with the same cache")
        self._offset = {j: off for j, off in self._offset.items() if j in needed}
        self._si = si
        if self.attn == "markov":
            return
        for j in needed:  # markov_prev: the previous scale moves in front of the current one
            home, off, n = self._home(j, si), self._offset[j], self._sizes[j]
            if home != off:
                for buf in self._k + self._v:
                    buf[:, :, home : home + n].copy_(buf[:, :, off : off + n])
                self._offset[j] = home
        self._offset[si] = self._home(si, si)

    def _attend(self, si: int, block: int) -> Attend:
        if self.attn == "markov":
            return _plain_attend

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            self._store(block, k, v, past=any(j != si for j in self._offset))
            lo, hi = self._offset[self.key_scales(si)[0]], self._offset[si] + self._sizes[si]
            return F.scaled_dot_product_attention(q, self._k[block][:, :, lo:hi], self._v[block][:, :, lo:hi], scale=scale)

        return attend

    def _store(self, block: int, k: torch.Tensor, v: torch.Tensor, past: bool) -> None:
        """Write scale ``self._si``'s K/V of ``block`` into its slice, allocating the buffers on first use."""
        if k.requires_grad:
            raise RuntimeError("KVCache writes K/V in place, for sampling: call forward_scale under torch.no_grad() "
                               "(train with the teacher-forced forward)")
        if block == 0 and self._k and (self._k[0].shape[0], self._k[0].dtype, self._k[0].device) != (k.shape[0], k.dtype, k.device):
            if past:
                if self._k[0].shape[0] != k.shape[0]:
                    raise ValueError(f"batch size changed within one KVCache: {self._k[0].shape[0]} -> {k.shape[0]}")
                raise ValueError(f"dtype/device changed within one KVCache: {self._k[0].dtype} on {self._k[0].device} "
                                 f"-> {k.dtype} on {k.device}")
            self._k, self._v = [], []  # a new batch starting at a scale that needs no past: start afresh
        if len(self._k) == block:
            B, H, _, c = k.shape
            self._k.append(k.new_empty(B, H, self._length, c))
            self._v.append(v.new_empty(B, H, self._length, c))
        off = self._offset[self._si]
        self._k[block][:, :, off : off + k.shape[2]].copy_(k)
        self._v[block][:, :, off : off + v.shape[2]].copy_(v)


def _key_scales(attn: str, si: int) -> range:
    """Key scales of a query at scale ``si``: {si} (markov), {si-1, si} (markov_prev), {0..si} (causal)."""
    if attn == "markov":
        return range(si, si + 1)
    if attn == "markov_prev":
        return range(max(si - 1, 0), si + 1)
    return range(0, si + 1)


def attention_pairs(schedule: Sequence[int], attn: str) -> int:
    """Query-key pairs of one image's teacher-forced sequence under the mask (per head and block)."""
    return sum(p * p * sum(schedule[j] ** 2 for j in _key_scales(attn, k)) for k, p in enumerate(schedule))


# ---- The model ---------------------------------------------------------------------------------


class VARTransformer(nn.Module):
    """VAR's class-conditional next-scale transformer; the mask is ``config.attn``."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        cfg = self.config = config.resolved()
        C, K = cfg.width, len(cfg.patch_nums)
        self.patch_nums: Schedule = cfg.patch_nums
        self.num_classes = cfg.num_classes

        self.word_embed = nn.Linear(cfg.latent_dim, C)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class
        self.pos_start = nn.Parameter(torch.empty(1, cfg.patch_nums[0] ** 2, C))
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens(cfg.patch_nums), C))  # one per trained token
        self.level_embed = nn.Embedding(K, C)  # one per trained scale
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(AdaLNBlock(C, cfg.num_heads, cfg.mlp_ratio, cfg.attn_l2_norm, rate, cfg.norm_eps)
                                    for rate in rates)
        self.head = AdaLNHead(C, cfg.vocab_size, cfg.norm_eps)
        self.attention: AttentionBackend = "auto"
        """How :meth:`forward` attends (see ``AttentionBackend``); a runtime choice, not part of the weights."""
        self._plans: dict[tuple, Attend] = {}  # (schedule, device, backend) -> attention over that sequence
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VAR's initialisation: trunc-normal everywhere, then head ×head, proj/fc2 ÷ sqrt(2·depth), AdaLN rows."""
        init, C, std = self.config.init, self.config.width, self.config.init.std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        self.head.out.weight.mul_(init.head)
        self.head.ada.weight.mul_(init.adaln)
        for blk in self.blocks:
            blk.attn.q_bias.zero_()
            blk.attn.v_bias.zero_()
            if blk.attn.log_temp is not None:
                blk.attn.log_temp.fill_(math.log(4.0))
            # residual outputs shrink with depth so the sum of 2·depth branches keeps unit scale
            blk.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
            blk.mlp.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
            blk.ada.weight[: 2 * C].mul_(init.adaln_gate)  # γ1, γ2: blocks start near identity
            blk.ada.weight[2 * C :].mul_(init.adaln)

    @property
    def null_class(self) -> int:
        """Label of the unconditional (null) class used by classifier-free guidance."""
        return self.num_classes

    def drop_labels(self, label_B: torch.Tensor, p: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``p`` (default ``config.cond_drop``).
        ``generator``: a CPU generator (draws on the CPU, then moved), or None for the global RNG."""
        p = self.config.cond_drop if p is None else p
        if generator is None:
            drop_B = torch.rand(label_B.shape, device=label_B.device) < p
        else:
            drop_B = cpu_uniform(tuple(label_B.shape), generator, label_B.device) < p
        return torch.where(drop_B, torch.full_like(label_B, self.null_class), label_B)

    def embed_condition(self, label_B: torch.Tensor, with_null: bool = False) -> torch.Tensor:
        """Class embedding cond_BD; ``with_null`` appends null-class rows (cond rows, then null rows) for CFG."""
        if label_B.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"labels must be an integer tensor, got {label_B.dtype}")
        if label_B.numel() and label_B.device.type == "cpu" and not torch.compiler.is_compiling():
            if int(label_B.min()) < 0 or int(label_B.max()) > self.null_class:
                raise ValueError(f"labels must lie in [0, {self.null_class}] (num_classes={self.num_classes}, "
                                 f"{self.null_class} = null class), got [{int(label_B.min())}, {int(label_B.max())}]")
        elif label_B.numel():  # on an accelerator (or compiled): checked on the device, no host sync in the step
            ok = ((label_B >= 0) & (label_B <= self.null_class)).all()
            torch._assert_async(ok, f"labels must lie in [0, {self.null_class}] (num_classes={self.num_classes})")
        if with_null:
            label_B = torch.cat((label_B, torch.full_like(label_B, self.null_class)))
        return self.class_embed(label_B)

    def _schedule(self, schedule: Sequence[int] | None) -> tuple[Schedule, list[int]]:
        """Validated schedule and the trained index of each of its scales."""
        sched = self.patch_nums if schedule is None else as_schedule(schedule)
        trained_idx = subset_indices(sched, self.patch_nums)
        first_l = self.pos_start.shape[1]
        if sched[0] ** 2 != first_l and first_l != 1:
            raise ValueError(f"schedule {list(sched)} starts at {sched[0]}, but the start token was trained for "
                             f"{self.patch_nums[0]}x{self.patch_nums[0]} tokens (patch_nums {list(self.patch_nums)})")
        return sched, trained_idx

    def _level_pos(self, trained_si: int) -> torch.Tensor:
        """(1, pn², C) level + position embedding of a trained scale."""
        s = scale_slices(self.patch_nums)[trained_si]
        return self.pos_embed[:, s] + self.level_embed.weight[trained_si]

    def _start_tokens(self, cond_BD: torch.Tensor, pn: int) -> torch.Tensor:
        """First-scale input: class embedding + pos_start (broadcast over pn² tokens if trained for one)."""
        return (cond_BD.unsqueeze(1) + self.pos_start).expand(-1, pn * pn, -1)

    def _sequence_attention(self, schedule: Schedule, device: torch.device) -> Attend:
        """Attention over a teacher-forced sequence under ``config.attn``, built once per schedule and device. sdpa:
        VAR's dense block-causal mask, or one call per scale for the markov masks (cost sum pn⁴, no L×L mask)."""
        backend = self.attention
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = "flex" if device.type == "cuda" and self.config.attn != "causal" else "sdpa"
        key = (tuple(schedule), str(device), backend)
        if key not in self._plans:
            build = _flex_attention_plan if backend == "flex" else _sdpa_attention_plan
            self._plans[key] = build(tuple(schedule), self.config.attn, device)
        return self._plans[key]

    def forward(self, label_B: torch.Tensor, x_BLC: torch.Tensor, schedule: Sequence[int] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Teacher-forced logits_BLV (float32) of every scale of ``schedule`` from the inputs ``x_BLC`` of scales 1..
        (B, L - schedule[0]², Cvae); ``generator`` (CPU) draws all blocks' drop-path masks (None: the global RNG)."""
        sched, trained_idx = self._schedule(schedule)
        B, first_l = label_B.shape[0], sched[0] ** 2
        expected = (B, num_tokens(sched) - first_l, self.config.latent_dim)
        if tuple(x_BLC.shape) != expected:
            raise ValueError(f"x_BLC must have shape (B, L - first_l, latent_dim) = {expected} for schedule "
                             f"{list(sched)}, got {tuple(x_BLC.shape)}")
        # Embeddings outside autocast, in the parameters' dtype (float32 as VAR unless FSDP casts the parameters;
        # small next to the tokens); under autocast the residual stream then runs in the autocast dtype, as VAR's.
        dtype = self.word_embed.weight.dtype
        with torch.autocast(device_type=x_BLC.device.type, enabled=False):
            cond_BD = self.embed_condition(label_B).to(dtype)
            h_BLC = torch.cat((self._start_tokens(cond_BD, sched[0]), self.word_embed(x_BLC.to(dtype))), dim=1)
            h_BLC = h_BLC + torch.cat([self._level_pos(t) for t in trained_idx], dim=1)
        h_BLC, cond_BD = _to_autocast_dtype(h_BLC, cond_BD)
        attend = self._sequence_attention(sched, x_BLC.device)
        u_D2B = None
        if generator is not None and self.training and any(b.drop_path.p > 0 for b in self.blocks):
            u_D2B = cpu_uniform((len(self.blocks), 2, B), generator, x_BLC.device)  # one transfer per step
        for i, blk in enumerate(self.blocks):
            h_BLC = blk(h_BLC, cond_BD, attend, None if u_D2B is None else u_D2B[i])
        return self.head(h_BLC, cond_BD).float()

    def new_cache(self, schedule: Sequence[int] | None = None) -> KVCache:
        """An empty cache for step-wise sampling over ``schedule`` (default: the trained one)."""
        sched, _ = self._schedule(schedule)
        return KVCache(sched, self.config.attn)

    def forward_scale(self, si: int, cond: torch.Tensor, x_BlC: torch.Tensor | None, cache: KVCache | None = None,
                      schedule: Sequence[int] | None = None) -> torch.Tensor:
        """Logits_BlV (float32) of scale ``si`` from its input ``x_BlC`` (None at si = 0) and labels or cond_BD (e.g.
        2B rows for CFG); ``causal``/``markov_prev`` need the ``cache`` holding the earlier scales."""
        if cache is None:
            if self.config.attn != "markov":
                raise ValueError(f"attn={self.config.attn!r} needs a KVCache: pass cache=model.new_cache(schedule)")
            sched, trained_idx = self._schedule(schedule)
        else:
            if cache.attn != self.config.attn:
                raise ValueError(f"cache was made for attn={cache.attn!r}, the model uses {self.config.attn!r}")
            if schedule is not None and as_schedule(schedule) != cache.schedule:
                raise ValueError(f"schedule {list(schedule)} differs from the cache's {list(cache.schedule)}")
            sched, trained_idx = self._schedule(cache.schedule)
        if not 0 <= si < len(sched):
            raise IndexError(f"scale index {si} out of range for schedule {list(sched)}")
        cond_BD = cond if cond.is_floating_point() else self.embed_condition(cond)
        pn = sched[si]
        dtype = self.word_embed.weight.dtype
        with torch.autocast(device_type=cond_BD.device.type, enabled=False):
            cond_BD = cond_BD.to(dtype)
            if si == 0:
                if x_BlC is not None:
                    raise ValueError("the first scale's input is the start token: pass x_BlC=None at si=0")
                h_BlC = self._start_tokens(cond_BD, pn)
            else:
                expected = (cond_BD.shape[0], pn * pn, self.config.latent_dim)
                if x_BlC is None or tuple(x_BlC.shape) != expected:
                    got = None if x_BlC is None else tuple(x_BlC.shape)
                    raise ValueError(f"x_BlC of scale {si} (pn={pn}) must have shape {expected} (cond rows), got {got}")
                h_BlC = self.word_embed(x_BlC.to(dtype))
            h_BlC = h_BlC + self._level_pos(trained_idx[si])
        h_BlC, cond_BD = _to_autocast_dtype(h_BlC, cond_BD)
        if cache is not None:
            cache._begin(si)
        for i, blk in enumerate(self.blocks):
            attend = cache._attend(si, i) if cache is not None else _plain_attend
            h_BlC = blk(h_BlC, cond_BD, attend)
        return self.head(h_BlC, cond_BD).float()

    def training_flops(self, batch: int, schedule: Sequence[int] | None = None) -> int:
        """Approximate FLOPs of one training step (forward + backward = 3 × forward) on ``batch`` images:
        2·(matmul weights)·tokens for the linear layers, 4·width·pairs per block for attention."""
        sched = self.patch_nums if schedule is None else as_schedule(schedule)
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = 4 * self.config.width * attention_pairs(sched, self.config.attn) * len(self.blocks)
        return 3 * batch * (2 * matmul * num_tokens(sched) + attention)

    def no_weight_decay_names(self) -> set[str]:
        """Parameters AdamW should not decay, as VAR's ``filter_params``: biases, 1-D params, the position and level
        embeddings, temperatures. The class embedding is decayed, as in VAR."""
        embeddings = {"level_embed.weight", "pos_start", "pos_embed"}
        return {name for name, p in self.named_parameters()
                if p.ndim < 2 or name in embeddings or name.endswith(("bias", "log_temp"))}


def _plain_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _to_autocast_dtype(h: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR casts the residual stream and the condition to the autocast dtype before the blocks (bf16 adds and
    norms' inputs); outside autocast they keep the parameters' dtype."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return h.to(dtype), cond.to(dtype)
    return h, cond


def _sdpa_attention_plan(schedule: Schedule, attn: str, device: torch.device) -> Attend:
    sdpa = F.scaled_dot_product_attention
    if attn == "causal":
        sid_L = scale_ids(schedule, device=device)
        mask_LL = sid_L[:, None] >= sid_L[None, :]

        def attend_masked(q, k, v, scale):
            return sdpa(q, k, v, attn_mask=mask_LL, scale=scale)

        return attend_masked
    slices = scale_slices(schedule)  # (query slice, key slice) per scale: the keys are one contiguous range
    ranges = [(s, slice(slices[_key_scales(attn, si)[0]].start, s.stop)) for si, s in enumerate(slices)]

    def attend_per_scale(q, k, v, scale):
        return torch.cat([sdpa(q[:, :, qs], k[:, :, ks], v[:, :, ks], scale=scale) for qs, ks in ranges], dim=2)

    return attend_per_scale


@cache
def _compiled_flex() -> Callable:
    """flex_attention compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention_plan(schedule: Schedule, attn: str, device: torch.device, compile: bool | None = None) -> Attend:
    """One ``flex_attention`` call under the mask's ``BlockMask``; compiled on CUDA by default (eager flex
    materialises the scores: only for tests and CPU inference)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sid_L = scale_ids(schedule, device=device)
    first_L = torch.tensor([_key_scales(attn, k)[0] for k in range(len(schedule))], device=device)[sid_L]

    def mask_mod(b, h, q_idx, kv_idx):  # key scale in [first key scale of the query's scale, query's scale]
        return (sid_L[kv_idx] <= sid_L[q_idx]) & (sid_L[kv_idx] >= first_L[q_idx])

    L = sid_L.numel()
    block_mask = create_block_mask(mask_mod, None, None, L, L, device=str(device))
    flex = _compiled_flex() if (device.type == "cuda" if compile is None else compile) else flex_attention

    def attend_flex(q, k, v, scale):
        if device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise ValueError("flex_attention has no backward on the CPU: train with attention: sdpa (or auto) there "
                             "(model.init_args.attention)")
        dtype = v.dtype  # under autocast the normalised q, k come out fp32 and v in bf16: one dtype for the kernel
        return flex(q.to(dtype), k.to(dtype), v, block_mask=block_mask, scale=scale)

    return attend_flex


# ---- Presets ----------------------------------------------------------------------------------

# The CPU presets match the "tiny" tokenizer (32 px digits: V 512, C 16, scales up to 8×8).
_DIGITS = dict(num_classes=10, vocab_size=512, latent_dim=16, patch_nums=(1, 2, 3, 4, 6, 8))
# VAR's: width 64·depth and heads = depth come from the config defaults; alng from VAR's README recipe.
_PRESET_CONFIGS: dict[str, dict] = {
    "tiny": dict(depth=2, width=128, num_heads=2, **_DIGITS),  # CPU tests and the digits smoke run (~0.7 M params)
    "small": dict(depth=4, width=256, num_heads=4, **_DIGITS),  # CPU-sized digits experiments (~5 M parameters)
    "var-d16": dict(depth=16, init=dict(adaln_gate=1e-3)),  # 310M parameters
    "var-d20": dict(depth=20, init=dict(adaln_gate=1e-3)),  # 600M
    "var-d24": dict(depth=24, init=dict(adaln_gate=1e-4)),  # 1.0B
    "var-d30": dict(depth=30, init=dict(adaln_gate=1e-5)),  # 2.0B
}


def generator_config(preset: str, **overrides) -> GeneratorConfig:
    """The config of a named preset, with fields overridden."""
    if preset not in PRESETS:
        raise KeyError(f"unknown generator preset {preset!r}; available: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GeneratorConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown GeneratorConfig fields {unknown}; valid: {sorted(fields)}")
    return GeneratorConfig(**{**_PRESET_CONFIGS[preset], **overrides})


PRESETS: dict[str, Callable[..., GeneratorConfig]] = {name: partial(generator_config, name) for name in _PRESET_CONFIGS}


def build_generator(preset: str, **overrides) -> VARTransformer:
    """Build a named preset (``var-d16``, ``tiny``, ...), e.g. ``build_generator("var-d16", attn="causal")``."""
    return VARTransformer(generator_config(preset, **overrides))
