"""The data a fine-tuning run is given: unwrapping loaders, subsets, label and shape checks."""


from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from ...data import check_input_shape
from ...errors import DecomposeError
from ...errors import first_line as _first_line


# ------------------------------------------------------------------------------------ data
def _subset(ds: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:limit].sort().values.tolist())


def _base(ds: Any) -> Any:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def _dataset_of(loader: Any, what: str) -> Dataset:
    # Only a DataLoader is unwrapped: a Subset also has a .dataset (its parent), and taking it
    # would silently train or validate on the whole parent set.
    ds = loader.dataset if isinstance(loader, DataLoader) else loader
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__getitem__") \
            or not hasattr(ds, "__len__"):
        raise DecomposeError(f"the {what} data must be a map-style Dataset (or a DataLoader of "
                             "one) so it can be shuffled and sharded; wrap tensors in a "
                             "TensorDataset")
    if len(ds) == 0:
        raise DecomposeError(f"the {what} data set is empty; give a folder or .npz with images")
    return ds


def _check_labels(ds: Dataset, what: str) -> None:
    item = ds[0]
    label = item[1] if isinstance(item, (tuple, list)) and len(item) >= 2 else None
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    elif isinstance(label, np.generic):
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise DecomposeError(f"the {what} data has no class labels; fine-tuning needs them: use "
                             "an .npz with arrays x and y, or a folder with one sub-folder per "
                             "class")


def _check_classes(train: Dataset, val: Dataset) -> None:
    a, b = getattr(_base(train), "classes", None), getattr(_base(val), "classes", None)
    if a is None or b is None or list(a) == list(b):
        return
    only_t, only_v = [c for c in a if c not in b][:3], [c for c in b if c not in a][:3]
    detail = (f"only in training: {only_t}, only in validation: {only_v}"
              if only_t or only_v else "same names in another order")
    raise DecomposeError(f"the validation classes differ from the training classes ({len(b)} vs "
                         f"{len(a)}; {detail}); use a validation folder with the same class "
                         "sub-folders")


def _loader(ds: Dataset, template: Any, batch_size: int, sampler: Sampler, workers: int,
            device: torch.device) -> DataLoader:
    collate = template.collate_fn if isinstance(template, DataLoader) else None
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=device.type == "cuda")




def _probe(student: nn.Module, teacher: nn.Module | None, ds: Dataset, device: torch.device
           ) -> None:
    """One forward of two images: the input shape, labels within the logits, and a teacher
    whose logits have the student's shape."""
    items = [ds[i] for i in range(min(2, len(ds)))]
    x = torch.stack([torch.as_tensor(it[0]) for it in items]).to(device)
    top_label = max(int(torch.as_tensor(it[1]).item()) for it in items)
    check_input_shape(getattr(student, "input_shape", None), tuple(x.shape[1:]))
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            out = student(x)
    except Exception as e:  # noqa: BLE001 - the model's own failure, reported in one line
        raise DecomposeError(f"the model fails on the training images ({type(e).__name__}: "
                             f"{_first_line(e)}); check that the data fits the model") from None
    finally:
        student.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise DecomposeError("the model does not return logits of shape (batch, classes); "
                             "fine-tune a classifier")
    if top_label >= out.shape[1]:
        raise DecomposeError(f"the data has label {top_label} but the model has only "
                             f"{out.shape[1]} outputs; use data with the model's classes")
    if teacher is None:
        return
    try:
        with torch.no_grad():
            t = teacher(x)
    except Exception as e:  # noqa: BLE001
        raise DecomposeError(f"the teacher fails on the training images ({type(e).__name__}: "
                             f"{_first_line(e)}); pass the original the student was made "
                             "from") from None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(out.shape):
        shape = tuple(t.shape[1:]) if isinstance(t, torch.Tensor) else type(t).__name__
        raise DecomposeError(f"the teacher's outputs {shape} do not match the student's "
                             f"{tuple(out.shape[1:])}; pass the original model the student was "
                             "decomposed from as --teacher")


