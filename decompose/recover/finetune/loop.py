"""Fine-tuning a decomposed model, with the original as teacher: checkpoints, resume, DDP.

    from decompose.finetune import FinetuneConfig, finetune
    cfg = FinetuneConfig(epochs=5, lr=0.01, kd_weight=0.5, checkpoint="run.ckpt", log="run.jsonl")
    result = finetune(student, train_loader, val_loader, teacher=original, config=cfg,
                      output="student.finetuned.pt")
    result.best.top1, result.before.top1, result.teacher.top1   # fractions in [0, 1]

Per batch: ``loss = (1 - w) * CE(student, y) + w * T^2 * KL(p_teacher || p_student)`` with
``p = softmax(logits / T)`` (Hinton et al. 2015: the teacher's softened distribution is the
target). Per step: SGD with momentum (or AdamW) under a cosine learning-rate schedule with optional
linear warm-up. After every epoch the model is scored on the validation set; the best epoch by
top-1 is written with :func:`decompose.io.files.save_model` (atomic, loadable by the safe loader) and
loaded back into the model at the end.

A checkpoint (``config.checkpoint``) holds the model, optimizer, scheduler, epoch, the batch
reached inside an unfinished epoch, RNG states, config, history and the best weights. It is
replaced atomically after every epoch and when SIGINT/SIGTERM arrives (the loop finishes the
batch, saves, and raises :class:`FinetuneInterrupted`). ``resume=True`` continues from it: from
an epoch boundary the run is the one an uninterrupted run makes (same batches and random draws,
one process, deterministic kernels); from inside an epoch it skips the batches already done.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) the process group is joined (gloo on
CPU, nccl on CUDA), the model is wrapped in DistributedDataParallel, each rank trains on its
DistributedSampler shard (``set_epoch`` every epoch) and scores a strided validation shard whose
sums are all-reduced; only rank 0 writes checkpoints, logs and the model. ``batch_size`` is per
process.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from ...data import check_input_shape
from ...errors import DecomposeError
from ...io.files import check_writable, save_model
from ...measure.evaluate import EvalResult, evaluate
from ...progress import progress as _progress
from . import _checkpoint as ckpt
from ._distributed import (
    Dist,
    EpochSampler,
    Strided,
    all_sum,
    any_rank,
    broadcast_buffers,
    distributed_env,
    init_distributed,
    resolve_device,
    shutdown_distributed,
)
from ._train_form import FORMS as TRAIN_FORMS
from ._train_form import dense_training, strip

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
# One record per epoch; accuracies are fractions in [0, 1], seconds are wall time of the epoch.
LOG_FIELDS = ("epoch", "train_loss", "train_acc", "val_top1", "val_top5", "val_loss", "lr",
              "seconds")
# Settings a resumed run may change; any other difference from the checkpoint's is refused.
RESUME_MAY_CHANGE = frozenset({"epochs", "device", "num_workers", "log", "checkpoint",
                               "train_form"})

__all__ = ["FinetuneConfig", "FinetuneInterrupted", "FinetuneReport", "FinetuneResult",
           "check_outputs", "distillation_loss", "finetune", "finetune_control",
           "shutdown_distributed"]


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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DecomposeError(f"unknown fine-tuning config keys {sorted(unknown)}; known: "
                                 f"{sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------------------------ results
@dataclass
class FinetuneResult:
    """What :func:`finetune` did. Accuracies are fractions in [0, 1] (as in ``EvalResult``).

    ``before``: the model on the validation set before fine-tuning; ``teacher``: the teacher
    there (None without one); ``best``: the best epoch (its weights are in the model and in
    ``output``); ``final``: the last epoch; ``history``: one record per epoch (``LOG_FIELDS``).
    """

    before: EvalResult | None
    teacher: EvalResult | None
    best: EvalResult
    best_epoch: int
    final: EvalResult
    history: list[dict[str, Any]]
    config: dict[str, Any]
    kd_weight: float
    start_epoch: int = 0
    seconds: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    train_images: int = 0
    output: str | None = None
    checkpoint: str | None = None
    log: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _points(a: EvalResult | None, b: EvalResult | None) -> float | None:
    """Top-1 of ``a`` minus top-1 of ``b``, in percentage points."""
    return None if a is None or b is None else round(100 * (a.top1 - b.top1), 3)


@dataclass
class FinetuneReport:
    """What ``decompose finetune`` prints: the original, the decomposed model before and after
    fine-tuning, and the control (the original fine-tuned with the same settings)."""

    student: FinetuneResult
    control: FinetuneResult | None = None

    @property
    def drop_vs_teacher(self) -> float | None:
        """Original's top-1 minus the fine-tuned student's, in points."""
        return _points(self.student.teacher, self.student.best)

    @property
    def drop_vs_control(self) -> float | None:
        """Control's top-1 minus the fine-tuned student's, in points."""
        return _points(self.control.best if self.control else None, self.student.best)

    def to_dict(self) -> dict[str, Any]:
        s, c = self.student, self.control

        def sc(x: EvalResult | None) -> dict[str, Any] | None:
            return None if x is None else x.to_dict()
        return {
            "teacher": sc(s.teacher), "before": sc(s.before), "after": sc(s.best),
            "after_last_epoch": sc(s.final),
            "control": sc(c.best) if c else None,
            "control_last_epoch": sc(c.final) if c else None,
            "drop_vs_teacher_points": self.drop_vs_teacher,
            "drop_vs_control_points": self.drop_vs_control,
            "best_epoch": s.best_epoch, "control_best_epoch": c.best_epoch if c else None,
            "epochs": s.config["epochs"], "kd_weight": s.kd_weight,
            "train_images": s.train_images, "val_images": s.best.n,
            "world_size": s.world_size, "device": s.device,
            "seconds": round(s.seconds + (c.seconds if c else 0.0), 1),
            "output": s.output, "checkpoint": s.checkpoint, "log": s.log,
            "control_checkpoint": c.checkpoint if c else None,
            "config": s.config, "history": s.history,
            "control_history": c.history if c else None,
        }

    def __str__(self) -> str:
        s, c = self.student, self.control
        rows = []
        if s.teacher is not None:
            rows.append(("original (teacher)", s.teacher))
        if s.before is not None:
            rows.append(("decomposed, before fine-tuning", s.before))
        rows.append((f"decomposed, fine-tuned (epoch {s.best_epoch})", s.best))
        if c is not None:
            rows.append((f"original, fine-tuned (control, epoch {c.best_epoch})", c.best))
        width = max(len(r[0]) for r in rows)
        lines = [f"{'model':<{width}}  {'top-1':>6}  {'top-5':>6}",
                 *(f"{name:<{width}}  {100 * r.top1:6.2f}  {100 * r.top5:6.2f}"
                   for name, r in rows)]
        if self.drop_vs_control is not None:
            lines.append(f"top-1 below the control: {self.drop_vs_control:.2f} points")
        if self.drop_vs_teacher is not None:
            lines.append(f"top-1 below the original: {self.drop_vs_teacher:.2f} points")
        lines.append(f"{s.config['epochs']} epochs on {s.train_images} images, scored on "
                     f"{s.best.n}; kd_weight {s.kd_weight}, {s.device} x{s.world_size}, "
                     f"{s.seconds + (c.seconds if c else 0):.0f} s")
        return "\n".join(lines)


class FinetuneInterrupted(DecomposeError):
    """SIGINT/SIGTERM stopped fine-tuning; the checkpoint was saved first."""

    def __init__(self, message: str, signal_name: str, checkpoint: str | None) -> None:
        super().__init__(message)
        self.signal_name = signal_name
        self.checkpoint = checkpoint


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:150] if text else type(e).__name__


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


# ------------------------------------------------------------------------------------ pieces
def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _lr_factor(cfg: FinetuneConfig, steps_per_epoch: int):
    """Step -> multiplier of ``lr``: linear warm-up, then cosine down to ``min_lr`` (or flat)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        p = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return factor


