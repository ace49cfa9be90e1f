"""Strategies configurable from YAML by plain values (a set of classes does not round-trip through a config)."""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.strategies import FSDPStrategy

from srdd_lightning.models.transformer import AdaLNBlock


class GeneratorFSDP(FSDPStrategy):
    """FSDP for the stage-2 generator: one unit per transformer block, fp32 master weights (needs CUDA).

    Parameters, gradient reduction and buffers stay fp32 while the blocks compute in bf16 under ``trainer.precision:
    bf16-mixed``; the tokenizer and the EMA are ignored modules (``SRDDModule.setup``).

    Args:
        sharding_strategy: ``FULL_SHARD`` (least memory), ``SHARD_GRAD_OP`` (the usual speed/memory
            compromise), ``HYBRID_SHARD`` (shard within a node, replicate across nodes) or ``NO_SHARD``.
        activation_checkpointing: Recompute each block's activations in the backward pass (less memory,
            ~30 % more compute); for VAR-d24/d30 at large per-GPU batches.
        state_dict_type: ``full`` (one portable checkpoint file) or ``sharded`` (a folder; FSDP-only).
    """

    def __init__(self,
                 sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
                 activation_checkpointing: bool = False, state_dict_type: Literal["full", "sharded"] = "full",
                 **kwargs) -> None:
        from torch.distributed.fsdp import MixedPrecision

        fp32 = MixedPrecision(param_dtype=torch.float32, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        super().__init__(auto_wrap_policy={AdaLNBlock}, mixed_precision=kwargs.pop("mixed_precision", fp32),
                         activation_checkpointing_policy={AdaLNBlock} if activation_checkpointing else None,
                         sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)
