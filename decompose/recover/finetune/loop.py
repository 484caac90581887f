"""The training loop: optimizer, schedule, distillation loss, evaluation per epoch, checkpoints."""


from __future__ import annotations

import copy
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...errors import DecomposeError
from ...io.files import check_writable, save_model
from ...io.write import check_target
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
)
from ._train_form import strip
from .checks import _loader
from .config import LOG_FIELDS, FinetuneConfig
from .result import FinetuneInterrupted, FinetuneResult

# ------------------------------------------------------------------------------------ pieces
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
#: what to do about a model trained without its (folded) BatchNorms; said up front and on NaN
FOLDED_BN_HINT = ("fine-tune the model decomposed without --fold-bn and fold afterwards "
                  "(decompose.engine.fold.fold_bn_)")


def has_normalization(model: nn.Module) -> bool:
    """Whether ``model`` has a normalization layer (BatchNorm, InstanceNorm, GroupNorm,
    LayerNorm): without one a deep net folded for inference (``--fold-bn``) easily diverges
    under SGD (measured: ResNet-56 folded, lr 0.002 and 0.01, NaN within 5 steps)."""
    return any(isinstance(m, _NORMS) for m in model.modules())


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
    """Fail before any work: an existing output, checkpoint or log without ``force`` (a resumed
    run may replace its own), two of them naming the same file, one of them naming an input of
    the command (:func:`decompose.io.write.protect_inputs`, refused even with ``force``), a
    checkpoint of an earlier run without ``resume`` or ``force``, nothing to resume."""
    own_output = None
    if resume:
        if config.checkpoint is None:
            raise DecomposeError("resuming needs the checkpoint; give --checkpoint PATH")
        own_output = ckpt.read_checkpoint(config.checkpoint).get("output")
    named = [(what, p) for what, p in (("output", output), ("checkpoint", config.checkpoint),
                                       ("log", config.log)) if p is not None]
    for i, (what, p) in enumerate(named):
        for other, q in named[:i]:
            if os.path.realpath(p) == os.path.realpath(q):
                raise DecomposeError(f"the {other} and the {what} are the same file ({p}); give "
                                     "them different names")
    if output is not None:
        mine = isinstance(own_output, str) and \
            os.path.realpath(own_output) == os.path.realpath(output)
        check_writable(output, force=force or mine)
    if not resume and config.checkpoint is not None and os.path.lexists(config.checkpoint) \
            and not force:
        raise DecomposeError(f"checkpoint {config.checkpoint} exists from an earlier run; pass "
                             "--resume to continue it or --force to start over")
    if config.checkpoint is not None:
        check_target(config.checkpoint, force=True, what="checkpoint")
    if config.log is not None:
        check_target(config.log, force=force or resume, what="log")


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
                value = loss.item()
                if not math.isfinite(value):
                    why = ("" if has_normalization(self.net) else "; it has no normalization "
                           f"layers: if its BatchNorms were folded (--fold-bn), {FOLDED_BN_HINT}")
                    raise DecomposeError(
                        f"the training loss became {value} at epoch {epoch + 1}, batch "
                        f"{self.step + 1}; lower --lr (now {cfg.lr:g}), or check the data and "
                        f"the model for NaN/Inf (the last checkpoint is intact){why}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                n = y.numel()
                sums[0] += value * n
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


