"""What a fine-tuning run reports: the result of one run, and the student-vs-control report."""


from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...errors import DecomposeError
from ...measure.evaluate import EvalResult


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


