"""Entry points: a dataset from a path, DataLoaders of (images, labels), calibration batches."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import DecomposeError
from .arrays import ArrayData
from .dataset import _Data
from .folders import ImageFolderData
from .spec import DataSpec

# ---------------------------------------------------------------------------------------------
# Entry points.

def open_dataset(path: str | os.PathLike, spec: DataSpec | None = None, *, limit: int | None = None,
                 seed: int = 0, labels_required: bool = True) -> _Data:
    """The dataset at ``path`` (an image folder or an ``.npz``), optionally a seeded subset.

    Args:
        path: a folder of class sub-folders, or an ``.npz`` file.
        spec: preprocessing. Default ``DataSpec()``.
        limit: keep this many samples, picked at random with ``seed`` (the same ones on every
            run), in their original order; None keeps all. Default None.
        seed: seed of the subset. Default 0.
        labels_required: raise for data without labels. Default True.

    Returns:
        A ``torch.utils.data.Dataset`` with ``classes`` (names, in label order), ``spec``,
        ``labels`` (None when unlabeled) and ``describe(i)``; items are ``(image, label)``, label
        -1 when unlabeled.
    """
    p = Path(path)
    from ..io.inputs import stat_input
    try:
        os.stat(p)
    except FileNotFoundError:
        raise DecomposeError(f"data path {p} does not exist; give a folder of class sub-folders "
                             f"or an .npz file") from None
    except (OSError, ValueError):
        pass  # stat_input says what is wrong
    st = stat_input(p, "data path", folder_ok=True)  # FIFOs, devices, long names: refused
    if stat.S_ISDIR(st.st_mode):
        data: _Data = ImageFolderData(p, spec, labels_required)
    elif p.suffix.lower() == ".npz":
        data = ArrayData(p, spec, labels_required)
    else:
        raise DecomposeError(f"{p} is neither a folder nor an .npz file; give a folder of class "
                             f"sub-folders (<class>/<image>.jpg) or an .npz with arrays x and y")
    data.subset(limit, seed)
    return data


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (image, label) pairs; images of different sizes raise a DecomposeError."""
    shapes = {tuple(x.shape) for x, _ in batch}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DecomposeError(f"the images are not all the same size ({_fmt(a)} and {_fmt(b)}); "
                             f"set resize and crop (e.g. --resize 32 --crop 32) to make them equal")
    return (torch.stack([x for x, _ in batch]),
            torch.tensor([y for _, y in batch], dtype=torch.int64))


class _Loader(DataLoader):
    """A DataLoader whose errors from worker processes stay one-line DecomposeErrors (torch
    re-raises them with the worker's traceback in the message)."""

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DecomposeError as e:
                lines = [ln for ln in str(e).splitlines() if ln.strip()]
                if len(lines) <= 1:
                    raise
                last = lines[-1].split("DecomposeError: ", 1)[-1]
                raise DecomposeError(last) from None
            yield batch


def _fmt(shape: Sequence[int]) -> str:
    return f"{shape[-2]}x{shape[-1]} pixels, {shape[0]} channel(s)"


def make_loader(path: str | os.PathLike, *, batch_size: int = 128, limit: int | None = None,
                seed: int = 0, train: bool = False, resize: int | None = None,
                crop: int | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, grayscale: bool = False,
                num_workers: int = 0, shuffle: bool = False, labels_required: bool = True
                ) -> DataLoader:
    """A DataLoader of ``(images, labels)`` batches from an image folder or an ``.npz`` file.

    Args:
        path: a folder of class sub-folders (``<class>/<image>``), or an ``.npz`` with ``x``/``y``.
        batch_size: Default 128.
        limit: use only this many samples, a seeded random subset; None uses all. Default None.
        seed: seed of the subset and of the shuffling order. Default 0.
        train: apply the training augmentation (random crop with 4-pixel padding, horizontal
            flip). Default False.
        resize: shorter side in pixels, or None to keep. Default None.
        crop: center crop size in pixels, or None. Default None.
        mean: normalisation mean, one value or one per channel. Default (None) ImageNet's
            (0.485, 0.456, 0.406), or (0.449,) with ``grayscale``.
        std: normalisation std. Default (None) ImageNet's (0.229, 0.224, 0.225), or (0.226,)
            with ``grayscale``.
        grayscale: one channel instead of RGB. Default False.
        num_workers: DataLoader worker processes; 0 decodes in this process and keeps the cache
            across passes. Default 0.
        shuffle: reshuffle every pass (order seeded by ``seed``). Default False.
        labels_required: raise for data without labels; when False unlabeled samples get label
            -1. Default True.

    The dataset (``loader.dataset``) has ``classes``, ``spec`` and ``describe(i)``.
    """
    spec = DataSpec(resize=resize, crop=crop, mean=mean, std=std, grayscale=grayscale,
                    augment=train)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DecomposeError(f"batch_size must be a positive integer, got {batch_size!r}")
    data = open_dataset(path, spec, limit=limit, seed=seed, labels_required=labels_required)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return _Loader(data, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                   collate_fn=collate, generator=gen)


def calibration_batches(path: str | os.PathLike, n_samples: int = 512, batch_size: int = 64,
                        seed: int = 0, **preproc: Any) -> Iterator[torch.Tensor]:
    """Image batches only (labels ignored) for label-free calibration.

    Works on labeled or unlabeled data: an ``.npz`` without ``y``, or a folder of images with no
    class sub-folders. The data is opened (and checked) when this is called; batches are decoded
    as they are iterated.

    Args:
        path: an image folder or ``.npz``.
        n_samples: how many images, a seeded random subset; None for all. Default 512.
        batch_size: Default 64.
        seed: seed of the subset. Default 0.
        **preproc: ``resize``, ``crop``, ``mean``, ``std``, ``grayscale`` as in :func:`make_loader`.
    """
    loader = make_loader(path, batch_size=batch_size, limit=n_samples, seed=seed,
                         labels_required=False, **preproc)

    def images() -> Iterator[torch.Tensor]:
        for x, _ in loader:
            yield x
    return images()
