"""The fine-tuning settings: one frozen dataclass, validated, round-trips through JSON."""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ...config import read_fields, versioned
from ...errors import DecomposeError
from ._train_form import FORMS as TRAIN_FORMS

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
# One record per epoch; accuracies are fractions in [0, 1], seconds are wall time of the epoch.
LOG_FIELDS = ("epoch", "train_loss", "train_acc", "val_top1", "val_top5", "val_loss", "lr",
              "seconds")
# Settings a resumed run may change; any other difference from the checkpoint's is refused.
RESUME_MAY_CHANGE = frozenset({"epochs", "device", "num_workers", "log", "checkpoint",
                               "train_form"})



# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Validated on creation; round-trips through :meth:`to_dict`.

    Args:
        epochs: passes over the training set (integer >= 1). Default 10.
        lr: peak learning rate (> 0). Default 0.01 (suits SGD; try 1e-3 with AdamW).
        optimizer: ``"sgd"`` (with momentum) or ``"adamw"``. Default ``"sgd"``.
        momentum: SGD momentum in [0, 1). Default 0.9.
        nesterov: Nesterov momentum for SGD. Default False.
        weight_decay: >= 0. Default 5e-4.
        schedule: ``"cosine"`` (per step, from ``lr`` to ``min_lr``) or ``"constant"``.
            Default ``"cosine"``.
        warmup_epochs: linear warm-up from 0 over this many epochs (>= 0, may be fractional,
            less than ``epochs``). Default 0.
        min_lr: the cosine schedule's final learning rate (0 <= min_lr <= lr). Default 0.
        kd_weight: weight w of the distillation term, 0 <= w <= 1. Default None: 0.5 when a
            teacher is given, else 0. A positive weight needs a teacher.
        temperature: softening temperature T (> 0). Default 4.
        batch_size: images per step per process (integer >= 1). Default 128.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``. Default ``"auto"``.
        seed: seeds shuffling, augmentation and the subset picked by ``limit``. Default 0.
        limit: train on a random subset of this many images (seeded). Default None: all.
        val_limit: validate on a random subset of this many images. Default None: all.
        num_workers: data-loading worker processes (>= 0). Default 0.
        log: per-epoch log file: JSON lines, or CSV when the name ends in ``.csv``. Default None.
        checkpoint: checkpoint file, written every epoch and on SIGINT/SIGTERM. Default None.
        train_form: how decoupled layers compute while fine-tuning: ``"plain"`` (conv_dw then
            conv_pw), ``"dense"`` (one conv with the kernel composed from the two weights on
            every call: the same parameters and function, at the speed of the original conv)
            or ``"auto"`` (dense on CPU for rank >= 2, where grouped convs are slow). The
            saved model is always the decoupled one. Default ``"auto"``.
    """

    epochs: int = 10
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    kd_weight: float | None = None
    temperature: float = 4.0
    batch_size: int = 128
    device: str = "auto"
    seed: int = 0
    limit: int | None = None
    val_limit: int | None = None
    num_workers: int = 0
    log: str | None = None
    checkpoint: str | None = None
    train_form: str = "auto"

    VERSION = 1

    def __post_init__(self) -> None:
        def integer(name: str, low: int, example: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                flag = "--" + name.replace("_", "-")
                raise DecomposeError(f"{name} must be an integer >= {low}, got {v!r}; "
                                     f"e.g. {flag} {example}")

        def number(name: str, ok: Any, rule: str, example: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not ok(v):
                flag = "--" + name.replace("_", "-")
                raise DecomposeError(f"{name} must be {rule}, got {v!r}; e.g. {flag} {example}")

        integer("epochs", 1, "5")
        integer("batch_size", 1, "128")
        integer("seed", 0, "0")
        if self.seed >= 2**32:
            raise DecomposeError(f"seed must be below 2**32 = {2**32}, got {self.seed}; e.g. "
                                 "--seed 0")
        integer("num_workers", 0, "2")
        integer("limit", 1, "5000", optional=True)
        integer("val_limit", 1, "1000", optional=True)
        number("lr", lambda v: v > 0, "> 0", "0.01")
        number("momentum", lambda v: 0 <= v < 1, "in [0, 1)", "0.9")
        number("weight_decay", lambda v: v >= 0, ">= 0", "5e-4")
        number("warmup_epochs", lambda v: 0 <= v < self.epochs, f"in [0, epochs={self.epochs})",
               "1")
        number("min_lr", lambda v: 0 <= v <= self.lr, f"in [0, lr={self.lr}]", "0")
        number("temperature", lambda v: v > 0, "> 0", "4")
        if self.kd_weight is not None:
            number("kd_weight", lambda v: 0 <= v <= 1, "in [0, 1]", "0.5")
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("device", DEVICES), ("train_form", TRAIN_FORMS)):
            if getattr(self, name) not in choices:
                raise DecomposeError(f"{name} must be one of {', '.join(choices)}, got "
                                     f"{getattr(self, name)!r}")
        if not isinstance(self.nesterov, bool):
            raise DecomposeError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise DecomposeError("nesterov needs optimizer 'sgd' with momentum > 0; drop "
                                 "--nesterov or set --momentum 0.9")
        for name in ("log", "checkpoint"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, str(v))

    def kd_weight_for(self, has_teacher: bool) -> float:
        """The distillation weight in effect: ``kd_weight``, or its default (0.5 / 0)."""
        if self.kd_weight is None:
            return 0.5 if has_teacher else 0.0
        return float(self.kd_weight)

    def to_dict(self) -> dict[str, Any]:
        return versioned(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        return cls(**read_fields(cls, d, "fine-tuning config"))


