"""A deliberately tiny stage that proves the data pipeline and the CLI end to end (CPU, seconds)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


class SmokeTestModule(pl.LightningModule):
    """Class-conditional conv autoencoder; logs reconstruction loss. Not part of the method.

    ``num_classes`` comes from the data index through the CLI (None: unconditional, one class)."""

    def __init__(self, num_classes: int | None = None, width: int = 16, lr: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.enc = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.SiLU(), nn.Conv2d(width, width, 3, 1, 1))
        self.cls = nn.Embedding(num_classes or 1, width)
        self.dec = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(width, 3, 4, 2, 1))

    def _loss(self, batch) -> torch.Tensor:
        img_B3HW, label_B = batch
        return F.mse_loss(self.dec(self.enc(img_B3HW) + self.cls(label_B)[:, :, None, None]), img_B3HW)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
