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


VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]  # fmt: skip


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory):
    """Stand-in weight files with the right keys and shapes (torchvision vgg16 features, LPIPS vgg.pth heads)."""
    d = tmp_path_factory.mktemp("lpips")
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, cin, cout in VGG16_CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.zeros(cout)
    vgg["classifier.6.bias"] = torch.zeros(1000)  # the classifier is ignored
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, d / "vgg16.pth")
    torch.save(heads, d / "vgg.pth")
    return d / "vgg16.pth", d / "vgg.pth"
