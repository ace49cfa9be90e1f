"""The EMA of a stage's weights: Lightning's ``WeightAveraging`` with a decay warm-up, and its FSDP counterpart.

    ema_t = d_t · ema_{t−1} + (1 − d_t) · θ_t,   d_t = min(decay, (1 + t) / (10 + t))   (warm-up; d_t = decay without)

Checkpoints are Lightning's format (the one ``loading.stage_state`` reads): ``state_dict`` the averaged weights,
``current_model_state`` the trained ones, ``averaging_state`` the counters, so a resumed run restores both.
Validation runs on the EMA weights (WeightAveraging swaps them in); sample grids and FID monitors enter
:func:`ema_weights`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging

CURRENT_KEY = "current_model_state"


def _ema_update(decay: float, warmup: bool):
    """``multi_avg_fn`` for ``AveragedModel``: one foreach lerp per (device, dtype) group."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged: torch.Tensor | int) -> None:
        n = int(n_averaged)  # updates so far (a host int from EMA / ShardedEMA); AveragedModel copies at the first
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        if ema_params:  # _foreach_lerp_ refuses an empty list; our models have floating-point parameters only
            torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


@contextlib.contextmanager
def _swapping(swap: Callable[[], None]) -> Iterator[None]:
    """``swap()`` on entering the block and again on leaving it (a swap is its own inverse)."""
    swap()
    try:
        yield
    finally:
        swap()


class EMA(WeightAveraging):
    """Exponential moving average of the module's parameters (Lightning's ``WeightAveraging``).

    Args:
        decay: EMA decay (0.9999: an average over ~10k steps). 0 turns averaging off (the EMA equals the weights).
        warmup: Ramp the decay as min(decay, (1 + t) / (10 + t)), so early averages are not dominated by the
            random initialisation (VAR has no EMA; DiT and VQGAN trainers use one; see the README).
        every_n_steps: Update after every this many optimizer steps.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True, every_n_steps: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"ema.every_n_steps must be >= 1, got {every_n_steps}")
        self._update = _ema_update(decay, warmup)
        # Buffers are not averaged (use_buffers=False): AveragedModel keeps them equal to the module's.
        super().__init__(use_buffers=False, multi_avg_fn=self._update)
        self.decay, self.warmup, self.every_n_steps = decay, warmup, every_n_steps
        self._updates: int | None = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.every_n_steps == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """``WeightAveraging``'s update without its host syncs: ``AveragedModel.update_parameters`` reads the device
        counter ``n_averaged`` on the host twice per step (a GPU sync each); here the count is a host integer, read
        from the device once per fit, and the same lerp (:func:`_ema_update`) is applied."""
        if not (trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1)):
            return
        avg = self._average_model
        if self._updates is None:
            self._updates = int(avg.n_averaged)
        ema_p = [p.detach() for p in avg.module.parameters()]
        cur_p = [p.detach() for p in pl_module.parameters()]
        if self._updates == 0:  # as AveragedModel: the first update copies the weights
            torch._foreach_copy_(ema_p, cur_p)
        else:
            self._update(ema_p, cur_p, self._updates)
        avg.n_averaged.add_(1)
        self._updates += 1
        self._latest_update_step = trainer.global_step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._updates = None  # host copy of n_averaged, read at the first update of this fit
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            # Frozen submodules (the generator's tokenizer) never change: share them instead of keeping a copy.
            for name in getattr(pl_module, "frozen_submodules", ()):
                setattr(self._average_model.module, name, getattr(pl_module, name))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        frozen = getattr(pl_module, "frozen_submodules", ())
        if frozen and CURRENT_KEY in checkpoint:  # stages keep frozen submodules out of their checkpoints
            extra = {f"{n}.{k}": v for n in frozen for k, v in getattr(pl_module, n).state_dict().items()}
            checkpoint = {**checkpoint, "state_dict": {**checkpoint["state_dict"], **extra},
                          CURRENT_KEY: {**checkpoint[CURRENT_KEY], **extra}}  # fmt: skip
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # WeightAveraging copies the average into the module here; we keep the trained weights in the module, so
        # the final last.ckpt holds both (a resumed run continues from the trained weights, not from the EMA).
        pass

    def parameter(self, name: str) -> torch.Tensor:
        """The averaged copy of the module's parameter ``name`` (e.g. to re-initialise restarted codebook rows)."""
        if self._average_model is None:
            raise RuntimeError("the EMA exists only while fitting")
        return self._average_model.module.get_parameter(name)

    def swapped(self, pl_module: pl.LightningModule) -> contextlib.AbstractContextManager:
        """The averaged weights in ``pl_module`` inside the block (no-op outside fit)."""
        if self._average_model is None:
            return contextlib.nullcontext()
        return _swapping(lambda: self._swap_models(pl_module))


