"""decompose: data-free Network Decoupling of trained PyTorch convolutions.

Public API::

    decompose_(model, config)   # in place; returns a Report
    decompose(model, config)    # on a copy; returns (model, Report)
    plan(model, config)         # dry run; returns a Report
    DecoupleConfig(rank=..., energy=..., target_macs=..., target_params=..., order=...)
    load(path) / load_model(path, arch=..., allow=..., trust=...) / save_model(model, path)
    calibrate_(model, original, batches)              # label-free refit, in place
    compress_(model, config, calibration=batches)     # decompose_, then calibrate_, in place
    finetune(model, train_loader, val_loader, teacher=original, config=FinetuneConfig(...))
"""

from .api import apply_plan, decompose, decompose_, finalize_forms_, plain_forms_, plan
from .config import DecoupleConfig
from .errors import DecomposeError
from .io.files import load, load_model, save_model
from .methods.nd.layers import decouple_conv, is_decoupled
from .pipeline import compress_
from .recover.calibrate import CalibrationReport, calibrate_
from .recover.finetune import FinetuneConfig, FinetuneResult, finetune
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "CalibrationReport",
    "FinetuneConfig",
    "FinetuneResult",
    "calibrate_",
    "compress_",
    "finalize_forms_",
    "finetune",
    "plain_forms_",
    "DecomposeError",
    "DecoupleConfig",
    "Report",
    "apply_plan",
    "decompose",
    "decompose_",
    "decouple_conv",
    "is_decoupled",
    "load",
    "load_model",
    "plan",
    "save_model",
]
