"""Shards, the built-in digits and the datamodule."""

from .datamodule import ShardDataModule
from .index import ShardIndex
from .pack import PackError, digits_images, pack_digits, pack_image_folder
from .stream import CorruptSampleWarning, ShardReadError, TrainLoader, TrainStream, ValShards

__all__ = [
    "CorruptSampleWarning",
    "PackError",
    "ShardDataModule",
    "ShardIndex",
    "ShardReadError",
    "TrainLoader",
    "TrainStream",
    "ValShards",
    "digits_images",
    "pack_digits",
    "pack_image_folder",
]
