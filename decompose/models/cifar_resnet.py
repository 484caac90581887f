"""The CIFAR-10 ResNet family of depth 6n+2 (He et al. 2016, section 4.2), "option A" shortcuts.

Module names match the widely shared pretrained checkpoints (``conv1``, ``bn1``, ``layer1..3`` of
:class:`BasicBlock` with ``conv1``/``bn1``/``conv2``/``bn2``, ``linear``), so their state_dicts
load with ``strict=True`` once the ``module.`` prefix of a DataParallel save is stripped.

Every class here is a plain ``nn.Module`` subclass with no lambdas or closures, so a model pickles
with ``torch.save`` and loads with ``torch.load(weights_only=True)`` under
``torch.serialization.safe_globals(SAFE_GLOBALS + <the torch.nn classes it uses>)``.

Shapes, for a (N, 3, 32, 32) input: ``conv1`` -> (N, 16, 32, 32); ``layer1`` keeps it;
``layer2`` -> (N, 32, 16, 16); ``layer3`` -> (N, 64, 8, 8); global average pool -> (N, 64);
``linear`` -> (N, num_classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DecomposeError

INPUT_SHAPE = (3, 32, 32)
WIDTHS = (16, 32, 64)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: subsample by ``stride``, zero-pad channels both sides.

    Args:
        pad: channels of zeros added on each side (``planes // 4`` in the original code, i.e.
            half of the width increase).
        stride: spatial subsampling step. Default 2.
    """

    def __init__(self, pad: int, stride: int = 2) -> None:
        super().__init__()
        self.pad = int(pad)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv (1 or 2). Default 1.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA((planes - in_planes) // 2, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem conv, three stages of ``n`` blocks (16, 32, 64 wide), linear.

    Args:
        num_blocks: blocks per stage, e.g. ``(3, 3, 3)`` for ResNet-20.
        num_classes: outputs of the final linear layer. Default 10.

    The instance carries ``input_shape = (3, 32, 32)``, which the engine reads to count
    multiply-adds.
    """

    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = WIDTHS[0]
        self.conv1 = nn.Conv2d(3, WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.layer1 = self._make_layer(WIDTHS[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(WIDTHS[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(WIDTHS[2], num_blocks[2], stride=2)
        self.linear = nn.Linear(WIDTHS[2], num_classes)
        self.input_shape = INPUT_SHAPE
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# Our classes a weights-only unpickler must be allowed to build a pickled CifarResNet.
SAFE_GLOBALS = [CifarResNet, BasicBlock, ShortcutA]


def valid_depth(depth: object) -> bool:
    """True when ``depth`` is an int of the form 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110...)."""
    return isinstance(depth, int) and not isinstance(depth, bool) and depth >= 8 and (depth - 2) % 6 == 0


def cifar_resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    """Build a CIFAR ResNet of ``depth`` = 6n+2 layers (n blocks per stage), randomly initialised.

    Args:
        depth: 20, 32, 44, 56, 110, ... any 6n+2 with n >= 1. Default 20.
        num_classes: outputs. Default 10.

    Raises:
        DecomposeError: for a depth not of the form 6n+2 or a non-positive ``num_classes``.
    """
    if not valid_depth(depth):
        raise DecomposeError(
            f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
            f"got {depth!r}; pick one of those depths")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise DecomposeError(f"num_classes must be a positive integer, got {num_classes!r}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes=num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (3 blocks per stage, 0.27M parameters)."""
    return cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (5 blocks per stage, 0.46M parameters)."""
    return cifar_resnet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    """ResNet-44 (7 blocks per stage, 0.66M parameters)."""
    return cifar_resnet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (9 blocks per stage, 0.85M parameters)."""
    return cifar_resnet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    """ResNet-110 (18 blocks per stage, 1.7M parameters)."""
    return cifar_resnet(110, num_classes)


class _DepthBuilder:
    """``resnetN`` for any N = 6n+2 not written out above (a picklable callable, not a closure)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.__name__ = f"resnet{depth}"
        self.__doc__ = f"ResNet-{depth} ({(depth - 2) // 6} blocks per stage)."

    def __call__(self, num_classes: int = 10) -> CifarResNet:
        return cifar_resnet(self.depth, num_classes)

    def __repr__(self) -> str:
        return f"<builder {self.__name__}>"


class InvalidDepthError(DecomposeError, AttributeError):
    """``resnetN`` with N not 6n+2: a DecomposeError for users, an AttributeError for hasattr()."""


def builder_for(name: str):
    """The builder for ``"resnetN"``, or None when ``name`` is not of that form.

    Raises:
        InvalidDepthError: ``name`` is ``resnetN`` but N is not 6n+2.
    """
    if not name.startswith("resnet") or not (name[6:].isascii() and name[6:].isdigit()):
        return None
    depth = int(name[6:])
    if not valid_depth(depth):
        raise InvalidDepthError(
            f"no CIFAR ResNet named {name}: the depth must be 6n+2 with n >= 1 "
            f"(resnet20, resnet32, resnet44, resnet56, resnet110, ...)")
    return globals().get(name) or _DepthBuilder(depth)


def __getattr__(name: str):
    builder = builder_for(name)
    if builder is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return builder
