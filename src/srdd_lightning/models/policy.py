"""The resampling policy's networks (DESIGN §2.4), plain ``nn.Module``s usable without Lightning.

    StepPolicyNet   features_B5 (ScaleStats.features()) + scale  ->  logits over the action set (B, A)
    TokenCriticNet  per token: state x_k, codebook row of the drawn token, p_k statistics of it; a conv net over
                    the pn×pn map (spatial context), class and scale embeddings  ->  logit of "this token is the
                    data's" (B, pn²)

The generator draws the tokens of a scale independently given the state I_{k−1}; the critic judges them jointly
(Token-Critic, Lezama et al. 2022), which is where it can add information the generator's own p_k lacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TOKEN_FEATURES = 3  # log p_k(r_i), max_v p_k(v), H(p_k)/log V at each position


def token_features(probs_BlV: torch.Tensor, tokens_Bl: torch.Tensor) -> torch.Tensor:
    """(B, l, 3): log-probability of each drawn token under p_k, the position's max-probability and normalised entropy."""
    p_tok = probs_BlV.gather(-1, tokens_Bl.unsqueeze(-1)).squeeze(-1)
    entropy = torch.special.entr(probs_BlV).sum(-1) / math.log(probs_BlV.shape[-1])
    return torch.stack((p_tok.clamp_min(1e-12).log() / 10.0, probs_BlV.amax(-1), entropy), dim=-1).float()


# ---- refinement steps per sample and scale -------------------------------------------------
@dataclass(frozen=True)
class StepPolicyConfig:
    num_scales: int
    num_actions: int
    feature_dim: int = 5
    hidden: int = 64


class StepPolicyNet(nn.Module):
    """A small MLP: the cheap statistics of a scale's prediction and the scale -> logits over the actions."""

    def __init__(self, config: StepPolicyConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        self.scale_embed = nn.Embedding(config.num_scales, h)
        self.inp = nn.Linear(config.feature_dim, h)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, config.num_actions))
        nn.init.zeros_(self.mlp[-1].weight)  # starts uniform over the actions: REINFORCE explores them all
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features_BF: torch.Tensor, scale: int) -> torch.Tensor:
        return self.mlp(self.inp(features_BF.float()) + self.scale_embed.weight[scale])


# ---- which tokens: the token critic --------------------------------------------------------
@dataclass(frozen=True)
class TokenCriticConfig:
    latent_dim: int
    """C of the tokenizer's codebook rows and of the generator's input (the state)."""
    num_scales: int
    num_classes: int
    """Real classes; one more row is the null class."""
    width: int = 64
    depth: int = 3
    """Residual 3×3 conv blocks over the pn×pn map (receptive field 2·depth + 1, plus a global-context term)."""


class _ConvBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(8 if width % 8 == 0 else 1, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.ctx = nn.Linear(width, width)  # the map's mean, broadcast: every token sees the whole scale

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        x = self.norm(h_BChw)
        x = F.gelu(self.conv1(x) + self.ctx(x.mean((2, 3)))[:, :, None, None])
        return h_BChw + self.conv2(x)


class TokenCriticNet(nn.Module):
    """Per-token logit that the drawn token is the data's, given the state, the drawn map and p_k's statistics."""

    def __init__(self, config: TokenCriticConfig) -> None:
        super().__init__()
        self.config = config
        C, W = config.latent_dim, config.width
        self.inp = nn.Linear(2 * C + TOKEN_FEATURES, W)
        self.scale_embed = nn.Embedding(config.num_scales, W)
        self.class_embed = nn.Embedding(config.num_classes + 1, W)
        self.blocks = nn.ModuleList(_ConvBlock(W) for _ in range(config.depth))
        self.out = nn.Sequential(nn.GroupNorm(8 if W % 8 == 0 else 1, W), nn.GELU(), nn.Conv2d(W, 1, 1))

    def forward(self, x_BlC: torch.Tensor | None, emb_BlC: torch.Tensor, feats_Bl3: torch.Tensor, scale: int,
                labels_B: torch.Tensor, pn: int) -> torch.Tensor:
        """Logits (B, pn²). ``x_BlC`` is the scale's input area_down(f_hat_{k−1}) (None at the first scale: zeros),
        ``emb_BlC`` the codebook rows of the drawn tokens, ``scale`` the index in the trained schedule."""
        B = emb_BlC.shape[0]
        x_BlC = torch.zeros_like(emb_BlC) if x_BlC is None else x_BlC
        h_BlW = self.inp(torch.cat((x_BlC.float(), emb_BlC.float(), feats_Bl3.float()), dim=-1))
        h_BlW = h_BlW + self.scale_embed.weight[scale] + self.class_embed(labels_B)[:, None]
        h = h_BlW.transpose(1, 2).reshape(B, -1, pn, pn)
        for blk in self.blocks:
            h = blk(h)
        return self.out(h).reshape(B, pn * pn)


__all__ = ["TOKEN_FEATURES", "StepPolicyConfig", "StepPolicyNet", "TokenCriticConfig", "TokenCriticNet", "token_features"]
