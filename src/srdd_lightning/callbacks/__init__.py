"""Training callbacks: sample grids (more to come: reconstruction grids, codebook usage, FID)."""

from srdd_lightning.callbacks.samples import SampleGrid

__all__ = ["SampleGrid"]
