"""``.npz`` arrays: ``x`` (N, C, H, W) or (N, H, W, C) or (N, H, W), optional ``y`` and ``classes``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import DecomposeError
from ..errors import first_line as _first_line
from .dataset import _Data
from .spec import DataSpec
from .transforms import (
    _finish,
    _Geometric,
    _match_channels,
    _pil_geometric,
    _tensor_geometric,
    _to_unit_tensor,
)


class ArrayData(_Data):
    """Images from an ``.npz`` file: ``x`` required, ``y`` and ``classes`` optional.

    uint8 (or other integer 0-255) arrays are scaled by 1/255 and, when ``resize``/``crop`` are
    set, resized through PIL exactly as image files are; float arrays must already be in [0, 1]
    and are resized with torch's antialiased bilinear interpolation.

    Args:
        path: the ``.npz`` file.
        spec: preprocessing. Default ``DataSpec()``.
        labels_required: raise when there is no ``y``. Default True.
    """

    def __init__(self, path: str | os.PathLike, spec: DataSpec | None = None,
                 labels_required: bool = True) -> None:
        self.root = Path(path)
        self.spec = spec or DataSpec()
        self.x, self.labels, self.classes = _read_npz(self.root, labels_required)
        self.indices = np.arange(len(self.x))
        self._geometric = _Geometric(self.spec.resize, self.spec.crop)

    def _name(self, j: int) -> str:
        return f"{self.root}[{j}]"

    def _image(self, j: int) -> torch.Tensor:
        a = self.x[j]  # (H, W, C)
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.uint8, copy=False)
            if self.spec.resize is not None or self.spec.crop is not None:
                a = _pil_geometric(a, self._geometric)
            x = _to_unit_tensor(np.ascontiguousarray(a))
        else:
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).to(torch.float32)
            x = _tensor_geometric(x, self.spec)
        x = _match_channels(x, self.spec.channels)
        return _finish(x, self.spec)


def _read_npz(path: Path, labels_required: bool
              ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(x as (N, H, W, C), labels or None, class names) from an .npz; raises on bad content."""
    from ..io.inputs import open_input
    with open_input(path, "data file") as fh:
        _check_npz_size(fh, path)
        fh.seek(0)
        try:
            with np.load(fh, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except MemoryError:
            raise DecomposeError(f"{path} does not fit in memory; use a smaller .npz or a folder "
                                 "of images") from None
        except Exception as e:  # noqa: BLE001 - zip, pickle and format errors: "unreadable"
            raise DecomposeError(f"cannot read {path} as an .npz file ({_first_line(e)}); "
                                 f"save it with numpy.savez(path, x=images, y=labels)") from None
    keys = ", ".join(sorted(arrays)) or "none"
    if "x" not in arrays:
        raise DecomposeError(f"{path} has no array 'x' (keys: {keys}); save images as x with shape "
                             f"(N, C, H, W) or (N, H, W, C) and labels as y")
    x = arrays["x"]
    if x.ndim == 3:
        x = x[:, :, :, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    elif not (x.ndim == 4 and x.shape[3] in (1, 3)):
        raise DecomposeError(f"{path}: x has shape {tuple(x.shape)}; expected (N, C, H, W) or "
                             f"(N, H, W, C) with 1 or 3 channels, or (N, H, W)")
    if len(x) == 0:
        raise DecomposeError(f"{path}: x holds no images; save at least one")
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise DecomposeError(
                f"{path}: x holds floats outside [0, 1] (min {lo:.3g}, max {hi:.3g}); store raw "
                f"pixels as uint8 0-255 or floats in [0, 1] (mean/std are applied here)")
    elif np.issubdtype(x.dtype, np.integer):
        if x.dtype != np.uint8 and (int(x.min()) < 0 or int(x.max()) > 255):
            raise DecomposeError(f"{path}: x holds integers outside 0-255; store uint8 pixels")
    else:
        raise DecomposeError(f"{path}: x has dtype {x.dtype}; store uint8 0-255 or floats in [0, 1]")

    y = arrays.get("y")
    if y is None:
        if labels_required:
            raise DecomposeError(f"{path} has no labels (array 'y'; keys: {keys}); add y with one "
                                 f"integer class per image")
        return x, None, _class_names(arrays, 0)
    y = np.asarray(y).reshape(-1) if y.ndim == 2 and 1 in y.shape else y
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DecomposeError(f"{path}: y must be {len(x)} integer labels, one per image in x; got "
                             f"shape {tuple(y.shape)} dtype {y.dtype}")
    if y.min() < 0:
        raise DecomposeError(f"{path}: y holds negative labels; labels must be 0..classes-1")
    return x, y.astype(np.int64), _class_names(arrays, int(y.max()) + 1)


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _check_npz_size(fh, path: Path) -> None:
    """Refuse an .npz whose arrays, once decompressed, would take more than half the memory
    available (a compressed file can expand a thousandfold), before reading them."""
    try:
        with zipfile.ZipFile(fh) as z:
            declared = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # np.load says what is wrong with it
    avail = _available_memory()
    if avail is not None and declared > avail // 2:
        raise DecomposeError(f"{path} holds {declared / 2**30:.1f} GiB of arrays once "
                             f"decompressed, more than half the {avail / 2**30:.1f} GiB of "
                             "memory available; use a smaller .npz or a folder of images")


def _class_names(arrays: dict[str, np.ndarray], n: int) -> list[str]:
    names = arrays.get("classes")
    if names is not None and names.ndim == 1 and len(names) >= n:
        return [str(s) for s in names.tolist()]
    return [str(i) for i in range(n)]
