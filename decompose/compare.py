"""``decompose compare``: every method at every budget, data-free and calibrated, one table.

    from decompose.compare import compare
    res = compare(model, ["nd", "cp", "auto"], [0.5, 0.25], batches=test, calibration=train)
    print(res)             # method, MACs, params, kernel error, top-1 before/after calibration,
                           # measured speed-up, seconds
    res.to_csv("compare.csv")

Each (method, MACs target) is one :class:`decompose.DecomposeConfig` run through the sweep
(:func:`decompose.sweep.sweep` with ``datafree=True``): factor a copy of the model, score it,
calibrate it on the unlabeled images, score it again, time it against the original. Kernel
errors are not comparable across methods (docs/methods.md), so the accuracy columns are the
ones to read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from . import methods as registry
from .config import CalibrationConfig, DecomposeConfig
from .errors import DecomposeError
from .sweep import SweepResult, sweep


class CompareResult(SweepResult):
    """The rows of a comparison (the sweep's columns; ``method`` and ``value`` name the
    setting) and the original's figures."""

    def __str__(self) -> str:
        return render_compare(self)


def compare_configs(methods: Sequence[str], targets: Sequence[float], **common: Any
                    ) -> list[DecomposeConfig]:
    """One config per (method, MACs target), methods outermost. ``methods`` are registered
    names, ``"auto"`` or comma lists; ``common``: the other config fields."""
    if not methods:
        raise DecomposeError("no method to compare; give e.g. --methods nd,cp,auto")
    if not targets:
        raise DecomposeError("no budget to compare at; give e.g. --targets 0.5,0.25")
    for m in methods:
        registry.resolve(m)  # a bad name: the registry's message, listing the names
    return [DecomposeConfig(method=m, target_macs=t, **common) for m in methods for t in targets]


def compare(model: nn.Module, methods: Sequence[str], targets: Sequence[float], *,
            batches: Sequence[Any] | None = None, calibration: Iterable[Any] | None = None,
            calibration_config: CalibrationConfig | None = None, meta: dict | None = None,
            latency: bool = True, latency_batch: int = 1, repeats: int = 20,
            threads: int | None = None, quiet: bool | None = None, timer: Any = None,
            latency_fn: Any = None, fields: dict[str, Any] | None = None) -> CompareResult:
    """Factor a copy of ``model`` with every method at every MACs target and measure each.

    Args:
        model: the original (unchanged).
        methods: registered method names, ``"auto"``, or comma lists.
        targets: fractions of the factorizable layers' multiply-adds (``target_macs``).
        batches: labelled batches in memory for top-1 (None: no accuracy columns).
        calibration: unlabeled batches; every row is then scored before and after calibration.
        calibration_config, meta, latency, latency_batch, repeats, threads, quiet, timer,
            latency_fn: as in :func:`decompose.sweep.sweep`.
        fields: other :class:`DecomposeConfig` fields for every row (``exclude``,
            ``input_shape``, ``fold_bn``, ``form``, ``channels_last``, ``seed``, ...).
    """
    configs = compare_configs(methods, targets, **(fields or {}))
    res = sweep(model, configs, batches=batches, meta=meta, latency=latency,
                latency_batch=latency_batch, repeats=repeats, threads=threads,
                calibration=calibration, calibration_config=calibration_config, timer=timer,
                latency_fn=latency_fn, datafree=True, quiet=quiet)
    return CompareResult(res.rows, res.baseline, res.latency, res.input_shape)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_compare(res: SweepResult) -> str:
    """The comparison table, with what every column means below it."""
    calibrated = any(r.get("calibrated") for r in res.rows)
    head = ["method", "MACs", "MACs x", "params x", "kern.err"]
    head += (["top-1 data-free", "top-1 calibrated", "drop"] if calibrated else ["top-1", "drop"])
    head += ["speed-up", "seconds"] + (["calib s"] if calibrated else [])
    rows = []
    for r in res.rows:
        row = [r["method"], _f(r["value"], "g"), _f(r["macs_ratio"], ".3f"),
               _f(r["params_ratio"], ".3f"), _f(r["mean_kernel_error"], ".4f")]
        if calibrated:
            row += [_pct(r.get("top1_datafree")), _pct(r["top1"]), _f(r["drop_top1"], ".2f")]
        else:
            row += [_pct(r["top1"]), _f(r["drop_top1"], ".2f")]
        row += [_f(r["speedup"], ".2f"), _f(r.get("seconds"), ".1f")]
        if calibrated:
            row.append(_f(r.get("calib_seconds"), ".1f"))
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    b = res.baseline
    lines += ["", "MACs: the budget (fraction of the factorizable layers' multiply-adds); MACs x, "
                  "params x: factorized / original, whole model; kern.err: mean relative kernel "
                  "error (not comparable across methods); drop: top-1 points below the original"
                  + (" after calibration" if calibrated else "")]
    if b.get("top1") is not None:
        lines.append(f"original: top-1 {b['top1']:.2%} on {b['images']} images")
    lat = res.latency
    if lat:
        lines.append(f"speed-up: original ms / factorized ms, whole model, batch "
                     f"{lat['batch_size']}, {lat['threads']} threads, median of "
                     f"{lat['repeats']} interleaved rounds (> 1 is faster)")
    lines.append("seconds: planning and factoring" + ("; calib s: calibrating" if calibrated
                                                      else ""))
    for r in res.rows:
        if r.get("note"):
            lines.append(f"{r['setting']}: {r['note']}")
    return "\n".join(lines)


__all__ = ["CompareResult", "compare", "compare_configs", "render_compare"]
