"""Lightning's ``ThroughputMonitor`` for the framework's batches: samples/s, tokens/s, FLOPs/s and MFU."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def images_in_batch(batch: Any) -> int:
    """Batches are ``(images_B3HW, labels_B)`` or cached ``(idx_BL, labels_B)``; a batch of B counts B samples."""
    return int(batch[0].shape[0])


class Throughput(ThroughputMonitor):
    """Samples and batches per second; tokens per second (``items_per_sec``) where the stage gives
    ``tokens_per_sample``, FLOPs/s and MFU where it gives ``flops_per_batch`` and the device's peak is known (CUDA).

    Args:
        window_size: Batches averaged per reported value.
    """

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size)

    def setup(self, trainer, pl_module, stage: str) -> None:
        tokens = getattr(pl_module, "tokens_per_sample", None)
        self.length_fn = (lambda batch: images_in_batch(batch) * int(tokens)) if tokens else None
        super().setup(trainer, pl_module, stage)


__all__ = ["Throughput", "images_in_batch"]
