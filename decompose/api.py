"""The Python API: one in-place verb with a config, and a dry run.

    import decompose
    report = decompose.decompose_(model, decompose.DecoupleConfig(rank=2))
    print(report)                  # per-layer table
    report.to_dict()["totals"]     # JSON-able numbers

``decompose_`` changes ``model`` in place (the trailing underscore, as in PyTorch and torchao's
``quantize_``) and returns the :class:`~decompose.report.Report`; ``plan`` returns the report of
what ``decompose_`` would do without touching the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .config import DecoupleConfig
from .engine.fold import fold_batchnorm_
from .engine.surgery import replace_module
from .engine.trace import infer_input_shape, macs_from_trace, param_count, trace
from .errors import DecomposeError
from .methods.nd.forms import fast_form, is_channels_last, to_channels_last_, to_plain
from .methods.nd.layers import decouple_conv, decoupled_form, is_decoupled
from .planning.plan import FilterFn, LayerPlan, make_plan
from .report import Report, totals


def _resolve(config: DecoupleConfig | None, kwargs: dict[str, Any]) -> DecoupleConfig:
    if config is None:
        return DecoupleConfig(**kwargs)
    if kwargs:
        return DecoupleConfig.from_dict({**config.to_dict(), **kwargs})
    return config


def plan(model: nn.Module, config: DecoupleConfig | None = None, *,
         filter_fn: FilterFn | None = None, meta: dict | None = None,
         timer: Any = None, latency_fn: Any = None, error_curves: dict | None = None,
         **kwargs: Any) -> Report:
    """What :func:`decompose_` would do, as a report; the model is not changed.

    Args:
        model: any nn.Module with Conv1d/2d/3d layers.
        config: a :class:`DecoupleConfig`; keyword arguments (``rank=2``, ``order="dw-pw"``, ...)
            build or override one.
        filter_fn: ``filter_fn(module, fqn) -> bool``; convs for which it is False stay as they are.
        meta: what a decompose file recorded (used for the input shape).
        timer: the clock for the planner's timings (``form="fastest"``, ``latency_aware``,
            ``target_latency``); default :func:`time.perf_counter`. For deterministic tests.
        latency_fn: ``latency_fn(layer, label, module, x) -> ms`` replaces those timings
            (see :mod:`decompose.latency_plan`).
        error_curves: measured output errors for ``allocation="output"``
            (:func:`decompose.planning.sensitivity.output_error_curves` on this model, BatchNorms
            folded first when ``fold_bn``); :func:`decompose.compress_` measures them for you.
    """
    config = _resolve(config, kwargs)
    if config.allocation == "output" and error_curves is None:
        raise DecomposeError("allocation 'output' needs calibration images: pass --calibrate DIR "
                             "(Python: compress_(..., calibration=...), or plan/decompose_ with "
                             "error_curves=output_error_curves(model, batches))")
    if config.fold_bn or (config.channels_last and config.timed and not is_channels_last(model)):
        import copy  # plan what decompose_ would do: on a folded / channels_last copy
        model = copy.deepcopy(model)
        if config.channels_last:
            to_channels_last_(model)
    folded = fold_batchnorm_(model) if config.fold_bn else []
    shape, source = infer_input_shape(model, config.input_shape, meta)
    shapes = trace(model, shape)
    timing = None
    if config.timed:
        from .planning.timing import LayerTimer
        timing = LayerTimer(model, config, shape, timer=timer, latency_fn=latency_fn)
    layers = make_plan(model, config, shape, filter_fn, shapes, timing=timing,
                       error_curves=error_curves)
    macs_before = macs_from_trace(model, shapes)
    params = param_count(model)
    saved = sum(lp.params_before - lp.params_after for lp in layers if lp.skipped is None)
    report = Report(layers, totals(layers, params, params - saved, macs_before),
                    config.to_dict(), shape, source)
    if config.fold_bn:
        report.extra["folded_bn"] = [list(p) for p in folded]
    if timing is not None:
        report.extra["latency_plan"] = dict(timing.summary)
    return report


def apply_plan(model: nn.Module, layers: list[LayerPlan], *, forms: bool = True) -> nn.Module:
    """Replace every planned (not skipped) conv by its decoupled form, in place.

    The form is ``lp.extra["form"]`` (``"plain"`` when absent); ``forms=False`` builds every
    layer plain (e.g. to calibrate first, then :func:`finalize_forms_`).
    """
    for lp in layers:
        if lp.skipped is None:
            conv = model.get_submodule(lp.name)
            seq = decouple_conv(conv, lp.rank, lp.order)
            form = lp.extra.get("form", "plain") if forms else "plain"
            if form != "plain":
                seq = fast_form(seq, form)
            replace_module(model, lp.name, seq)
    return model


def finalize_forms_(model: nn.Module, report: Report | list[LayerPlan]) -> int:
    """Convert every decoupled layer of ``model`` to the form its plan chose
    (``lp.extra["form"]``, exact: same function up to float rounding), in place; returns how
    many changed. Run after calibration (which works on the plain form) and before measuring
    or saving; a no-op for layers already in their form."""
    layers = report.layers if isinstance(report, Report) else report
    changed = 0
    for lp in layers:
        if lp.skipped is not None:
            continue
        m = model.get_submodule(lp.name)
        want = lp.extra.get("form", "plain")
        if is_decoupled(m) and decoupled_form(m) != want:
            replace_module(model, lp.name, fast_form(m, want))
            changed += 1
    if isinstance(report, Report) and report.config.get("channels_last"):
        to_channels_last_(model)  # new modules (and refitted weights) in the model's layout
    return changed


def plain_forms_(model: nn.Module) -> int:
    """Convert every decoupled layer of ``model`` that is not in the plain form (``"dw1"``) to
    the plain form, exactly, in place; returns how many. :func:`decompose.calibrate_` and
    fine-tuning expect the plain form; :func:`finalize_forms_` converts back."""
    names = [n for n, m in model.named_modules() if is_decoupled(m) and decoupled_form(m) != "plain"]
    for n in names:
        replace_module(model, n, to_plain(model.get_submodule(n)))
    return len(names)


def decompose_(model: nn.Module, config: DecoupleConfig | None = None, *,
               filter_fn: FilterFn | None = None, meta: dict | None = None,
               timer: Any = None, latency_fn: Any = None, error_curves: dict | None = None,
               **kwargs: Any) -> Report:
    """Decouple the convolutions of ``model`` in place and return the report.

    Each selected conv becomes ``nn.Sequential(conv_dw, conv_pw)`` (or ``conv_pw, conv_dw`` for
    the pw-dw order) holding the rank-T truncated SVD of its kernel, built in the form the
    plan chose (``config.form``; :func:`plain_forms_` / :func:`finalize_forms_` convert).
    Arguments as in :func:`plan`.

    Example:
        >>> import torch, decompose
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1))
        >>> rep = decompose.decompose_(net, rank=1, input_shape=(8, 16, 16))
        >>> rep.totals["layers_decomposed"]
        1
        >>> type(net[0]).__name__, list(net[0]._modules)
        ('Sequential', ['conv_dw', 'conv_pw'])
    """
    config = _resolve(config, kwargs)
    params_given = param_count(model)
    if config.channels_last:
        to_channels_last_(model)  # before planning: the planner times in the model's layout
    folded = fold_batchnorm_(model) if config.fold_bn else None
    report = plan(model, dataclasses.replace(config, fold_bn=False), filter_fn=filter_fn, meta=meta,
                  timer=timer, latency_fn=latency_fn, error_curves=error_curves)
    report.config = config.to_dict()
    if folded is not None:
        report.extra["folded_bn"] = [list(p) for p in folded]
        report.totals["params_before"] = params_given  # the model as given, BatchNorms included
    apply_plan(model, report.layers)
    if config.channels_last:
        to_channels_last_(model)
    return report


def decompose(model: nn.Module, config: DecoupleConfig | None = None, **kwargs: Any
              ) -> tuple[nn.Module, Report]:
    """Like :func:`decompose_` but on a deep copy; returns ``(new_model, report)``."""
    import copy
    new = copy.deepcopy(model)
    return new, decompose_(new, config, **kwargs)
