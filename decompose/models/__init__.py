"""Ready-made models: the CIFAR-10 ResNet family (for the shipped checkpoints) and a tiny digits CNN.

``resnet20`` ... ``resnet110`` are written out; any other ``resnetN`` with N = 6n+2 (e.g.
``resnet200``) is built on attribute access, and an N not of that form raises
:class:`~decompose.errors.DecomposeError` naming the valid form.
"""

from __future__ import annotations

from .cifar_resnet import (
    SAFE_GLOBALS,
    BasicBlock,
    CifarResNet,
    ShortcutA,
    builder_for,
    cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    valid_depth,
)
from .digits import digits_cnn, load_digits_tensors, train_digits_cnn

__all__ = [
    "SAFE_GLOBALS", "BasicBlock", "CifarResNet", "ShortcutA", "cifar_resnet", "valid_depth",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "digits_cnn", "load_digits_tensors", "train_digits_cnn",
]


def __getattr__(name: str):
    builder = builder_for(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return builder
