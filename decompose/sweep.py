"""Sweeps: one model decomposed at many settings, every setting measured the same way.

    from decompose.sweep import sweep, sweep_configs
    configs = sweep_configs(ranks=[1, 2, 3], latency_targets=[0.5], orders=["auto"],
                            exclude=["conv1"], form="auto", fold_bn=True)
    result = sweep(model, configs, batches=cache_batches(loader),
                   calibration=calibration_batches("train/", n_samples=512))
    print(result)              # one row per setting
    result.to_csv("sweep.csv")

Each setting decomposes a fresh copy of the model (and, given calibration images, calibrates it:
:func:`decompose.decompose_` with calibration, the same chain as ``decompose MODEL --calibrate DIR``) and
gets one row: the MACs and parameter ratios (whole model), the mean kernel error over the
decoupled layers (before calibration), top-1/top-5 on the same images as the original (evaluated
once), the SQNR of the outputs, and the measured speed-up of the whole model (original and
decomposed timed side by side, see :mod:`decompose.latency`). Settings chosen by timing
(``target_latency``, ``form="fastest"``, ``latency_aware``) also record the planner's predicted
latency fraction.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import api
from .api import decompose_, finalize_forms_, measure_curves, plain_forms_, reusable_batches
from .config import BUDGETS, CalibrationConfig, DecomposeConfig
from .errors import BudgetError, DecomposeError
from .io.write import write_text
from .measure.compare import (
    accuracy_dict,
    check_finite,
    check_input_shape,
    eval_mode,
    evaluate_model,
    first_images,
    latency_input,
    measure_latency,
    sqnr_db,
)
from .progress import is_quiet, progress
from .recover.calibrate import calibrate_
from .report import Report

RULES = {"rank": "--ranks", "energy": "--energies", "target_macs": "--targets",
         "target_latency": "--latency-targets"}
EXAMPLES = {"rank": "1,2,3", "energy": "0.5,0.8", "target_macs": "0.3,0.5",
            "target_latency": "0.5,0.7"}
SHORT = {"rank": "T", "energy": "E", "target_macs": "MACs", "target_latency": "lat",
         "target_params": "params"}
COLUMNS = ["setting", "method", "rule", "value", "order", "layers_decomposed", "macs_ratio",
           "params_ratio", "decomposed_macs_ratio", "mean_kernel_error", "top1", "top5",
           "drop_top1", "sqnr_db", "before_ms", "after_ms", "speedup", "speedup_same_layout",
           "calibrated", "calib_seconds", "predicted_latency_fraction", "seconds",
           "top1_datafree", "drop_top1_datafree"]


def sweep_configs(ranks: Iterable[int] = (), energies: Iterable[float] = (),
                  targets: Iterable[float] = (), orders: Iterable[str] = ("auto",), *,
                  latency_targets: Iterable[float] = (), **common: Any) -> list[DecomposeConfig]:
    """One :class:`DecomposeConfig` per (value, order): every rank, then every energy, then every
    MACs target, then every latency target (``target_latency``: the whole model timed on this
    machine takes at most this fraction of the original's time), each in every order.

    ``common``: other config fields, the same in every setting (``include``, ``exclude``,
    ``input_shape``, ``fold_bn``, ``form``, ``latency_aware``, ``latency_batch``, ``threads``,
    ``channels_last``, ...). ``allocation`` applies to the budget rows (MACs and latency
    targets) only; rank and energy rows have no budget to spread. A bad value raises a one-line
    error naming its flag."""
    orders = list(orders)
    common = dict(common)
    allocation = common.pop("allocation", "kernel")
    DecomposeConfig(**common)  # a bad common field: its own message, not a rule's flag
    out = []
    for rule, values in (("rank", ranks), ("energy", energies), ("target_macs", targets),
                         ("target_latency", latency_targets)):
        extra = {"allocation": allocation} if rule in BUDGETS else {}
        for v in values:
            for order in orders:
                try:
                    out.append(DecomposeConfig(**{rule: v}, order=order, **common, **extra))
                except DecomposeError as e:
                    # the config's own hint names the main command's flag (--rank 1, ...)
                    why = str(e).split("; try ")[0]
                    raise DecomposeError(f"{RULES[rule]}: {why}; e.g. {RULES[rule]} "
                                         f"{EXAMPLES[rule]}") from None
    if not out:
        raise DecomposeError("nothing to sweep; give --ranks, --energies, --targets and/or "
                             "--latency-targets, e.g. --ranks 1,2,3")
    return out


def _label(config: DecomposeConfig) -> tuple[str, str, float]:
    rule = config.selection
    value = getattr(config, rule)
    if isinstance(value, str):  # rank "full"
        return f"{SHORT[rule]}={value} {config.order}", rule, value
    order = config.order if config.method == "nd" else config.method
    return f"{SHORT[rule]}={value:g} {order}", rule, value


@dataclass
class SweepResult:
    """The rows of a sweep and the original model's figures they are compared with."""

    rows: list[dict[str, Any]]
    baseline: dict[str, Any]
    latency: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "latency": self.latency,
                "input_shape": list(self.input_shape), "rows": self.rows}

    def to_csv(self, path: str | Path, force: bool = False) -> Path:
        """Write the rows as CSV (columns :data:`COLUMNS`, empty cells for missing numbers),
        atomically; an existing file is only replaced with ``force``
        (:func:`decompose.io.write.write_text`)."""
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
        return write_text(path, buf.getvalue(), force, what="--csv file")

    def __str__(self) -> str:
        return render_sweep(self)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_sweep(res: SweepResult) -> str:
    head = ["setting", "layers", "MACs", "params", "kern.err", "top-1", "drop", "SQNR dB",
            "speed-up"]
    rows = [[r["setting"], str(r["layers_decomposed"]), _f(r["macs_ratio"], ".3f"),
             _f(r["params_ratio"], ".3f"), _f(r["mean_kernel_error"], ".4f"), _pct(r["top1"]),
             _f(r["drop_top1"], ".2f"), _f(r["sqnr_db"], ".2f"), _f(r["speedup"], ".2f")]
            for r in res.rows]
    predicted = any(r.get("predicted_latency_fraction") is not None for r in res.rows)
    calibrated = any(r.get("calibrated") for r in res.rows)
    if predicted:
        head.append("pred.lat")
        for row, r in zip(rows, res.rows):
            row.append(_f(r.get("predicted_latency_fraction"), ".3f"))
    if calibrated:
        head.append("calib s")
        for row, r in zip(rows, res.rows):
            row.append(_f(r.get("calib_seconds"), ".1f") if r.get("calibrated") else "no")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    b = res.baseline
    lines.append("")
    lines.append("MACs, params: decomposed / original, whole model; kern.err: mean relative "
                 "kernel error over decoupled layers; drop in top-1 points")
    if b.get("top1") is not None:
        lines.append(f"original: top-1 {b['top1']:.2%}, top-5 {b['top5']:.2%} on "
                     f"{b['images']} images")
    if predicted:
        lines.append("pred.lat: the planner's predicted latency, fraction of the original's "
                     "(timed while planning)")
    if calibrated:
        lines.append("calib s: seconds calibrating the setting (kern.err is before calibration; "
                     "top-1, SQNR and speed-up after)")
    lat = res.latency
    if lat:
        lines.append(f"speed-up: original ms / decomposed ms, whole model, batch "
                     f"{lat['batch_size']}, {lat['threads']} threads, median of "
                     f"{lat['repeats']} interleaved rounds (> 1 is faster)")
    for r in res.rows:
        if str(r.get("note", "")).startswith("not reachable"):
            lines.append(f"{r['setting']}: {r['note']}")
    return "\n".join(lines)


