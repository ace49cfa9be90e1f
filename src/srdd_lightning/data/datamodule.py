"""``ShardDataModule``: packed shards -> a resumable endless training stream and a finite validation pass."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from .index import ShardIndex
from .stream import TrainLoader, TrainStream, ValShards, batches_per_epoch


class ShardDataModule(pl.LightningDataModule):
    """Images and labels from shards written by ``srdd data``; the config states the *global* batch.

    Args:
        root: Folder holding ``index.json`` and the ``*.tar`` shards.
        batch_size: Global training batch, summed over all ranks; each rank takes ``batch_size / world_size``.
        val_batch_size: Global validation batch (defaults to ``batch_size``).
        resolution: Image size fed to the model; defaults to the packed resolution (resize + center crop otherwise).
        flip: Random horizontal flips for training.
        num_workers: Loader processes per rank.
        seed: Seeds the training stream (shard draws, shuffle, flips); linked to ``seed_everything`` by the CLI.
        epoch_length: Training batches per epoch per rank; default: one pass over the train split at the global batch.
        shuffle_buffer: Samples held (undecoded) for shuffling in each worker.
    """

    def __init__(
        self,
        root: str = "data/digits",
        batch_size: int = 64,
        val_batch_size: int | None = None,
        resolution: int | None = None,
        flip: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        epoch_length: int | None = None,
        shuffle_buffer: int = 1000,
    ):
        super().__init__()
        self.root = Path(root)
        self.index = ShardIndex.load(self.root)
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"data.epoch_length must be >= 1, got {epoch_length}")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.resolution = resolution or self.index.resolution
        self.flip = flip
        self.num_workers = num_workers
        self.seed = seed
        self.epoch_length = epoch_length
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = 0, 1

    # ---- what downstream stages read from the data
    @property
    def num_classes(self) -> int:
        """Real classes in the index (1 = unconditional)."""
        return self.index.num_classes

    @property
    def image_size(self) -> int:
        return self.resolution

    # ---- setup
    def _per_rank(self, global_batch: int, option: str) -> int:
        if global_batch % self.world_size:
            raise ValueError(
                f"{option}={global_batch} is the global batch and must divide evenly over "
                f"world_size={self.world_size} ranks (trainer.devices x trainer.num_nodes)"
            )
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
                raise ValueError(
                    f"{self.root} has {n_val} validation shards, fewer than world_size x num_workers = "
                    f"{self.world_size} x {max(1, self.num_workers)} = {needed}: some would get no data. "
                    f"Lower data.num_workers or re-pack with more --val_shards"
                )
            if n_val % self.world_size:
                raise ValueError(
                    f"{self.root} has {n_val} validation shards, which do not divide evenly over "
                    f"world_size={self.world_size} ranks (validation must be equal work on every rank); "
                    f"re-pack with --val_shards a multiple of {self.world_size}"
                )

    def train_stream(self) -> TrainStream:
        return TrainStream(
            self.index.shard_paths("train"), self.resolution, self.seed, self.rank, self.flip, self.shuffle_buffer
        )

    def train_dataloader(self) -> TrainLoader:
        steps = self.epoch_length or batches_per_epoch(self.index.split("train").total, self.batch_size)
        return TrainLoader(self.train_stream(), self.per_rank_batch, steps, self.num_workers)

    def val_dataset(self) -> ValShards:
        counts = [sh.count for sh in self.index.split("val").shards]
        return ValShards(self.index.shard_paths("val"), self.resolution, self.rank, self.world_size, counts)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=self.per_rank_val_batch, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
