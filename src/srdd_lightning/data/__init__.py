"""Shards, the built-in digits, the token cache and the datamodule."""

from .datamodule import ShardDataModule
from .index import ShardIndex
from .pack import PackError, digits_images, pack_digits, pack_image_folder
from .stream import CorruptSampleWarning, ImageCodec, ShardReadError, TokenCodec, TrainLoader, TrainStream, ValShards
from .tokens import tokenize

__all__ = ["CorruptSampleWarning", "ImageCodec", "PackError", "ShardDataModule", "ShardIndex", "ShardReadError",
           "TokenCodec", "TrainLoader", "TrainStream", "ValShards", "digits_images", "pack_digits",
           "pack_image_folder", "tokenize"]