def _optimizer(model: nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DecomposeError("the model has no trainable parameters; set requires_grad=True on "
                             "the layers to fine-tune")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _score(d: dict[str, Any] | None) -> EvalResult | None:
    return None if d is None else EvalResult(**d)


def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device, d: Dist, show: bool,
              desc: str) -> EvalResult:
    """:func:`decompose.measure.evaluate.evaluate` on this rank's shard, sums all-reduced over ranks."""
    r = evaluate(model, loader, device=device, progress=show, desc=desc)
    if not d.on:
        return r
    c1, c5, loss, n, secs = all_sum([r.top1 * r.n, r.top5 * r.n, r.loss * r.n, float(r.n),
                                     r.seconds], d, device)
    return EvalResult(top1=c1 / n, top5=c5 / n, loss=loss / n, n=int(round(n)), k=r.k,
                      seconds=secs / d.world)


def check_outputs(output: str | os.PathLike | None, config: FinetuneConfig, *,
                  force: bool = False, resume: bool = False) -> None:
    """Fail before any work: an existing output without ``force``, a checkpoint of an earlier run
    without ``resume`` or ``force``, nothing to resume. A resumed run may replace its own output."""
    own_output = None
    if resume:
        if config.checkpoint is None:
            raise DecomposeError("resuming needs the checkpoint; give --checkpoint PATH")
        own_output = ckpt.read_checkpoint(config.checkpoint).get("output")
    if output is not None:
        mine = own_output is not None and Path(own_output).resolve() == Path(output).resolve()
        check_writable(output, force=force or mine)
    if not resume and config.checkpoint is not None and Path(config.checkpoint).exists() \
            and not force:
        raise DecomposeError(f"checkpoint {config.checkpoint} exists from an earlier run; pass "
                             "--resume to continue it or --force to start over")
    for path in (config.checkpoint, config.log):
        if path is not None:
            check_writable(path, force=True)


