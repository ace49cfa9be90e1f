"""Training callbacks: sample grids and FID / rFID monitors."""

from srdd_lightning.callbacks.fid import FIDCallback
from srdd_lightning.callbacks.samples import SampleGrid

__all__ = ["FIDCallback", "SampleGrid"]
