"""DataSpec: how images become tensors (resize, crop, mean/std, grayscale, augmentation)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import DecomposeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: largest resize / crop side: an 8192 x 8192 RGB image is 0.8 GB as float32 (a larger one is
#: almost certainly a typo, e.g. --resize 100000, which would need 120 GB)
MAX_SIDE = 8192


@dataclass(frozen=True)
class DataSpec:
    """How images become tensors. Every field is a keyword with a default; validated on creation.

    Args:
        resize: resize the shorter side to this many pixels (bilinear, antialiased), keeping the
            aspect ratio; None keeps the size. Default None.
        crop: center crop to ``crop`` x ``crop`` (zero padding where the image is smaller);
            None keeps the size. Default None.
        mean: per-channel mean subtracted after scaling to [0, 1]; one value or one per channel.
            Default (None): the ImageNet mean (0.485, 0.456, 0.406), which the CIFAR ResNets
            use; with ``grayscale``, its average (0.449,).
        std: per-channel divisor. Default (None): the ImageNet std (0.229, 0.224, 0.225); with
            ``grayscale``, its average (0.226,).
        grayscale: convert to one channel (PIL "L") instead of RGB. Default False.
        augment: training augmentation after cropping: pad 4 pixels of zeros, take a random crop
            of the image's size, flip horizontally with probability 0.5 (the CIFAR recipe; uses
            torch's global random generator, as torchvision does). Default False.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grayscale: bool = False
    augment: bool = False

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DecomposeError(f"{name} must be a positive number of pixels or None, got {v!r}")
            if v is not None and v > MAX_SIDE:
                raise DecomposeError(f"{name} must be at most {MAX_SIDE} pixels, got {v}; e.g. "
                                     f"--{name} 224")
        for name, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            v = getattr(self, name)
            if v is None:
                v = default if self.channels == 3 else (round(sum(default) / 3, 3),)
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                vals = tuple(float(t) for t in (v if np.iterable(v) else [v]))
            except (TypeError, ValueError):
                raise DecomposeError(f"{name} must be numbers, e.g. 0.5 or 0.485,0.456,0.406; "
                                     f"got {v!r}") from None
            if len(vals) not in (1, self.channels):
                raise DecomposeError(
                    f"{name} has {len(vals)} values but the images have {self.channels} "
                    f"channel(s); give one value or {self.channels}")
            if not all(math.isfinite(t) for t in vals):
                raise DecomposeError(f"{name} must be finite numbers, got {v!r}; e.g. "
                                     f"--{name} {','.join(map(str, default))}")
            object.__setattr__(self, name, vals)
        if any(s <= 0 for s in self.std):
            raise DecomposeError(f"std values must be positive, got {self.std}")

    @property
    def channels(self) -> int:
        """Channels of the produced tensors: 1 with ``grayscale``, else 3."""
        return 1 if self.grayscale else 3

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``DataSpec(**d)`` rebuilds it."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d
