"""Classification accuracy of a model on a DataLoader: top-1, top-5, mean cross-entropy.

Where model meets data the mismatches are checked and reported as one-line DecomposeErrors:
images of another shape than ``model.input_shape``, labels the model has no output for, and data
with no labels at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import check_input_shape
from ..errors import DecomposeError
from ..errors import first_line as _first_line
from ..progress import progress as _progress


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of one evaluation.

    Attributes:
        top1: fraction of samples whose highest logit is the label, in [0, 1].
        top5: fraction whose label is among the ``k`` highest logits, ``k = min(5, outputs)``.
        loss: mean cross-entropy (nats per sample).
        n: samples evaluated.
        k: the ``k`` used for ``top5`` (5 unless the model has fewer outputs).
        seconds: wall time of the evaluation, data loading included.
    """

    top1: float
    top5: float
    loss: float
    n: int
    k: int = 5
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return asdict(self)




def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
             progress: bool = True, desc: str = "eval") -> EvalResult:
    """Top-1/top-5 accuracy and mean cross-entropy of ``model`` over ``loader``.

    Runs under ``torch.inference_mode`` with the model in eval mode (its previous mode is restored
    afterwards). The model is moved to ``device``, as ``model.to`` does, and stays there.

    Args:
        model: a classifier returning logits of shape (N, classes). When it has an
            ``input_shape`` attribute (C, H, W), the images are checked against it first.
        loader: yields ``(images, labels)`` batches, e.g. :func:`decompose.data.make_loader`.
        device: where to run. Default ``"cpu"``.
        progress: show a progress bar on stderr (tqdm when installed; silent inside
            :func:`decompose.progress.quiet_progress`). Default True.
        desc: the progress bar's label. Default ``"eval"``.

    Raises:
        DecomposeError: no samples; unlabeled data; image shape not the model's; a label the
            model has no output for; the model failing on the first batch.
    """
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    was_training = model.training
    model.to(device).eval()
    correct1 = correct5 = n = 0
    loss_sum = 0.0
    k = 5
    start = time.perf_counter()
    bar = _progress(total=total, desc=desc, unit="img", quiet=None if progress else True)
    try:
        with torch.inference_mode():
            for x, y in loader:
                if n == 0:
                    _check_first_batch(model, x, dataset)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = _forward(model, x, first=(n == 0), at=n)
                classes = logits.shape[1]
                if n == 0:
                    _check_class_count(dataset, classes)
                _check_labels(y, classes)
                k = min(5, classes)
                top = logits.topk(k, dim=1).indices
                hit = top == y[:, None]
                correct1 += int(hit[:, 0].sum())
                correct5 += int(hit.any(dim=1).sum())
                loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                n += len(y)
                bar.update(len(y))
    finally:
        bar.close()
        model.train(was_training)
    if n == 0:
        raise DecomposeError("the data holds no samples to evaluate; give a non-empty data set")
    return EvalResult(top1=correct1 / n, top5=correct5 / n, loss=loss_sum / n, n=n, k=k,
                      seconds=time.perf_counter() - start)


def _check_first_batch(model: nn.Module, x: torch.Tensor, dataset: Any) -> None:
    check_input_shape(getattr(model, "input_shape", None), tuple(x.shape[1:]))
    labels = getattr(dataset, "labels", 0)
    if labels is None:
        raise DecomposeError("the data has no labels, so accuracy cannot be measured; give a "
                             "folder of class sub-folders or an .npz with y")


def _forward(model: nn.Module, x: torch.Tensor, first: bool, at: int = 0) -> torch.Tensor:
    """``model(x)``: a failure, logits of the wrong shape or NaN/Inf logits are one-line errors
    (accuracy computed from NaN logits would be a number that means nothing)."""
    try:
        logits = model(x)
    except DecomposeError:
        raise
    except (Exception, SystemExit) as e:
        if first:
            raise DecomposeError(
                f"the model failed on a batch of shape {tuple(x.shape)} ({type(e).__name__}: "
                f"{_first_line(e)}); check that the data's size and channels (resize, crop, "
                "grayscale) match the model") from None
        raise DecomposeError(f"the model failed on the batch of images {at}-{at + len(x) - 1} "
                             f"({type(e).__name__}: {_first_line(e)}); check the model and "
                             "those images") from None
    if first and (not isinstance(logits, torch.Tensor) or logits.ndim != 2):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise DecomposeError(f"the model returned {shape}, not logits of shape (batch, classes); "
                             f"evaluate a classifier")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise DecomposeError("the model returned logits of another shape on a later batch; "
                             "evaluate a classifier")
    if not bool(torch.isfinite(logits).all()):
        bad = "NaN" if bool(torch.isnan(logits).any()) else "Inf"
        raise DecomposeError(f"the model outputs {bad} on the images {at}-{at + len(x) - 1}, so "
                             "its accuracy would be meaningless; check the model's weights and "
                             "the preprocessing (--mean/--std)")
    return logits


def _check_class_count(dataset: Any, classes: int) -> None:
    names = getattr(dataset, "classes", None)
    if names and len(names) > classes:
        raise DecomposeError(
            f"the data has {len(names)} classes but the model has only {classes} outputs; give "
            f"data with the model's {classes} classes (one sub-folder each)")


def _check_labels(y: torch.Tensor, classes: int) -> None:
    if len(y) == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        raise DecomposeError("the data has no labels (label -1), so accuracy cannot be measured; "
                             "give a folder of class sub-folders or an .npz with y")
    if hi >= classes:
        raise DecomposeError(
            f"the data has label {hi} but the model has only {classes} outputs (labels "
            f"0..{classes - 1}); give data whose classes match the model's, e.g. {classes} class "
            f"sub-folders")
