"""decompose: low-rank factorization of trained PyTorch convolutions, with honest reports.

Network Decoupling (depthwise-separable terms, one SVD per channel) is the default method; the
registry in :mod:`decompose.methods` holds every method the planner can use. Public API::

    decompose_(model, config, calibration=None)   # in place: factor (and calibrate); a Report
    plan(model, config)                            # dry run; a Report
    save(model, path, report) / load(path)         # decompose's file format, safe loading
    calibrate_(model, original, batches, CalibrationConfig(...))   # label-free refit, in place
    finetune(model, train_loader, val_loader, teacher=original, config=FinetuneConfig(...))
    DecomposeConfig, CalibrationConfig, FinetuneConfig, Report, DecomposeError
    register_method(MyMethod)                      # add a factorization

Everything else lives in its package: :mod:`decompose.api` (the steps of ``decompose_``),
:mod:`decompose.methods`, :mod:`decompose.planning`, :mod:`decompose.recover`,
:mod:`decompose.measure`, :mod:`decompose.io`, :mod:`decompose.data`, :mod:`decompose.models`.
"""

from .api import decompose_, plan, save
from .config import (
    CalibrationConfig,
    DecomposeConfig,
    DecoupleConfig,  # noqa: F401  (the old name, kept importable)
)
from .errors import DecomposeError
from .io.files import load
from .methods import register as register_method
from .recover.calibrate import calibrate_
from .recover.finetune import FinetuneConfig, finetune
from .report import Report

__version__ = "0.2.0"

__all__ = [
    "CalibrationConfig",
    "DecomposeConfig",
    "DecomposeError",
    "FinetuneConfig",
    "Report",
    "calibrate_",
    "decompose_",
    "finetune",
    "load",
    "plan",
    "register_method",
    "save",
]
