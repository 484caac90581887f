"""Pixel transforms: torchvision's when ``import torchvision`` works, else an equivalent PIL +
numpy + torch implementation that gives the same tensors.

Geometric part: PIL image -> PIL image (or, for float arrays, tensor -> tensor); tensor part:
uint8 HWC -> float CHW, then optional augmentation and normalisation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import DecomposeError
from .spec import DataSpec

AUGMENT_PADDING = 4

try:  # optional: pixel transforms from torchvision when present
    import torchvision.transforms as _tvt
except Exception:  # noqa: BLE001 - any import failure means "not usable here"
    _tvt = None


def has_torchvision() -> bool:
    """True when torchvision's transforms are importable (and so used for eval preprocessing)."""
    return _tvt is not None


# ---------------------------------------------------------------------------------------------
# Pixel transforms. Geometric part: PIL image -> PIL image; tensor part: uint8 HWC -> float CHW.

def _resize_pil(img, size: int):
    # torchvision's rule: the shorter side becomes `size`, the longer one int(size * long / short)
    Image = _pil()

    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def _center_crop_pil(img, size: int):
    # torchvision's rule: zero-pad when too small, then crop at round((H - h) / 2)
    Image = _pil()

    w, h = img.size
    if size > w or size > h:
        left = (size - w) // 2 if size > w else 0
        top = (size - h) // 2 if size > h else 0
        right = (size - w + 1) // 2 if size > w else 0
        bottom = (size - h + 1) // 2 if size > h else 0
        padded = Image.new(img.mode, (w + left + right, h + top + bottom), 0)
        padded.paste(img, (left, top))
        img = padded
        w, h = img.size
        if (w, h) == (size, size):
            return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


class _Geometric:
    """The resize + crop of a spec as a picklable PIL -> PIL callable (torchvision's if present)."""

    def __init__(self, resize: int | None, crop: int | None) -> None:
        self.resize, self.crop = resize, crop
        self.tv = None
        if _tvt is not None:
            ops = [_tvt.Resize(resize)] if resize is not None else []
            ops += [_tvt.CenterCrop(crop)] if crop is not None else []
            self.tv = _tvt.Compose(ops)

    def __call__(self, img):
        if self.tv is not None:
            return self.tv(img)
        if self.resize is not None:
            img = _resize_pil(img, self.resize)
        if self.crop is not None:
            img = _center_crop_pil(img, self.crop)
        return img


def _to_unit_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float32 (C, H, W) in [0, 1], exactly as torchvision's ToTensor."""
    if _tvt is not None:
        return _tvt.functional.to_tensor(arr)
    return torch.from_numpy(arr.transpose(2, 0, 1)).contiguous().to(torch.float32).div(255)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Pad with zeros, random crop back to the same size, random horizontal flip. (C, H, W)."""
    p = AUGMENT_PADDING
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    i = int(torch.randint(0, 2 * p + 1, ()).item())
    j = int(torch.randint(0, 2 * p + 1, ()).item())
    x = padded[:, i:i + h, j:j + w]
    if torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x.contiguous()


def _normalize(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    mean = torch.as_tensor(spec.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(spec.std, dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


def _finish(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    """[0, 1] (C, H, W) -> optional augmentation -> normalised."""
    if spec.augment:
        x = _augment(x)
    return _normalize(x, spec)


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DecomposeError("reading images needs Pillow; install it with "
                             "pip install pillow (or pip install 'decompose[images]')") from None
    return Image


def _pil_geometric(a: np.ndarray, geometric: Callable) -> np.ndarray:
    Image = _pil()

    img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
    out = np.array(geometric(img), dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out


def _tensor_geometric(x: torch.Tensor, spec: DataSpec) -> torch.Tensor:
    if spec.resize is not None:
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_short, new_long = spec.resize, int(spec.resize * long / short)
        size = (new_long, new_short) if w <= h else (new_short, new_long)
        if size != (h, w):
            x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear",
                                                align_corners=False, antialias=True)[0]
    if spec.crop is not None:
        c = spec.crop
        h, w = x.shape[-2:]
        if c > h or c > w:
            ph, pw = max(c - h, 0), max(c - w, 0)
            x = torch.nn.functional.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
            h, w = x.shape[-2:]
        top, left = int(round((h - c) / 2.0)), int(round((w - c) / 2.0))
        x = x[:, top:top + c, left:left + c]
    return x.contiguous()


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray -> RGB by repetition, RGB -> gray by PIL's luma weights (ITU-R 601-2)."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    return (x[:3] * weights).sum(0, keepdim=True)