class ShardedEMA(Callback):
    """The same EMA under FSDP, kept over this rank's local parameter shards (fp32), same checkpoint format.

    Why it exists: ``WeightAveraging`` deep-copies the whole module, which does not work with sharded modules
    (its docstring says so). Here every rank averages only the flat shards it owns; checkpoints gather the full
    averaged state through the strategy, so the files look exactly like :class:`EMA`'s. Needs CUDA (FSDP).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self._update = _ema_update(decay, warmup)
        self._shadow: list[torch.Tensor] | None = None
        self._params: list[torch.Tensor] = []
        self.n_averaged = 0
        self._loaded_ema: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = [p for p in trainer.strategy.model.parameters() if p.requires_grad]
        if self._loaded_ema is not None:  # resumed: load the EMA's full state (a collective), shadow it, restore
            backup = [p.detach().clone() for p in self._params]
            trainer.strategy.load_model_state_dict({"state_dict": self._loaded_ema}, strict=False)
            self._shadow = [p.detach().float().clone() for p in self._params]
            with torch.no_grad():
                for p, b in zip(self._params, backup):
                    p.copy_(b)
            self._loaded_ema = None
        elif self._shadow is None:
            self._shadow = [p.detach().float().clone() for p in self._params]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.n_averaged:  # once per optimizer step (gradient accumulation)
            self._update(self._shadow, [p.detach().float() for p in self._params], self.n_averaged)
            self.n_averaged = trainer.global_step

    def _swap(self) -> None:
        with torch.no_grad():
            for s, p in zip(self._shadow, self._params):
                tmp = p.detach().clone()
                p.copy_(s.to(p.dtype))
                s.copy_(tmp.float())

    def swapped(self, pl_module: pl.LightningModule) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self._shadow is None else _swapping(self._swap)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._shadow is not None and not trainer.sanity_checking:
            self._swap()

    on_validation_epoch_end = on_validation_epoch_start  # swapping back is the same swap

    def state_dict(self) -> dict:
        return {"latest_update_step": self.n_averaged}

    def load_state_dict(self, state_dict: dict) -> None:
        self.n_averaged = int(state_dict["latest_update_step"])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._shadow is None:
            return
        with _swapping(self._swap):  # every rank runs this hook (FSDP gathers the state dict collectively)
            averaged = trainer.strategy.lightning_module_state_dict()
        checkpoint[CURRENT_KEY] = checkpoint["state_dict"]
        checkpoint["state_dict"] = averaged
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(self.n_averaged)}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if CURRENT_KEY in checkpoint:  # the model was loaded with the EMA: put the trained weights back
            self._loaded_ema = checkpoint["state_dict"]
            trainer.strategy.load_model_state_dict({"state_dict": checkpoint[CURRENT_KEY]}, strict=False)


def find_ema(trainer: pl.Trainer | None) -> EMA | ShardedEMA | None:
    """The run's EMA callback, if any."""
    return next((cb for cb in getattr(trainer, "callbacks", ()) if isinstance(cb, (EMA, ShardedEMA))), None)


def ema_weights(pl_module: pl.LightningModule) -> contextlib.AbstractContextManager:
    """The EMA weights inside the block, when the run has an EMA (and outside validation, which swaps by itself)."""
    trainer = pl_module._trainer
    ema = find_ema(trainer)
    if ema is None or trainer.validating or trainer.sanity_checking:
        return contextlib.nullcontext()
    return ema.swapped(pl_module)


__all__ = ["CURRENT_KEY", "EMA", "ShardedEMA", "ema_weights", "find_ema"]
