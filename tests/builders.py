"""Model builders that tests name with --arch (module:function)."""

from __future__ import annotations

from conftest import tiny_cnn
from torch import nn


def tiny() -> nn.Module:
    return tiny_cnn()


def other() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3))


class Custom(nn.Module):
    """A user-defined model class: safe loading must refuse it until the user allows it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.conv(x).relu())


def custom() -> nn.Module:
    return Custom()


def broken() -> nn.Module:
    raise RuntimeError("boom")
