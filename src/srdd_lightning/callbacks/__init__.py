"""Training callbacks: the EMA, sample grids, FID / rFID monitors, throughput."""

from srdd_lightning.callbacks.ema import EMA, ShardedEMA
from srdd_lightning.callbacks.fid import FIDCallback
from srdd_lightning.callbacks.samples import SampleGrid
from srdd_lightning.callbacks.throughput import Throughput

__all__ = ["EMA", "FIDCallback", "SampleGrid", "ShardedEMA", "Throughput"]
