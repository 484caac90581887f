"""Tiny generated image folders and a tiny classifier for the measuring and CLI tests."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn


def make_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 8,
                seed: int = 0) -> Path:
    """root/<class>/<i>.png with random RGB images of size x size pixels."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


def tiny_classifier(classes: int = 3, size: int = 8) -> nn.Sequential:
    """Two 3x3 convs (both decoupled at rank 1), a pool and a linear head; input (3, size, size)."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 16, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 16, 3, padding=1, bias=False)),
        ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flat", nn.Flatten()),
        ("fc", nn.Linear(16, classes)),
    ]))
    m.input_shape = (3, size, size)
    return m.eval()


def save_classifier(path: Path, classes: int = 3, size: int = 8) -> Path:
    torch.save(tiny_classifier(classes, size), path)
    return path
