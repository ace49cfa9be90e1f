"""PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator`` layout) and the hinge GAN losses.

Normalisation is GroupNorm, not BatchNorm: BatchNorm's running statistics differ per rank under DDP and
mix real and fake batches; GroupNorm is per-sample, so every rank computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srdd_lightning.models.vae import num_groups_for


class PatchDiscriminator(nn.Module):
    """Image (B, C, H, W) -> patch logits (B, 1, H', W'), each judging a ~70 px receptive field (3 layers).
    ``norm``: "group" or "none"."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm: str = "group", max_groups: int = 32):
        super().__init__()
        if norm not in ("group", "none"):
            raise ValueError(f"norm must be 'group' or 'none', got {norm!r}")

        def normed(ch: int) -> list[nn.Module]:
            return [nn.GroupNorm(num_groups_for(ch, max_groups), ch)] if norm == "group" else []

        use_bias = norm == "none"  # a norm's shift makes the conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for n in range(1, n_layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=use_bias), *normed(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DCGAN init: conv weights N(0, 0.02), norm scales N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """Smallest input side giving at least one logit: side / 2^n_layers must stay >= 3."""
        return 3 * 2**self.n_layers

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        if min(img_B3HW.shape[-2:]) < self.min_size():
            raise ValueError(f"images of {tuple(img_B3HW.shape[-2:])} px are too small for a {self.n_layers}-layer "
                             f"PatchGAN (needs >= {self.min_size()} px); use fewer n_layers")
        return self.net(img_B3HW)


# ---- Losses ----------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ½·(E[relu(1 − D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss −E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """taming's balance λ = ‖∇_w L_rec‖ / (‖∇_w L_G‖ + eps) in [0, max_weight], w = the decoder's last layer
    (detached; both losses must still have their graphs)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + eps)).clamp(0.0, max_weight).detach()
