"""Shared fixtures: small packed datasets built in a temporary folder (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from srdd_lightning.data import pack_digits

# Small convs lose badly to thread contention on a shared 2-core machine; OMP_NUM_THREADS overrides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The built-in digits packed at 16 px: 1533 train samples in 12 shards, 264 val samples in 8 equal shards."""
    root = tmp_path_factory.mktemp("digits")
    pack_digits(root, resolution=16, shard_size=128, val_fraction=0.15, val_shards=8, seed=0)
    return root