def _output_sqnr(reference: list[torch.Tensor], model: nn.Module, xs: list[torch.Tensor]
                 ) -> float | None:
    signal = noise = 0.0
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for y, x in zip(reference, xs):
                y_hat = model(x).double()
                check_finite(y_hat, "decomposed")
                signal += float(y.pow(2).sum())
                noise += float((y - y_hat).pow(2).sum())
    finally:
        model.train(was)
    return sqnr_db(signal, noise)


def sweep(model: nn.Module, configs: Sequence[DecomposeConfig], *,
          batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
          meta: dict | None = None, latency: bool = True, latency_batch: int = 1,
          repeats: int = 20, threads: int | None = None, error_images: int = 256,
          calibration: Iterable[Any] | None = None,
          calibration_config: CalibrationConfig | None = None, timer: Any = None,
          latency_fn: Any = None, datafree: bool = False,
          quiet: bool | None = None) -> SweepResult:
    """Decompose a copy of ``model`` with every config and measure each (``model`` is unchanged).

    Args:
        model: the original model.
        configs: e.g. from :func:`sweep_configs`.
        batches: labelled batches in memory (:func:`decompose.measure.compare.cache_batches`); None
            leaves top-1 and SQNR out.
        meta: what the model's file recorded (for the input shape).
        latency: time every setting against the original (whole model). Default True.
        latency_batch, repeats, threads: as in :func:`decompose.measure.compare.measure_latency`.
        error_images: images for the output SQNR. Default 256.
        calibration: unlabeled input batches; each factorized setting is then calibrated
            against ``model`` (:func:`decompose.decompose_` with ``calibration``) before it is
            measured. A one-shot iterator is read once (at most ``calibration_config.samples``
            images kept in memory) and reused for every setting. None: no calibration.
        calibration_config: a :class:`decompose.CalibrationConfig` (default: 512 images, joint).
        datafree: with ``calibration`` and ``batches``, also score every setting before it is
            calibrated (``top1_datafree``; ``decompose compare`` shows both).
        timer, latency_fn: the planner's clock for timed settings, as in
            :func:`decompose.plan` (tests).
        quiet: silence progress bars (None: as :func:`decompose.progress.quiet_progress` says).
    """
    if not configs:
        raise DecomposeError("nothing to sweep; give at least one setting")
    cal = calibration_config or CalibrationConfig()
    calibration = reusable_batches(calibration, cal.samples)
    with eval_mode(model):
        return _sweep(model, configs, batches=batches, meta=meta, latency=latency,
                      latency_batch=latency_batch, repeats=repeats, threads=threads,
                      error_images=error_images, calibration=calibration, cal=cal,
                      timer=timer, latency_fn=latency_fn, datafree=datafree, quiet=quiet)


