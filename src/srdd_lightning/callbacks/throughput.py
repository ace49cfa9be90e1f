"""Lightning's ``ThroughputMonitor`` for the framework's batches: samples/s, batches/s, FLOPs/s and MFU."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def images_in_batch(batch: Any) -> int:
    """Batches are ``(images_B3HW, labels_B)``; a batch of B images counts B samples."""
    return int(batch[0].shape[0])


class Throughput(ThroughputMonitor):
    """Samples and batches per second, and FLOPs/s and MFU where the stage gives ``flops_per_batch`` (the
    generator does) and the device's peak is known (CUDA). The CLI adds it to every run with a logger.

    Args:
        window_size: Batches averaged per reported value.
    """

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size)


__all__ = ["Throughput", "images_in_batch"]