# ------------------------------------------------------------------------------------ the loop
class _Run:
    """One fine-tuning run: the model, its optimizer and schedule, and where it has got to."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, cfg: FinetuneConfig,
                 kd_weight: float, d: Dist, device: torch.device, train_ds: Dataset,
                 val_ds: Dataset, train_template: Any, val_template: Any,
                 output: str | None, output_meta: dict[str, Any] | None, show: bool) -> None:
        self.model, self.teacher, self.cfg, self.w = model, teacher, cfg, kd_weight
        self.d, self.device, self.show = d, device, show
        self.output, self.output_meta = output, dict(output_meta or {})
        self.sampler = EpochSampler(train_ds, d, cfg.seed)
        self.train = _loader(train_ds, train_template, cfg.batch_size, self.sampler,
                             cfg.num_workers, device)
        self.val = _loader(val_ds, val_template, cfg.batch_size, Strided(len(val_ds), d),
                           cfg.num_workers, device)
        self.steps = math.ceil(self.sampler.num_samples / cfg.batch_size)
        self.optimizer = _optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           _lr_factor(cfg, self.steps))
        self.net = model
        if d.on:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        # where the run has got to
        self.epoch = 0          # epochs finished
        self.step = 0           # batches finished inside epoch `epoch` (0 at a boundary)
        self.partial = [0.0, 0.0, 0.0, 0.0]  # that epoch's loss*n, correct, n, seconds so far
        self.history: list[dict[str, Any]] = []
        self.best_top1, self.best_epoch = -1.0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.before: EvalResult | None = None
        self.teacher_score: EvalResult | None = None

    # ---- starting points
    def start(self, before: EvalResult | None, teacher_score: EvalResult | None) -> None:
        ckpt.seed_everything(self.cfg.seed + self.d.rank)
        self.before = before or _evaluate(self.model, self.val, self.device, self.d, self.show,
                                          "val (before)")
        if self.teacher is not None:
            self.teacher_score = teacher_score or _evaluate(
                self.teacher, self.val, self.device, self.d, self.show, "val (teacher)")

    def restore(self, ck: dict[str, Any]) -> None:
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.epoch, self.step, self.partial = int(ck["epoch"]), int(ck["step"]), list(ck["partial"])
        if int(ck["world_size"]) != self.d.world:  # shards moved: redo the epoch, re-place lr
            self.step, self.partial = 0, [0.0, 0.0, 0.0, 0.0]
            self.scheduler.last_epoch = self.epoch * self.steps
            for g, lam, base in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas,
                                    self.scheduler.base_lrs):
                g["lr"] = base * lam(self.scheduler.last_epoch)
        self.history = list(ck["history"])
        self.best_top1, self.best_epoch = float(ck["best_top1"]), int(ck["best_epoch"])
        self.best_state = ck["best_state"]
        self.before, self.teacher_score = _score(ck["before"]), _score(ck["teacher"])
        if self.d.main:
            ckpt.set_rng_state(ck["rng"])
        else:  # only rank 0's generators are saved
            ckpt.seed_everything(self.cfg.seed + self.d.rank + 7919 * (self.epoch + 1) + self.step)
        if self.d.main and self.cfg.log:
            ckpt.write_log(self.cfg.log, self.history, LOG_FIELDS)  # the checkpoint's history wins
        if self.show:
            at = f", batch {self.step + 1}" if self.step else ""
            print(f"resuming {self.cfg.checkpoint} at epoch {self.epoch + 1}{at}", file=sys.stderr)

    # ---- files (rank 0)
    def save_checkpoint(self) -> None:
        if not (self.d.main and self.cfg.checkpoint):
            return
        ckpt.write_checkpoint(self.cfg.checkpoint, {
            "epoch": self.epoch, "step": self.step, "partial": list(self.partial),
            "world_size": self.d.world,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(), "config": self.cfg.to_dict(), "history": self.history,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "before": self.before.to_dict() if self.before else None,
            "teacher": self.teacher_score.to_dict() if self.teacher_score else None,
            "output": self.output,
        })

    def write_best(self) -> None:
        if not (self.d.main and self.output is not None and self.best_state is not None):
            return
        best = strip(copy.deepcopy(self.model)).cpu().eval()
        best.load_state_dict(self.best_state)
        meta = dict(self.output_meta)
        meta["finetune"] = {
            "config": self.cfg.to_dict(), "kd_weight": self.w, "best_epoch": self.best_epoch,
            "epoch_record": self.history[self.best_epoch - 1],
            "before": self.before.to_dict() if self.before else None,
            "teacher": self.teacher_score.to_dict() if self.teacher_score else None}
        save_model(best, self.output, meta, force=True)

    # ---- the loop
    def run(self, stop: ckpt.StopFlag) -> None:
        for epoch in range(self.epoch, self.cfg.epochs):
            self.train_epoch(epoch, stop)
            self.end_epoch(epoch)
            if any_rank(stop.signal_name is not None, self.d, self.device) \
                    and epoch + 1 < self.cfg.epochs:
                self.stopped(stop)

    def train_epoch(self, epoch: int, stop: ckpt.StopFlag) -> None:
        cfg, device = self.cfg, self.device
        if epoch != self.epoch or self.step == 0:
            self.step, self.partial = 0, [0.0, 0.0, 0.0, 0.0]
        self.sampler.set_epoch(epoch)
        self.sampler.skip = self.step * cfg.batch_size
        sums = self.partial
        t0 = time.time() - sums[3]
        self.net.train()
        bar = _progress(total=self.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                        quiet=None if self.show else True)
        bar.update(self.step)
        try:
            for x, y in self.train:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                out = self.net(x)
                loss = F.cross_entropy(out, y)
                if self.w > 0:
                    with torch.no_grad():
                        t_out = self.teacher(x)
                    loss = (1 - self.w) * loss + self.w * distillation_loss(out, t_out,
                                                                            cfg.temperature)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                n = y.numel()
                sums[0] += loss.item() * n
                sums[1] += (out.argmax(1) == y).sum().item()
                sums[2] += n
                bar.update(1)
                bar.set_postfix_str(f"loss {sums[0] / sums[2]:.3f} acc {sums[1] / sums[2]:.3f}")
                if any_rank(stop.signal_name is not None, self.d, device) \
                        and self.step < self.steps:
                    self.epoch, sums[3] = epoch, time.time() - t0
                    bar.close()
                    self.save_checkpoint()
                    self.stopped(stop)
        finally:
            bar.close()
        sums[3] = time.time() - t0

    def end_epoch(self, epoch: int) -> None:
        broadcast_buffers(self.model, self.d)  # score and save rank 0's BN statistics
        loss, correct, n = all_sum(self.partial[:3], self.d, self.device)
        score = _evaluate(self.model, self.val, self.device, self.d, self.show, "val")
        record = {"epoch": epoch + 1, "train_loss": round(loss / max(n, 1), 6),
                  "train_acc": round(correct / max(n, 1), 6), "val_top1": score.top1,
                  "val_top5": score.top5, "val_loss": score.loss,
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "seconds": round(self.partial[3] + score.seconds, 2),
                  "val": score.to_dict()}
        self.history.append(record)
        improved = score.top1 > self.best_top1
        if improved:
            self.best_top1, self.best_epoch = score.top1, epoch + 1
            self.best_state = {k: v.detach().cpu().clone()
                               for k, v in self.model.state_dict().items()}
        self.epoch, self.step, self.partial = epoch + 1, 0, [0.0, 0.0, 0.0, 0.0]
        self.save_checkpoint()  # first the checkpoint, then what it vouches for
        if improved:
            self.write_best()
        if self.d.main and self.cfg.log:
            ckpt.write_log(self.cfg.log, self.history, LOG_FIELDS)
        if self.show:
            print(f"epoch {epoch + 1}/{self.cfg.epochs}  loss {record['train_loss']:.4f}  "
                  f"acc {100 * record['train_acc']:.2f}  val top-1 {100 * score.top1:.2f}  "
                  f"top-5 {100 * score.top5:.2f}  lr {record['lr']:.2e}  "
                  f"{record['seconds']:.0f}s", file=sys.stderr)

    def stopped(self, stop: ckpt.StopFlag) -> None:
        if self.d.on:  # rank 0 has saved before any rank exits (torchrun stops the rest)
            torch.distributed.barrier()
        name = stop.signal_name or "a signal on another rank"
        where = (f"epoch {self.epoch + 1}, batch {self.step}/{self.steps}" if self.step
                 else f"the end of epoch {self.epoch}")
        raise FinetuneInterrupted(
            f"stopped by {name} at {where}; checkpoint saved to {self.cfg.checkpoint}; run the "
            "same command with --resume to continue", name, self.cfg.checkpoint)

    def result(self, seconds: float, start_epoch: int, train_images: int) -> FinetuneResult:
        if not self.history:
            raise DecomposeError("no epoch finished; nothing to report")  # pragma: no cover
        best = _score(self.history[self.best_epoch - 1]["val"])
        return FinetuneResult(
            before=self.before, teacher=self.teacher_score, best=best, best_epoch=self.best_epoch,
            final=_score(self.history[-1]["val"]), history=self.history,
            config=self.cfg.to_dict(), kd_weight=self.w, start_epoch=start_epoch,
            seconds=round(seconds, 2), world_size=self.d.world, device=str(self.device),
            train_images=train_images, output=self.output, checkpoint=self.cfg.checkpoint,
            log=self.cfg.log)


def finetune(model: nn.Module, train_loader: Any, val_loader: Any, *,
             teacher: nn.Module | None = None, config: FinetuneConfig | None = None,
             output: str | os.PathLike | None = None, output_meta: dict[str, Any] | None = None,
             force: bool = False, resume: bool = False, progress: bool = True,
             teacher_score: EvalResult | None = None, before_score: EvalResult | None = None,
             **overrides: Any) -> FinetuneResult:
    """Fine-tune ``model`` in place, distilling from ``teacher`` when given (see module docs).

    Args:
        model: the (decomposed) classifier; trained in place on ``config.device`` and left
            holding the best epoch's weights.
        train_loader: a DataLoader (or map-style Dataset) of (image, label) pairs. Its dataset
            and collate function are used; batch size, shuffling (seeded per epoch), sharding
            and the ``limit`` subset come from the config. Augmentation is the dataset's, e.g.
            ``decompose.data.make_loader(path, train=True)``.
        val_loader: the same for validation (in order; ``val_limit``).
        teacher: the original model: scored on the validation set and, when the effective
            ``kd_weight`` is positive, distilled from. Kept in eval mode, never changed.
        config: a :class:`FinetuneConfig`; keyword ``overrides`` (``epochs=3``) amend it.
        output: write the best model here (``save_model``, atomic) whenever it improves.
        output_meta: JSON-like metadata saved with it (a ``"finetune"`` entry is added).
        force: replace an existing ``output``, or a checkpoint of an earlier run.
        resume: continue from ``config.checkpoint``.
        progress: progress bars and one line per epoch on stderr (rank 0 only).
        teacher_score, before_score: validation scores already known, to skip scoring again.

    Returns:
        a :class:`FinetuneResult`.

    Raises:
        DecomposeError: bad data, labels, teacher, checkpoint or settings (a one-line message).
        FinetuneInterrupted: SIGINT/SIGTERM arrived; the checkpoint was saved first.
    """
    cfg = config or FinetuneConfig()
    if overrides:
        cfg = FinetuneConfig.from_dict({**cfg.to_dict(), **overrides})
    w = cfg.kd_weight_for(teacher is not None)
    if w > 0 and teacher is None:
        raise DecomposeError("kd_weight > 0 needs a teacher; pass --teacher ORIGINAL or "
                             "--kd-weight 0")
    d = distributed_env()
    device = resolve_device(cfg.device, d)
    check_outputs(output, cfg, force=force, resume=resume)  # every rank, before any joins
    init_distributed(d, device)

    train_ds = _subset(_dataset_of(train_loader, "training"), cfg.limit, cfg.seed)
    val_ds = _subset(_dataset_of(val_loader, "validation"), cfg.val_limit, cfg.seed + 1)
    _check_labels(train_ds, "training")
    _check_labels(val_ds, "validation")
    _check_classes(train_ds, val_ds)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    _probe(model, teacher, train_ds, device)
    ck = ckpt.read_checkpoint(cfg.checkpoint) if resume else None
    if ck is not None:
        ckpt.check_same_model(model, ck["model"], cfg.checkpoint)
        ckpt.check_same_settings(cfg.to_dict(), ck["config"], RESUME_MAY_CHANGE, cfg.checkpoint)

    run = _Run(model, teacher, cfg, w, d, device, train_ds, val_ds, train_loader, val_loader,
               None if output is None else str(output), output_meta, progress and d.main)
    t0 = time.time()
    with dense_training(model, cfg.train_form, device) as n_dense:
        if n_dense and run.show:
            print(f"{n_dense} decoupled layers compute as composed dense convs while training "
                  f"(train_form={cfg.train_form}); the saved model stays decoupled",
                  file=sys.stderr)
        if ck is None:
            run.start(before_score, teacher_score)
        else:
            run.restore(ck)
            del ck
        start_epoch = run.epoch
        with ckpt.StopFlag(active=cfg.checkpoint is not None) as stop:
            run.run(stop)
    if d.on:
        torch.distributed.barrier()
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    run.write_best()  # again at the end, so the file always matches the final checkpoint
    return run.result(time.time() - t0, start_epoch, len(train_ds))


def finetune_control(teacher: nn.Module, train_loader: Any, val_loader: Any, *,
                     config: FinetuneConfig, teacher_score: EvalResult | None = None,
                     resume: bool = False, force: bool = False, progress: bool = True
                     ) -> FinetuneResult:
    """Fine-tune a copy of the original with the same settings, the original as its teacher.

    The fair reference when the fine-tuning data differs from the original's training data (the
    shared CIFAR JPEGs): the decomposed model's drop is measured against this, not against the
    original as trained. ``config.checkpoint`` and ``config.log`` must differ from the student
    run's. Nothing is written besides them; the result's model is discarded.
    """
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    return finetune(student, train_loader, val_loader, teacher=teacher, config=config,
                    resume=resume, force=force, progress=progress, teacher_score=teacher_score,
                    before_score=teacher_score)
