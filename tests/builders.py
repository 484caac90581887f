"""Model builders that tests name with --arch (module:function)."""

from __future__ import annotations

import enum

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


class Raising(nn.Module):
    """A model whose forward raises on batches of more than one sample (evaluation batches)."""

    input_shape = (3, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        if x.shape[0] > 1:
            raise ValueError("custom failure in forward")
        return self.fc(self.conv(x).mean((2, 3)))


class Exiting(Raising):
    """A model whose forward calls sys.exit on batches of more than one sample."""

    def forward(self, x):
        if x.shape[0] > 1:
            import sys
            sys.exit(3)
        return super().forward(x)


class NaNOut(Raising):
    """A model whose logits are all NaN."""

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3))) * float("nan")


def exits() -> nn.Module:
    import sys
    sys.exit(4)


class Colour(enum.Enum):
    """A non-module class a checkpoint may hold (restored by a call, pickle REDUCE)."""

    RED = 1
    BLUE = 2


def weight_norm_audio() -> nn.Module:
    """A 1-D audio-style model with weight-normalised convs (as Wav2Vec2 and Encodec): the new
    parametrization on a 5-tap conv and a 1x1 conv (left original by decoupling), the old hook
    on a 3-tap conv."""
    import warnings

    from torch.nn.utils.parametrizations import weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = nn.utils.weight_norm(nn.Conv1d(16, 8, 3, padding=1))
    return nn.Sequential(weight_norm(nn.Conv1d(4, 16, 5, padding=2)), nn.ReLU(),
                         weight_norm(nn.Conv1d(16, 16, 1), dim=0), nn.ReLU(), old)
