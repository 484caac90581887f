"""One call from a trained model to its decoupled (and optionally calibrated) form.

    import decompose
    from decompose.data import calibration_batches
    original = copy.deepcopy(model)                      # only if you want to measure it later
    report = decompose.compress_(model, decompose.DecoupleConfig(rank=2, form="auto"),
                                 calibration=calibration_batches("train/", n_samples=512),
                                 original=original)
    report.extra["calibration"]                         # what the refit did, per layer

The command line (``decompose MODEL ... --calibrate DIR``, ``decompose sweep ... --calibrate
DIR``) and scripts share this function, so both run the same chain: decouple, put the layers in
the plain form, refit them to the original's outputs, then convert them to the forms the plan
chose.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import api
from .config import DecoupleConfig
from .report import Report

#: images the output-error allocation measures on (the first of the calibration images)
ALLOCATION_SAMPLES = 128


def compress_(model: nn.Module, config: DecoupleConfig | None = None, *,
              calibration: Iterable[Any] | None = None, calib_samples: int = 512,
              refit_depthwise: bool = True, original: nn.Module | None = None,
              meta: dict | None = None, progress: bool = True, timer: Any = None,
              latency_fn: Any = None, allocation_samples: int = ALLOCATION_SAMPLES,
              error_curves: dict | None = None) -> Report:
    """Decouple ``model`` in place with ``config`` and, given calibration images, refit the
    decoupled layers to the original's layer outputs (no labels); return the report.

    Without ``calibration`` this is :func:`decompose.decompose_`. With it, and when at least
    one layer was decoupled: :func:`decompose.plain_forms_`, :func:`decompose.calibrate_`
    against the original, ``report.extra["calibration"]`` set to the calibration report's
    dict, then :func:`decompose.finalize_forms_` (the forms the plan chose, exactly).

    Args:
        model: changed in place.
        config: as for :func:`decompose.decompose_` (default: rank 1).
        calibration: unlabeled input batches (tensors or ``(inputs, labels)`` pairs), e.g.
            :func:`decompose.data.calibration_batches`; None skips calibration.
        calib_samples: use at most this many images. Default 512.
        refit_depthwise: True fits both convs of each layer (``--calib-method joint``); False
            only the conv that produces the output (``last``). Default True.
        original: the untouched model ``model`` was before this call, to calibrate against.
            Default: a deep copy taken before decoupling, when calibrating (pass your own copy
            when you also need it afterwards, e.g. to measure the speed-up).
        meta: what the model's file recorded (for the input shape).
        progress: show the calibration progress bar on stderr. Default True.
        timer, latency_fn: the planner's clock, as in :func:`decompose.plan` (tests).
        allocation_samples: with ``config.allocation == "output"``, the budget's output errors
            are measured on the first this many calibration images
            (:func:`decompose.planning.sensitivity.output_error_curves`). Default 128.
        error_curves: those output errors, already measured by :func:`measure_curves` on
            ``original`` with the same ``fold_bn``, ``include`` and ``exclude`` (a sweep
            measures them once for all its settings); None measures them here when needed.
    """
    config = config or DecoupleConfig()
    if calibration is not None and original is None:
        original = copy.deepcopy(model)
    curves = None
    measured_on = min(allocation_samples, calib_samples)
    if config.allocation == "output" and calibration is not None:  # original is set here
        calibration = reusable_batches(calibration, calib_samples)
        curves = (error_curves if error_curves is not None else
                  measure_curves(original, config, calibration, measured_on))
    report = api.decompose_(model, config, meta=meta, timer=timer, latency_fn=latency_fn,
                            error_curves=curves)
    if curves is not None:
        report.extra["allocation"] = {"errors": "relative output error", "images": measured_on}
    if calibration is None or not report.decomposed:
        return report
    from .recover.calibrate import calibrate_
    api.plain_forms_(model)  # calibration fits the plain form ...
    cal = calibrate_(model, original, calibration, samples=calib_samples,
                     refit_depthwise=refit_depthwise, progress=progress)
    report.extra["calibration"] = cal.to_dict()
    api.finalize_forms_(model, report)  # ... then the chosen forms (exact)
    return report


def reusable_batches(batches: Any, samples: int) -> Any:
    """Calibration batches that can be read again (each sweep setting, or the output-error
    allocation and then the calibration): a one-shot iterator (e.g.
    :func:`decompose.data.calibration_batches`) is read once, its first ``samples`` images kept;
    anything re-iterable (a list, a DataLoader, a tensor) is returned as it is."""
    if batches is None or not isinstance(batches, Iterable) or iter(batches) is not batches:
        return batches
    kept: list[Any] = []
    n = 0
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) and b else b
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            x = x[: samples - n]
            n += len(x)
        kept.append(x)
        if n >= samples:
            break
    return kept


def measure_curves(original: nn.Module, config: DecoupleConfig, batches: list[Any],
                   samples: int) -> dict:
    """Output-error curves of ``original`` for ``config``'s layers, on its folded kernels when
    ``config.fold_bn`` (what the plan decouples); they depend on nothing else in ``config``."""
    from .planning.sensitivity import output_error_curves
    model = original
    if config.fold_bn:  # the plan decouples the folded kernels: measure those
        from .engine.fold import fold_batchnorm_
        model = copy.deepcopy(original)
        fold_batchnorm_(model)
    return output_error_curves(model, batches, config=config, samples=samples)


__all__ = ["ALLOCATION_SAMPLES", "compress_", "measure_curves", "reusable_batches"]
