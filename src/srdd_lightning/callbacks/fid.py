"""``FIDCallback``: an FID monitor every N training steps, computed on all ranks from reduced statistics.

Sample i (seed ``seed + i``, class ``i mod num_classes``) is made by rank i mod world size with the EMA weights
(``ema_weights()``); the ranks sum float64 feature statistics (n, Σx, Σxxᵀ; never images), so every rank computes the
same FID against the train split's cached reference and logs it with ``sync_dist=False`` under a key that
``ModelCheckpoint(monitor=...)`` can use (``val/fid_digits-classifier_1000``). IS and class accuracy come from the
gathered logits. ``mode="reconstruct"`` scores ``reconstruct(img_B3HW)`` of validation images (``val/rfid_...``).
An in-training monitor: table numbers come from ``srdd sample`` → ``srdd evaluate``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors

from srdd_lightning.data.index import ShardIndex
from srdd_lightning.data.stream import ValShards
from srdd_lightning.evaluation import (DEFAULT_CACHE_DIR, check_extractor_fits, compute_metrics, dataset_reference,
                                       extractor_from_options, has_class_logits, load_index)
from srdd_lightning.metrics import FeatureExtractor, FeatureStats, ReferenceStats
from srdd_lightning.sampling.config import SamplingConfig
from srdd_lightning.utils.images import to_uint8


class FIDCallback(pl.Callback):
    """FID (and IS / class accuracy when the extractor has logits) every ``every_n_steps`` training steps.

    Args:
        every_n_steps: Evaluate after every this many optimizer steps (never in the sanity check or fast_dev_run).
        num_samples: Samples over all ranks (generate), or the first validation images (reconstruct).
        extractor: ``digits-classifier`` (needs ``classifier``) or ``inception-v3-compat`` (needs
            ``inception_weights`` or the env var SRDD_INCEPTION_WEIGHTS).
        classifier: Digits classifier checkpoint (``srdd classifier``).
        inception_weights: torch-fidelity's Inception weights file.
        data_root: Packed dataset whose train split is the reference (default: the datamodule's ``root``, or the
            packed images a token cache was written from).
        cache_dir: Folder of cached reference statistics (shared with ``srdd evaluate``).
        num_reference: Reference images (default: the whole train split).
        batch_size: Samples per sampler / extractor call on each rank.
        seed: Sample i uses seed ``seed + i`` (the same samples at every evaluation, on any number of ranks).
        mode: ``generate`` (the generator's samples) or ``reconstruct`` (the tokenizer's reconstructions).
        sampling: Sampling settings for ``generate`` (default: VAR's protocol, cfg 1.5, top-k 900, top-p 0.96).
        use_ema: Evaluate with the EMA weights (``pl_module.ema_weights()``).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 1000, extractor: str = "digits-classifier",
                 classifier: str | None = None, inception_weights: str | None = None, data_root: str | None = None,
                 cache_dir: str = DEFAULT_CACHE_DIR, num_reference: int | None = None, batch_size: int = 100,
                 seed: int = 0, mode: Literal["generate", "reconstruct"] = "generate",
                 sampling: SamplingConfig | None = None, use_ema: bool = True):  # fmt: skip
        super().__init__()
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(f"FIDCallback: every_n_steps ({every_n_steps}) and batch_size ({batch_size}) must be >= 1, "
                             f"num_samples ({num_samples}) >= 2")  # fmt: skip
        if mode not in ("generate", "reconstruct"):
            raise ValueError(f"FIDCallback mode must be 'generate' or 'reconstruct', got {mode!r}")
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.extractor_name, self.classifier, self.inception_weights = extractor, classifier, inception_weights
        self.data_root, self.cache_dir, self.num_reference = data_root, cache_dir, num_reference
        self.mode, self.sampling, self.use_ema = mode, sampling or SamplingConfig(), use_ema
        self._extractor: FeatureExtractor | None = None
        self._reference: ReferenceStats | None = None
        self._index: ShardIndex | None = None
        self._last_step, self._warned_no_ema = -1, False
        self.last_metrics: dict[str, Any] = {}
        self.calls = 0  # evaluations run (tests count them)

    def metric_key(self, n: int | None = None, metric: str = "fid") -> str:
        """``val/fid_<extractor>_<n>`` (``val/rfid_...`` for reconstructions); the key to monitor."""
        name = ("r" + metric) if self.mode == "reconstruct" and metric == "fid" else metric
        return f"val/{name}_{self.extractor_name}_{self.num_samples if n is None else n}"

    # ---- lazy setup (on the module's device; the reference is computed by rank 0, then read by all) --------
    def _root(self, trainer: pl.Trainer) -> str:
        if self.data_root is not None:
            return self.data_root
        dm = getattr(trainer, "datamodule", None)  # a token cache holds no images: use the folder it was made from
        root = getattr(dm, "image_root", None) or getattr(dm, "root", None)
        if root is None:
            raise ValueError("FIDCallback needs data_root (the packed dataset of the reference), or a datamodule with .root")
        return os.fspath(root)

    def _resolution(self, trainer: pl.Trainer) -> int:
        dm = getattr(trainer, "datamodule", None)
        res = getattr(dm, "resolution", None) if self.data_root is None else None
        return int(res or self._index.resolution)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._extractor is None:
            extractor = extractor_from_options(self.extractor_name, self.classifier, self.inception_weights,
                                               pl_module.device)  # fmt: skip
            self._index = load_index(self._root(trainer), option="FIDCallback data_root")
            check_extractor_fits(extractor, self._index, self._resolution(trainer), option="FIDCallback classifier")
            self._extractor = extractor
        if self._reference is None:
            res = self._resolution(trainer)
            build = lambda: dataset_reference(self._index, self._extractor, self.cache_dir, self.num_reference, res,  # noqa: E731
                                              self.batch_size, option="FIDCallback cache_dir")  # fmt: skip
            if trainer.is_global_zero:
                self._reference = build()  # computes and caches (atomically) on a miss
            trainer.strategy.barrier("fid_reference")
            if not trainer.is_global_zero:
                self._reference = build()  # now a cache hit

    # ---- the trigger and the evaluation --------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        disabled = trainer.sanity_checking or trainer.fast_dev_run
        if disabled or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._last_step = step  # several batch ends share one optimizer step under gradient accumulation
        metrics = self.evaluate(trainer, pl_module)
        for key, value in metrics.items():
            # Identical on every rank: no sync. logger=False: the loggers get it below at this very step, whatever
            # log_every_n_steps is; callback_metrics (ModelCheckpoint's monitor) get it from self.log.
            pl_module.log(key, value, on_step=True, on_epoch=False, sync_dist=False, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _ema(self, pl_module: pl.LightningModule):
        """The stage's ``ema_weights()``; the current weights (with a warning, once) without it."""
        if self.use_ema and hasattr(pl_module, "ema_weights"):
            return pl_module.ema_weights()
        if self.use_ema and not self._warned_no_ema:
            warnings.warn(f"FIDCallback: {type(pl_module).__name__} has no ema_weights(); evaluating the current "
                          "weights", stacklevel=2)  # fmt: skip
            self._warned_no_ema = True
        return contextlib.nullcontext()

    def _batches(self, rank: int, world_size: int, total: int) -> Iterator[tuple[list[int], bool]]:
        """This rank's sample indices i ≡ rank (mod world_size) in batches, padded so that every rank runs the same
        number of forward passes (FSDP); a padding batch is (one index, False)."""
        indices = list(range(rank, total, world_size))
        for b in range(math.ceil(math.ceil(total / world_size) / self.batch_size)):
            idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield (idx, True) if idx else ([indices[-1] if indices else 0], False)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run the evaluation on every rank; returns the identical metrics on all of them."""
        self._prepare(trainer, pl_module)
        ext, ref = self._extractor, self._reference
        rank, world = trainer.global_rank, trainer.world_size
        stats = FeatureStats(ext.feature_dim, device=pl_module.device)
        idx_all, logits, labels = [], [], []
        was_training = pl_module.training
        pl_module.eval()
        try:
            with self._ema(pl_module):
                for idx_B, labels_B, img_B3HW in self._images(trainer, pl_module, rank, world):
                    if img_B3HW.shape[-1] != ref.resolution or img_B3HW.shape[-2] != ref.resolution:
                        raise ValueError(f"FIDCallback: images are {tuple(img_B3HW.shape[-2:])} px but the reference "
                                         f"statistics ({ref.path}) are for {ref.resolution} px; the data and the model "
                                         f"disagree")  # fmt: skip
                    u8 = to_uint8(img_B3HW)
                    if ext.has_logits:
                        f_BD, l_BK = ext.features_and_logits(u8.to(ext.device))
                        logits.append(l_BK.float())
                    else:
                        f_BD = ext(u8.to(ext.device))
                    stats.update(f_BD)
                    idx_all.append(torch.as_tensor(idx_B, device=pl_module.device))
                    labels.append(torch.as_tensor(labels_B, device=pl_module.device))
        finally:
            pl_module.train(was_training)
        stats.all_reduce()
        # IS splits and class accuracy need per-sample logits: gather them (N x K, small) and order by index,
        # so that every rank — and an offline run on the same samples — sees the same sequence.
        logits_NK = labels_N = None
        if ext.has_logits:
            dev = pl_module.device
            order_N = _gather_rows(idx_all, (0,), torch.long, dev).argsort()
            logits_NK = _gather_rows(logits, (0, ext.num_classes), torch.float32, dev)[order_N].cpu()
            labels_N = _gather_rows(labels, (0,), torch.long, dev)[order_N].cpu()
        class_logits = has_class_logits(ext, self._index.num_classes)
        metrics = compute_metrics(stats, None, logits_NK, labels_N, ref, class_logits)
        self.last_metrics = metrics
        self.calls += 1
        names = {"fid": "fid", "inception_score": "is", "class_accuracy": "class_acc"}
        return {self.metric_key(stats.n, names[k]): metrics[k] for k in names if k in metrics}

    def _images(self, trainer, pl_module, rank: int, world: int):
        """(indices, labels, images in [-1, 1]) batches of this rank; padding batches are generated and dropped."""
        if self.mode == "generate":
            num_classes = int(pl_module.generator.num_classes)
            sampler = pl_module.sampler()
            for idx, real in self._batches(rank, world, self.num_samples):
                labels = [i % num_classes for i in idx]
                out = sampler.sample(torch.tensor(labels), self.sampling, seeds=[self.seed + i for i in idx])
                if real:
                    yield idx, labels, out.images.float()
            return
        # reconstruct: the first num_samples validation images in shard order (independent of the world size)
        recon = getattr(pl_module, "reconstruct", None) or pl_module.tokenizer.reconstruct
        total = min(self.num_samples, self._index.split("val").total)
        shards = functools.partial(ValShards, self._index.shard_paths("val"), self._resolution(trainer))
        val, pad = enumerate(shards()), None
        for idx, real in self._batches(rank, world, total):
            if not real:  # equal forward passes on every rank: reconstruct a repeated image, drop the result
                if pad is None:  # this rank has no image at all (fewer images than ranks)
                    pad = next(iter(shards()))[0][None]
                recon(pad.to(pl_module.device))
                continue
            wanted, got = set(idx), {}
            while len(got) < len(idx):  # indices are increasing within and across batches: one sequential pass
                i, (img, label) = next(val)
                if i in wanted:
                    got[i] = (img, int(label))
            x_B3HW = torch.stack([got[i][0] for i in idx]).to(pl_module.device)
            pad = x_B3HW[:1]
            yield idx, [got[i][1] for i in idx], recon(x_B3HW).float()


def _gather_rows(parts: list[torch.Tensor], empty_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Every rank's rows (its ``parts`` concatenated; ``empty_shape`` if none) in rank order, through torchmetrics'
    ``gather_all_tensors`` (ranks may hold different numbers of rows). Identity without a process group."""
    local = torch.cat(parts).to(dtype) if parts else torch.zeros(empty_shape, dtype=dtype, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return torch.cat(gather_all_tensors(local))
