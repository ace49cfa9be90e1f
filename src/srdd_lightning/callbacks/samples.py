"""``SampleGrid``: a fixed grid of samples from the EMA weights every N training steps (PNG + the run's loggers)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from srdd_lightning.sampling.config import SamplingConfig
from srdd_lightning.utils.images import image_grid, save_png


def log_image(trainer: pl.Trainer, key: str, grid_3HW: torch.Tensor, step: int) -> None:
    """A uint8 image to every logger that takes images: TensorBoard's ``add_image``, or the ``log_image`` of
    W&B / Neptune / MLflow-style loggers; loggers without images (CSV) get only the PNG the caller wrote."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid_3HW, global_step=step)
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=[grid_3HW.permute(1, 2, 0).cpu().numpy()], step=step)


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training), one row per class of fixed-seed samples
    from the EMA weights of a stage with ``sampler()``, ``ema_weights()`` and ``generator``, logged as
    ``samples/grid`` and saved as ``<run_dir>/samples/step_<k>.png``. Every rank samples the grid (FSDP needs all
    ranks in each forward); only global rank 0 writes.

    Args:
        every_n_steps: Sample after every this many optimizer steps (never during the sanity check).
        num_per_class: Columns: samples per class, seeds ``seed + column`` (fixed across the run).
        classes: Rows: these class indices; None: up to ``max_classes`` evenly spaced ones (an unconditional model
            gets ``max_classes`` rows of its single class).
        max_classes: Upper bound on the rows when ``classes`` is None.
        seed: Base seed; sample (row r, column c) uses ``seed + r * num_per_class + c``.
        sampling: Sampling settings (guidance, top-k/top-p, ...); None uses the sampler's defaults.
        batch_size: Samples per sampler call (memory bound).
        upscale: Nearest-neighbour enlargement of each tile in the saved grid (tiny images are hard to see).
        on_train_end: Also sample once when training ends.
    """

    def __init__(self, every_n_steps: int = 500, num_per_class: int = 8, classes: list[int] | None = None,
                 max_classes: int = 10, seed: int = 0, sampling: SamplingConfig | None = None, batch_size: int = 64,
                 upscale: int = 1, on_train_end: bool = True):  # fmt: skip
        super().__init__()
        if every_n_steps < 1 or num_per_class < 1 or max_classes < 1 or batch_size < 1 or upscale < 1:
            raise ValueError("SampleGrid: every_n_steps, num_per_class, max_classes, batch_size and upscale must be >= 1")
        self.every_n_steps, self.num_per_class = every_n_steps, num_per_class
        self.classes, self.max_classes, self.seed = classes, max_classes, seed
        self.sampling = sampling or SamplingConfig()
        self.batch_size, self.upscale, self.sample_on_train_end = batch_size, upscale, on_train_end
        self._last_step = -1

    def rows(self, num_classes: int) -> list[int]:
        """The class of each grid row."""
        if self.classes is not None:
            bad = [c for c in self.classes if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"SampleGrid classes {bad} are out of range for a model with {num_classes} classes")
            return list(self.classes)
        if num_classes == 1:
            return [0] * self.max_classes
        n = min(self.max_classes, num_classes)
        return sorted({round(i * (num_classes - 1) / max(1, n - 1)) for i in range(n)})

    @torch.no_grad()
    def make_grid(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """The uint8 grid (3, H, W): row r = class ``rows[r]``, column c = seed ``seed + r·num_per_class + c``."""
        rows = self.rows(pl_module.generator.num_classes)
        labels = torch.tensor(rows).repeat_interleave(self.num_per_class)
        seeds = [self.seed + i for i in range(labels.numel())]
        images = []
        with pl_module.ema_weights():
            sampler = pl_module.sampler()
            for i in range(0, labels.numel(), self.batch_size):
                out = sampler.sample(labels[i : i + self.batch_size], self.sampling, seeds=seeds[i : i + self.batch_size])
                images.append(out.images.float().cpu())
        return image_grid(torch.cat(images), nrow=self.num_per_class, upscale=self.upscale)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        grid = self.make_grid(pl_module)
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)  # trainer.log_dir is a collective: every rank
        if not trainer.is_global_zero:
            return
        save_png(grid, run_dir / "samples" / f"step_{step}.png")
        log_image(trainer, "samples/grid", grid, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not (trainer.sanity_checking or trainer.global_step == 0 or trainer.global_step % self.every_n_steps):
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.sample_on_train_end and trainer.global_step > 0:
            self._run(trainer, pl_module)
