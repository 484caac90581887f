"""Fine-tuning a decomposed model, with the original as teacher: checkpoints, resume, DDP.

    from decompose.recover.finetune import FinetuneConfig, finetune
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
import os
import sys
import time
from typing import Any

import torch
from torch import nn

from ...errors import DecomposeError
from ...measure.evaluate import EvalResult
from . import _checkpoint as ckpt
from ._distributed import distributed_env, init_distributed, resolve_device, shutdown_distributed
from ._train_form import dense_training
from .checks import _check_classes, _check_labels, _dataset_of, _probe, _subset
from .config import RESUME_MAY_CHANGE, FinetuneConfig
from .loop import FOLDED_BN_HINT, _Run, check_outputs, distillation_loss, has_normalization
from .result import FinetuneInterrupted, FinetuneReport, FinetuneResult

__all__ = ["FinetuneConfig", "FinetuneInterrupted", "FinetuneReport", "FinetuneResult",
           "check_outputs", "distillation_loss", "finetune", "finetune_control",
           "shutdown_distributed"]




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

    if (progress and d.main and teacher is not None and has_normalization(teacher)
            and not has_normalization(model)):
        print("note: the model has no normalization layers but its teacher does (were its "
              "BatchNorms folded with --fold-bn?); without them training can diverge: "
              f"{FOLDED_BN_HINT}", file=sys.stderr)
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
            try:
                run.restore(ck)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError,
                    RuntimeError) as e:
                raise DecomposeError(f"checkpoint {cfg.checkpoint} cannot be resumed (its "
                                     f"{type(e).__name__}: {str(e)[:120]}); it is damaged, "
                                     "start over with --force") from None
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
