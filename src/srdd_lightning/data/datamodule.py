"""``ShardDataModule``: packed shards -> a resumable endless training stream and a finite validation pass.

From a token cache (``srdd data tokenize``) batches are ``(idx_BL, label_B)``, the tokenizer's indices of every scale
flattened coarse-to-fine, sent by the workers as uint16 (a quarter of int64's bytes), widened to int64 on the device.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ..utils.images import from_uint8
from .index import ShardIndex
from .stream import Codec, ImageCodec, TokenCodec, TrainLoader, TrainStream, ValShards


class ShardDataModule(pl.LightningDataModule):
    """Images (or cached tokens) and labels from shards written by ``srdd data``; the config states the *global* batch.

    Args:
        root: Folder holding ``index.json`` and the ``*.tar`` shards: packed images (``srdd data digits|folder``)
            or a token cache (``srdd data tokenize``; batches are then token indices, not images).
        batch_size: Global training batch, summed over all ranks; each rank takes ``batch_size / world_size``.
        val_batch_size: Global validation batch (defaults to ``batch_size``).
        resolution: Image size fed to the model; defaults to the packed resolution (resize + center crop otherwise;
            a token cache has its resolution fixed).
        flip: Random horizontal flips for training (a token cache must be written with ``--flip true``).
        num_workers: Loader processes per rank.
        seed: Seeds the training stream (shard draws, shuffle, flips); linked to ``seed_everything`` by the CLI.
        epoch_length: Training batches per epoch per rank; default: one pass over the train split at the global batch.
        shuffle_buffer: Samples held (undecoded) for shuffling in each worker.
    """

    def __init__(self, root: str = "data/digits", batch_size: int = 64, val_batch_size: int | None = None,
                 resolution: int | None = None, flip: bool = False, num_workers: int = 0, seed: int = 0,
                 epoch_length: int | None = None, shuffle_buffer: int = 1000):
        super().__init__()
        self.root = Path(root)
        self.index = ShardIndex.load(self.root, tokens=None)
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"data.epoch_length must be >= 1, got {epoch_length}")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.resolution = resolution or self.index.resolution
        self.flip, self.num_workers, self.seed = flip, num_workers, seed
        self.epoch_length, self.shuffle_buffer = epoch_length, shuffle_buffer
        self.rank, self.world_size = 0, 1
        if self.token_info is not None:
            if resolution not in (None, self.index.resolution):
                raise ValueError(f"data.resolution={resolution}: {self.root} is a token cache of "
                                 f"{self.index.resolution} px images and cannot be resized; leave data.resolution "
                                 f"unset or re-tokenize images packed at {resolution} px")  # fmt: skip
            if flip and not self.token_info["flip"]:
                raise ValueError(f"data.flip is true, but the token cache {self.root} holds no flipped tokens; "
                                 f"write it with `srdd data tokenize --flip true` or set data.flip false")  # fmt: skip

    # ---- what downstream stages read from the data
    @property
    def num_classes(self) -> int:
        """Real classes in the index (1 = unconditional)."""
        return self.index.num_classes

    @property
    def image_size(self) -> int:
        return self.resolution

    @property
    def token_info(self) -> dict | None:
        """A token cache's ``tokens`` entry (fingerprint, tokenizer, patch_nums, vocab_size, flip); None for images."""
        return self.index.tokens

    @property
    def image_root(self) -> Path:
        """The packed images behind the data: ``root`` itself, or the folder a token cache was written from."""
        return self.root if self.token_info is None else Path(self.index.source)

    def codec(self, split: str) -> Codec:
        """How a sample's bytes become a tensor: 8-bit images (float on the device), or tokens (flipped ones only
        for training with data.flip)."""
        if self.token_info is None:
            return ImageCodec(self.resolution, uint8=True)
        return TokenCodec(self.token_info["num_tokens"], flipped=split == "train" and self.flip)

    def _pin_memory(self) -> bool:
        # Page-locked host batches make the copy to a GPU asynchronous; on a CPU run they only cost memory.
        return torch.cuda.is_available() and (self.trainer is None or self.trainer.strategy.root_device.type == "cuda")

    # ---- setup
    def _per_rank(self, global_batch: int, option: str) -> int:
        if global_batch % self.world_size:
            raise ValueError(f"{option}={global_batch} is the global batch and must divide evenly over "
                             f"world_size={self.world_size} ranks (trainer.devices x trainer.num_nodes)")  # fmt: skip
        return global_batch // self.world_size

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        self.per_rank_batch = self._per_rank(self.batch_size, "data.batch_size")
        self.per_rank_val_batch = self._per_rank(self.val_batch_size, "data.val_batch_size")
        if "val" in self.index.splits:
            n_val = len(self.index.shard_paths("val"))
            needed = self.world_size * max(1, self.num_workers)
            if n_val < needed:
                raise ValueError(f"{self.root} has {n_val} validation shards, fewer than world_size x num_workers = "
                                 f"{self.world_size} x {max(1, self.num_workers)} = {needed}: some would get no "
                                 f"data. Lower data.num_workers or re-pack with more --val_shards")  # fmt: skip
            if n_val % self.world_size:
                raise ValueError(f"{self.root} has {n_val} validation shards, which do not divide evenly over "
                                 f"world_size={self.world_size} ranks (validation must be equal work on every "
                                 f"rank); re-pack with --val_shards a multiple of {self.world_size}")  # fmt: skip

    def train_stream(self) -> TrainStream:
        return TrainStream(self.index.shard_paths("train"), self.resolution, self.seed, self.rank, self.flip,
                           self.shuffle_buffer, codec=self.codec("train"))  # fmt: skip

    def train_dataloader(self) -> TrainLoader:
        # one pass over the training split at the global batch (at least one step)
        steps = self.epoch_length or max(1, self.index.split("train").total // self.batch_size)
        return TrainLoader(self.train_stream(), self.per_rank_batch, steps, self.num_workers,
                           pin_memory=self._pin_memory())  # fmt: skip

    def val_dataset(self) -> ValShards:
        counts = [sh.count for sh in self.index.split("val").shards]
        return ValShards(self.index.shard_paths("val"), self.resolution, self.rank, self.world_size, counts,
                         codec=self.codec("val"))  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=self.per_rank_val_batch, num_workers=self.num_workers,
                          pin_memory=self._pin_memory())  # fmt: skip

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Batches cross from the workers and to the device small: images as uint8 become float in [-1, 1] here,
        token indices as uint16 become int64, as embeddings need."""
        if isinstance(batch, (list, tuple)) and not batch[0].is_floating_point():
            x = batch[0].long() if self.token_info is not None else from_uint8(batch[0])
            batch = type(batch)([x, *batch[1:]])
        return batch

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
