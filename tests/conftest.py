"""Shared fixtures: tiny models, seeded generators, the location of ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
MODELS = SHARED / "models" / "cifar-resnet"
CIFAR = SHARED / "data" / "cifar10"

needs_shared = pytest.mark.skipif(
    not (MODELS / "resnet20.th").exists() or not (CIFAR / "test").is_dir(),
    reason="../shared (pretrained CIFAR ResNets and CIFAR-10 images) is not next to this clone",
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_cnn() -> nn.Sequential:
    """Three k x k convs (one strided), a 1x1 conv, a depthwise conv and a classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 12, (3, 5), padding=(1, 2), groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )


@pytest.fixture
def tiny():
    return tiny_cnn().eval()