def _untimed(config: DecomposeConfig) -> DecomposeConfig:
    """The same layers and input shape, without any timing (the baseline needs no plan)."""
    return dataclasses.replace(config, rank=1, energy=None, target_macs=None, target_params=None,
                               target_latency=None, form="plain", latency_aware=False,
                               allocation="kernel")


def _sweep(model, configs, *, batches, meta, latency, latency_batch, repeats, threads,
           error_images, calibration, cal, timer, latency_fn, datafree, quiet) -> SweepResult:
    first = api.plan(model, _untimed(configs[0]), meta=meta)
    shape = first.input_shape
    baseline: dict[str, Any] = {"macs": first.totals["macs_before"],
                                "params": first.totals["params_before"]}
    before = None
    xs: list[torch.Tensor] = []
    reference: list[torch.Tensor] = []
    if batches is not None:
        if not batches:
            raise DecomposeError("the data gave no images; point --data at a folder of class "
                                 "sub-folders holding images")
        check_input_shape(tuple(batches[0][0].shape[1:]), first)
        before = evaluate_model(model, batches, desc="eval original", quiet=quiet)
        baseline.update(before)
        xs = first_images(batches, error_images)
        with torch.inference_mode():
            reference = [model(x).double() for x in xs]
    x_lat, kind = latency_input(model, shape, latency_batch, batches) if latency else (None, "")
    rows = []
    lat_info: dict[str, Any] = {}
    curves: dict[tuple, dict] = {}  # output errors depend on the model and these fields only
    for config in progress(configs, desc="sweep", unit="setting", quiet=quiet):
        label, rule, value = _label(config)
        new = copy.deepcopy(model)
        try:
            known = None
            if config.allocation == "output" and calibration is not None:
                key = (config.fold_bn, config.include, config.exclude, config.method,
                       config.seed)  # every order is measured: one pass serves them all
                if key not in curves:
                    curves[key] = measure_curves(model, dataclasses.replace(config, order="auto"),
                                                 calibration,
                                                 min(cal.allocation_samples, cal.samples))
                known = curves[key]
            t0 = time.perf_counter()
            # factor (no data), then calibrate: decompose_(..., calibration=...)'s chain,
            # with the data-free model scored in between when asked
            report: Report = decompose_(new, config, meta=meta, timer=timer,
                                        latency_fn=latency_fn, error_curves=known)
            seconds = time.perf_counter() - t0
            free = None
            if calibration is not None and report.decomposed:
                if known is not None:
                    report.allocation = {"errors": "relative output error",
                                         "images": min(cal.allocation_samples, cal.samples)}
                if datafree and batches is not None:
                    free = evaluate_model(new, batches, desc=f"eval {label} data-free",
                                          quiet=quiet)
                plain_forms_(new)  # calibration fits the plain form ...
                report.calibration = calibrate_(new, model, calibration, cal,
                                                progress=not is_quiet(quiet)).to_dict()
                finalize_forms_(new, report)  # ... then the chosen forms (exact)
        except BudgetError as e:  # unreachable budget: say so in its row and go on
            rows.append({**dict.fromkeys(COLUMNS), "setting": label, "method": config.method,
                         "rule": rule, "value": value, "order": config.order,
                         "layers_decomposed": 0,
                         "calibrated": False, "note": f"not reachable: {e}"})
            continue
        except DecomposeError as e:
            raise DecomposeError(f"setting {label}: {e}") from None
        t = report.totals
        done = report.decomposed
        cal_done = report.calibration
        row: dict[str, Any] = {
            "setting": label, "method": config.method, "rule": rule, "value": value,
            "order": config.order, "layers_decomposed": t["layers_decomposed"],
            "seconds": seconds,
            "macs_ratio": t["macs_after"] / t["macs_before"] if t["macs_before"] else None,
            "params_ratio": t["params_after"] / t["params_before"] if t["params_before"] else None,
            "decomposed_macs_ratio": t["decomposed_macs_ratio"] if done else None,
            "mean_kernel_error": (sum(lp.kernel_error for lp in done) / len(done)) if done else None,
            "top1": None, "top5": None, "drop_top1": None, "sqnr_db": None,
            "before_ms": None, "after_ms": None, "speedup": None, "speedup_same_layout": None,
            "calibrated": cal_done is not None,
            "calib_seconds": cal_done["seconds"] if cal_done is not None else None,
            "predicted_latency_fraction":
                (report.latency_plan or {}).get("predicted_fraction"),
            "ranks": {lp.name: [lp.order, lp.rank] for lp in done},
            "forms": {lp.name: lp.form or "plain" for lp in done},
            "folded_bn": len(report.folded_bn or []),
        }
        if not done:  # the same model as the original: nothing to measure
            if before is not None:
                row.update(top1=before["top1"], top5=before["top5"], drop_top1=0.0)
            row["note"] = ("no layer decoupled (none was faster than the original when timed)"
                           if config.timed else
                           "no layer decoupled (no rank is cheaper than the original)")
        else:
            if before is not None:
                after = evaluate_model(new, batches, desc=f"eval {label}", quiet=quiet)
                acc = accuracy_dict(before, after)
                row.update(top1=after["top1"], top5=after["top5"], drop_top1=acc["drop_top1"],
                           sqnr_db=_output_sqnr(reference, new, xs))
                if free is not None:
                    row.update(top1_datafree=free["top1"],
                               drop_top1_datafree=accuracy_dict(before, free)["drop_top1"])
            if x_lat is not None:
                lat = measure_latency(model, new, report.layers, x_lat, repeats=repeats,
                                      threads=threads, per_layer=False, quiet=True)
                row.update(before_ms=lat["before_ms"], after_ms=lat["after_ms"],
                           speedup=lat["speedup"],
                           speedup_same_layout=lat.get("speedup_same_layout"))
                lat_info = {k: lat[k] for k in ("batch_size", "threads", "repeats", "warmup")}
                lat_info["input"] = kind
        rows.append(row)
        del new
    for r in rows:  # JSON has no NaN/Infinity
        for k, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                r[k] = None
    return SweepResult(rows, baseline, lat_info, tuple(shape))


__all__ = ["COLUMNS", "SweepResult", "render_sweep", "sweep", "sweep_configs"]
