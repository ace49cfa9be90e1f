"""Multi-scale residual quantizer (VAR's ``VectorQuantizer2``, DESIGN §2.1), plus anti-collapse tools.

Residual quantization of a latent f (B, C, h, w) over a schedule ``patch_nums`` (last entry = h = w):

    rest = f, f_hat = 0
    for k, pn in enumerate(patch_nums):
        r_k   = nearest_code(area_down(rest, pn))          # (B, pn, pn) token map
        h_k   = phi_k(bicubic_up(codebook[r_k], h))        # no resampling at the last scale
        f_hat = f_hat + h_k ;  rest = rest - h_k

with one codebook shared by all scales and phi_k(x) = (1 - rho)·x + rho·conv3×3(x).
Everything runs in float32 (autocast is switched off inside), as VAR does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from srdd_lightning.models.scales import Schedule, as_schedule, phi_index, subset_indices

PHI_MODES = ("none", "shared", "partial", "per_scale")
LOOKUPS = ("l2", "cosine")


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


class Phi(nn.Module):
    """Residual conv blend phi(x) = (1 - rho)·x + rho·conv3×3(x)."""

    def __init__(self, dim: int, rho: float):
        super().__init__()
        self.rho = float(rho)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return x_BChw * (1.0 - self.rho) + self.conv(x_BChw) * self.rho


@dataclass
class QuantizerOutput:
    """Result of the training forward."""

    f_hat: torch.Tensor  # (B, C, h, w) straight-through quantized latent: value of f_hat, gradient of f
    vq_loss: torch.Tensor  # beta·MSE(sg[f_hat], f) + MSE(f_hat, sg[f]) on the cumulative f_hat, mean over scales
    tokens: list[torch.Tensor]  # per scale (B, pn, pn) long; -1 where scale dropout removed the scale of a sample
    keep_BK: torch.Tensor  # (B, K) bool: which scales each sample used (all True without scale dropout)


@dataclass
class Quantized:
    """M(k)·f: a latent quantized onto the first k scales of a schedule (:meth:`MultiScaleResidualQuantizer.quantize`)."""

    tokens: list[torch.Tensor]  # per scale (B, pn, pn) long token maps r_0..r_{k−1}
    f_hats: list[torch.Tensor]  # f_hat after each of those scales, (B, C, h, w) float32
    rest: torch.Tensor  # the residual f − f_hat_{k−1} (f itself when k = 0)
    residuals: list[torch.Tensor]  # what each scale quantized: area_down(f − f_hat_{j−1}, pn_j), (B, C, pn_j, pn_j)
    patch_nums: tuple[int, ...]  # the schedule the scales belong to (the first k of it were quantized)

    @property
    def f_hat(self) -> torch.Tensor:
        """The state after the last quantized scale (zeros when no scale was quantized)."""
        return self.f_hats[-1] if self.f_hats else torch.zeros_like(self.rest)


class MultiScaleResidualQuantizer(nn.Module):
    """One shared codebook ``nn.Embedding(V, C)`` quantizing a latent residually over ``patch_nums``.

    Methods taking ``patch_nums=`` accept any subset of the trained schedule ending at its last scale (phi is still
    chosen by each scale's trained index). The residual loop is written once (``_residual_steps``), used by
    :meth:`quantize` and :meth:`forward`; adding scales to a state (:meth:`next_state`) once, in ``contribution``.
    """

    def __init__(self, vocab_size: int, dim: int, patch_nums: Sequence[int], *, phi_mode: str = "partial",
                 num_phi: int = 4, phi_rho: float = 0.5, lookup: str = "l2", beta: float = 0.25,
                 scale_dropout: float = 0.0):
        super().__init__()
        if phi_mode not in PHI_MODES:
            raise ValueError(f"phi_mode must be one of {PHI_MODES}, got {phi_mode!r}")
        if lookup not in LOOKUPS:
            raise ValueError(f"lookup must be one of {LOOKUPS}, got {lookup!r}")
        if not 0.0 <= scale_dropout <= 1.0:
            raise ValueError(f"scale_dropout is a probability, got {scale_dropout}")
        self.vocab_size, self.dim = int(vocab_size), int(dim)
        self.patch_nums: Schedule = as_schedule(patch_nums)
        self.phi_mode, self.lookup, self.beta = phi_mode, lookup, float(beta)
        self.scale_dropout = float(scale_dropout)
        self.codebook = nn.Embedding(self.vocab_size, self.dim)
        # Small uniform codes (taming's init): nearest-code search then follows the direction of the
        # residual, instead of every residual snapping to the few shortest N(0, 1) codes.
        nn.init.uniform_(self.codebook.weight, -1.0 / self.vocab_size, 1.0 / self.vocab_size)
        n_phi = {"none": 0, "shared": 1, "partial": int(num_phi), "per_scale": len(self.patch_nums)}[phi_mode]
        if phi_mode == "partial" and n_phi < 1:
            raise ValueError(f"num_phi must be >= 1 with phi_mode='partial', got {num_phi}")
        self.phis = nn.ModuleList(Phi(self.dim, phi_rho) for _ in range(n_phi))

    def extra_repr(self) -> str:
        return (f"V={self.vocab_size}, C={self.dim}, patch_nums={list(self.patch_nums)}, phi={self.phi_mode}, "
                f"lookup={self.lookup}, beta={self.beta}")

    def resolve(self, patch_nums: Sequence[int] | None = None) -> tuple[Schedule, list[int]]:
        """(schedule, index of each of its scales in the trained schedule); validates subsets."""
        if patch_nums is None:
            return self.patch_nums, list(range(len(self.patch_nums)))
        pns = as_schedule(patch_nums)
        return pns, subset_indices(pns, self.patch_nums)

    def phi_for(self, trained_si: int) -> nn.Module:
        """The phi used by scale ``trained_si`` of the trained schedule (identity for phi_mode='none')."""
        if self.phi_mode == "none":
            return nn.Identity()
        if self.phi_mode == "shared":
            return self.phis[0]
        if self.phi_mode == "per_scale":
            return self.phis[trained_si]
        # partial: nearest of num_phi evenly spaced ticks to si/(K-1) of the FULL trained schedule, so a
        # subset schedule reuses exactly the phi each scale was trained with.
        return self.phis[phi_index(trained_si, len(self.patch_nums), len(self.phis))]

    def embed(self, tokens_Bhw: torch.Tensor) -> torch.Tensor:
        """Token map (B, pn, pn) -> code vectors (B, C, pn, pn), contiguous."""
        self.check_token_ids([tokens_Bhw])
        return self._embed(tokens_Bhw)

    def _embed(self, tokens_Bhw: torch.Tensor) -> torch.Tensor:
        # contiguous NCHW: a channels_last view changes the numerics of the convs that follow (VAR's layout is NCHW)
        return self.codebook(tokens_Bhw.long()).permute(0, 3, 1, 2).contiguous()

    def check_token_ids(self, tokens: Sequence[torch.Tensor]) -> None:
        """Raise if a token map is not a 3-d integer tensor with ids in [0, V) (on an accelerator: an asynchronous device assert)."""
        for k, t in enumerate(tokens):
            if t.dim() != 3 or t.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"token map {k}: expected an integer tensor (B, pn, pn), got {tuple(t.shape)} {t.dtype}")
        flat = torch.cat([t.reshape(-1).long() for t in tokens])
        if flat.numel() and flat.device.type != "cpu":  # checked on the device: no host sync in the training step
            ok = ((flat >= 0) & (flat < self.vocab_size)).all()
            torch._assert_async(ok, f"token ids must lie in [0, {self.vocab_size}) (vocab_size)")
        elif flat.numel():
            lo, hi = torch.aminmax(flat)
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}) (vocab_size), got ids in [{int(lo)}, {int(hi)}]")

    @torch.no_grad()
    def nearest(self, x_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row: argmin ‖x − e‖² (l2) or argmax cos(x, e) (cosine)."""
        e_VC = self.codebook.weight.detach().float()
        x_NC = x_NC.float()
        if self.lookup == "cosine":
            return (F.normalize(x_NC, dim=1) @ F.normalize(e_VC, dim=1).T).argmax(dim=1)
        # ‖x‖² + ‖e‖² − 2 x·e
        d_NV = torch.addmm(x_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1), x_NC, e_VC.T, alpha=-2.0)
        return d_NV.argmin(dim=1)

    def contribution(self, tokens_Bhw: torch.Tensor, trained_si: int, size: int) -> torch.Tensor:
        """h_k = phi_k(bicubic_up(codebook[r_k], size)): what scale k adds to f_hat, (B, C, size, size)."""
        h_BChw = self._embed(tokens_Bhw).float()  # ids are checked by the public callers
        if h_BChw.shape[-1] != size:
            h_BChw = F.interpolate(h_BChw, size=(size, size), mode="bicubic")
        return self.phi_for(trained_si)(h_BChw)

    def _check_latent(self, f_BChw: torch.Tensor, pns: Schedule) -> None:
        if f_BChw.dim() != 4 or f_BChw.shape[1] != self.dim or f_BChw.shape[2] != f_BChw.shape[3]:
            raise ValueError(f"expected a square latent (B, {self.dim}, h, h), got {tuple(f_BChw.shape)}")
        if f_BChw.shape[-1] != pns[-1]:
            raise ValueError(f"the last scale of patch_nums {list(pns)} must equal the latent size {f_BChw.shape[-1]}")

    # ----- the residual loop (the only one) ------------------------------------------------------

    def _residual_steps(
        self, f_BChw: torch.Tensor, pns: Schedule, sis: Sequence[int], keep_BK: torch.Tensor | None = None,
        force: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Residual quantization of ``f`` over ``pns`` (the module's loop): yields (z_k, r_k, f_hat_k) per scale, with
        r_k replaced by ``force(k, r_k)`` and h_k multiplied by ``keep_BK[:, k]`` when given. The residual subtracts
        sg[h_k]; f_hat_k carries the codebook's and phi's gradients when grad is enabled."""
        B, C, size = f_BChw.shape[0], f_BChw.shape[1], f_BChw.shape[-1]
        rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(rest)
        for k, (pn, si) in enumerate(zip(pns, sis)):
            z_BChw = rest if pn == size else F.interpolate(rest, size=(pn, pn), mode="area")
            r_Bhw = self.nearest(z_BChw.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)
            if force is not None:
                r_Bhw = force(k, r_Bhw)
            h_BChw = self.contribution(r_Bhw, si, size)
            if keep_BK is not None:
                h_BChw = h_BChw * keep_BK[:, k].to(h_BChw.dtype).view(B, 1, 1, 1)
            f_hat = f_hat + h_BChw
            rest = rest - h_BChw.detach()
            yield z_BChw, r_Bhw, f_hat

    @torch.no_grad()
    def quantize(self, f_BChw: torch.Tensor, patch_nums: Sequence[int] | None = None, num_scales: int | None = None,
                 force: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> Quantized:
        """Quantize f onto the first ``num_scales`` scales of ``patch_nums`` (default all): M(k)·f, no gradients.
        ``force(k, r_Bhw) -> r_Bhw`` may replace the tokens chosen at scale k (editing keeps known tokens)."""
        pns, sis = self.resolve(patch_nums)
        self._check_latent(f_BChw, pns)
        k = len(pns) if num_scales is None else int(num_scales)
        if not 0 <= k <= len(pns):
            raise ValueError(f"num_scales={num_scales} must lie in [0, {len(pns)}] for patch_nums {list(pns)}")
        with _no_autocast(f_BChw.device):
            steps = list(self._residual_steps(f_BChw, pns[:k], sis[:k], force=force))
            f = f_BChw.detach().float()
            f_hats = [fh for _, _, fh in steps]
            rest = f - f_hats[-1] if f_hats else f.clone()
        return Quantized([r for _, r, _ in steps], f_hats, rest, [z for z, _, _ in steps], pns)

    def forward(self, f_BChw: torch.Tensor, keep_BK: torch.Tensor | None = None) -> QuantizerOutput:
        """Training forward over the trained schedule: straight-through f_hat, VQ loss, tokens.

        With ``scale_dropout`` p > 0 (training only), a sample keeps with probability p only its first K_b scales, K_b
        uniform in {1, …, K−1}: later scales add nothing, their tokens are -1, its VQ loss averages the kept scales.
        ``keep_BK`` ((B, K) bool, e.g. ``draw_scale_keep`` with a seeded generator) replaces that draw.
        """
        pns, K = self.patch_nums, len(self.patch_nums)
        self._check_latent(f_BChw, pns)
        B = f_BChw.shape[0]
        if keep_BK is not None and (tuple(keep_BK.shape) != (B, K) or keep_BK.dtype != torch.bool):
            raise ValueError(f"keep_BK must be a ({B}, {K}) bool mask, got {tuple(keep_BK.shape)} {keep_BK.dtype}")
        with _no_autocast(f_BChw.device):
            f = f_BChw.float()
            f_ng = f.detach()
            keep_BK = self.draw_scale_keep(B, f.device) if keep_BK is None else keep_BK.to(f.device)
            keep_BK_f = keep_BK.float()
            tokens, loss_sum, f_hat = [], f.new_zeros(()), torch.zeros_like(f_ng)
            for k, (_, r_Bhw, f_hat) in enumerate(self._residual_steps(f, pns, range(K), keep_BK=keep_BK)):
                tokens.append(torch.where(keep_BK[:, k].view(B, 1, 1), r_Bhw, torch.full_like(r_Bhw, -1)))
                # VQ loss on the cumulative f_hat: beta·‖sg[f_hat] − f‖² (commitment) + ‖f_hat − sg[f]‖² (codebook, phi).
                per_B = self.beta * (f_hat.detach() - f).square().mean((1, 2, 3)) + (f_hat - f_ng).square().mean((1, 2, 3))
                loss_sum = loss_sum + (per_B * keep_BK_f[:, k]).sum()
            # Without dropout: sum over B·K of per-sample means / (B·K) = VAR's mean over scales of batch MSEs.
            vq_loss = loss_sum / keep_BK_f.sum()
            f_st = f_hat.detach() - f_ng + f  # straight-through: forward value f_hat, gradient to f
        return QuantizerOutput(f_st.to(f_BChw.dtype), vq_loss, tokens, keep_BK)

    def draw_scale_keep(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, K) bool mask of the scales each sample keeps; all True unless training with scale_dropout > 0.
        Draws from ``generator`` (on its own device, then moved to ``device``) when given, else from the global RNG."""
        K = len(self.patch_nums)
        keep_BK = torch.ones(batch, K, dtype=torch.bool, device=device)
        if not self.training or self.scale_dropout <= 0 or K < 2:
            return keep_BK
        dev = generator.device if generator is not None else device
        drop_B = torch.rand(batch, device=dev, generator=generator) < self.scale_dropout
        cut_B = torch.randint(1, K, (batch,), device=dev, generator=generator)
        n_keep_B = torch.where(drop_B, cut_B, torch.full((batch,), K, device=dev))
        return (torch.arange(K, device=dev)[None, :] < n_keep_B[:, None]).to(device)

    # ----- adding scales to a state: decoding, teacher forcing, the sampler's step -------------------

    def next_input(self, f_hat_BChw: torch.Tensor, si: int, patch_nums: Sequence[int] | None = None) -> torch.Tensor | None:
        """The generator's input for scale si + 1: area_down(f_hat after scale si, pn_{si+1}); None after the last scale."""
        pns = self.resolve(patch_nums)[0]
        if si == len(pns) - 1:
            return None
        nxt = pns[si + 1]
        return F.interpolate(f_hat_BChw, size=(nxt, nxt), mode="area")

    def next_state(self, si: int, f_hat_BChw: torch.Tensor, tokens_Bhw: torch.Tensor, patch_nums: Sequence[int] | None = None):
        """Add scale ``si`` of ``patch_nums``' tokens to a state: (f_hat + h_si, :meth:`next_input` of the new f_hat);
        ``f_hat_BChw`` is not modified."""
        pns, sis = self.resolve(patch_nums)
        if not 0 <= si < len(pns):
            raise IndexError(f"scale index {si} out of range for patch_nums {list(pns)}")
        self._check_latent(f_hat_BChw, pns)
        pn = pns[si]
        if tuple(tokens_Bhw.shape[1:]) != (pn, pn) or tokens_Bhw.shape[0] != f_hat_BChw.shape[0]:
            raise ValueError(f"tokens for scale {si} (pn={pn}) must be ({f_hat_BChw.shape[0]}, {pn}, {pn}), got {tuple(tokens_Bhw.shape)}")
        self.check_token_ids([tokens_Bhw])
        with _no_autocast(f_hat_BChw.device):
            f_hat = f_hat_BChw.float() + self.contribution(tokens_Bhw, sis[si], pns[-1])
            return f_hat, self.next_input(f_hat, si, pns)

    def _states(self, tokens: Sequence[torch.Tensor], pns: Schedule, sis: Sequence[int], num: int) -> Iterator[torch.Tensor]:
        """f_hat after each of the first ``num`` scales of validated ``tokens`` (the same update as :meth:`next_state`)."""
        size = pns[-1]
        f_hat = torch.zeros(tokens[0].shape[0], self.dim, size, size, device=tokens[0].device)
        for r_Bhw, si in zip(tokens[:num], sis):
            f_hat = f_hat + self.contribution(r_Bhw, si, size)
            yield f_hat

    def tokens_to_fhat(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None, cumulative: bool = False):
        """Sum of the scales' contributions: final f_hat (B, C, h, w), contiguous, or the list after each scale."""
        pns, sis = self._resolve_tokens(tokens, patch_nums)
        with _no_autocast(tokens[0].device):
            out = list(self._states(tokens, pns, sis, len(pns)))
        return out if cumulative else out[-1]

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None = None) -> torch.Tensor:
        """Generator inputs x_BLC, (B, L − pn_0², C): for each scale k ≥ 1, area_down(f_hat after scales < k, pn_k), row-major."""
        pns, sis = self._resolve_tokens(tokens, patch_nums)
        with _no_autocast(tokens[0].device):
            xs = [self.next_input(f_hat, k, pns).flatten(2).transpose(1, 2)
                  for k, f_hat in enumerate(self._states(tokens, pns, sis, len(pns) - 1))]  # fmt: skip
        if not xs:
            return torch.zeros(tokens[0].shape[0], 0, self.dim, device=tokens[0].device)
        return torch.cat(xs, dim=1)

    def _resolve_tokens(self, tokens: Sequence[torch.Tensor], patch_nums: Sequence[int] | None) -> tuple:
        """:meth:`resolve` after checking that ``tokens`` are one valid token map per scale."""
        pns, sis = self.resolve(patch_nums)
        if len(tokens) != len(pns):
            raise ValueError(f"got {len(tokens)} token maps for a schedule of {len(pns)} scales {list(pns)}")
        B = tokens[0].shape[0]
        for k, (t, pn) in enumerate(zip(tokens, pns)):
            if tuple(t.shape) != (B, pn, pn):
                raise ValueError(f"token map {k} must have shape ({B}, {pn}, {pn}) for patch_nums {list(pns)}, got {tuple(t.shape)}")
        self.check_token_ids(tokens)
        return pns, sis

    # ----- dead-code restart ------------------------------------------------------------------------

    @torch.no_grad()
    def restart_dead_codes(self, dead_V: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None = None, noise: float = 0.01) -> int:
        """Re-initialise codes flagged in ``dead_V`` (bool (V,)) from random rows of ``candidates``; returns how many.

        ``candidates``: recent encoder outputs or residuals, (N, C) or (B, C, h, w); noise (``noise`` × their std)
        keeps duplicates apart. Under DDP call it with the same inputs and generator seed on every rank.
        """
        dead_V = dead_V.to(device=self.codebook.weight.device, dtype=torch.bool)
        if dead_V.shape != (self.vocab_size,):
            raise ValueError(f"dead_V must be a ({self.vocab_size},) bool mask, got {tuple(dead_V.shape)}")
        x_NC = candidates.permute(0, 2, 3, 1).reshape(-1, self.dim) if candidates.dim() == 4 else candidates
        if x_NC.dim() != 2 or x_NC.shape[1] != self.dim or x_NC.shape[0] == 0:
            raise ValueError(f"candidates must be (N, {self.dim}) or (B, {self.dim}, h, w) with N > 0, got {tuple(candidates.shape)}")
        n_dead = int(dead_V.sum())
        if n_dead == 0:
            return 0
        w_VC = self.codebook.weight
        x_NC = x_NC.detach().float()
        # Random draws on the CPU (``generator`` must be a CPU generator) so a seed gives the same restart anywhere.
        pick = torch.randint(0, x_NC.shape[0], (n_dead,), generator=generator)
        eps = torch.randn(n_dead, self.dim, generator=generator)
        new_DC = x_NC[pick.to(x_NC.device)] + noise * x_NC.std(unbiased=False) * eps.to(x_NC.device)
        w_VC[dead_V] = new_DC.to(device=w_VC.device, dtype=w_VC.dtype)
        return n_dead


# ---- Codebook usage -----------------------------------------------------------------------------


def code_hits(tokens: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(K, V) float hit counts per scale; negative ids (dropped scales) are ignored."""
    rows = []
    for t in tokens:
        t = t.reshape(-1)
        rows.append(torch.bincount(t[t >= 0].long(), minlength=vocab_size)[:vocab_size].float())
    return torch.stack(rows)


def codebook_usage(tokens: Sequence[torch.Tensor], vocab_size: int) -> list[dict[str, float]]:
    """Per scale: codes used, share of V used, share of the reachable maximum, and perplexity.

    Scale k can hit at most ``min(V, n_k)`` codes (n_k valid tokens, pn_k²·B without dropout), so
    ``usage_of_possible = used / min(V, n_k)`` is the fair number for coarse scales. Perplexity = exp(entropy).
    """
    return usage_from_hits(code_hits(tokens, vocab_size))


def usage_from_hits(hits_KV: torch.Tensor) -> list[dict[str, float]]:
    """``codebook_usage`` from (K, V) hit counts, e.g. summed over a validation pass and over ranks."""
    vocab_size = hits_KV.shape[-1]
    out = []
    for hits_V in hits_KV.detach().float().cpu():
        n = float(hits_V.sum())
        used = int((hits_V > 0).sum())
        p_V = hits_V[hits_V > 0] / max(n, 1.0)
        perplexity = float(torch.exp(-(p_V * p_V.log()).sum())) if n > 0 else 0.0
        possible = min(vocab_size, int(n))
        out.append({"used": float(used), "usage": used / vocab_size, "max_possible": float(possible),
                    "usage_of_possible": used / possible if possible else 0.0, "perplexity": perplexity})
    return out
