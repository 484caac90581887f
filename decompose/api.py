"""The Python API: one in-place verb with a config, a dry run, and saving.

    import decompose
    report = decompose.decompose_(model, decompose.DecomposeConfig(rank=2))
    print(report)                  # per-layer table
    report.to_dict()["totals"]     # JSON-able numbers

``decompose_`` changes ``model`` in place (the trailing underscore, as in PyTorch and torchao's
``quantize_``): it plans, factors the chosen layers and, given unlabeled ``calibration``
images, refits them to the original's outputs; it returns the
:class:`~decompose.report.Report`. ``plan`` returns the report of what ``decompose_`` would do
without touching the model; ``save`` writes a model with the metadata of its report, the same
file whether a script or the command line calls it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import methods as registry
from .config import CalibrationConfig, DecomposeConfig
from .engine.check import check, reference
from .engine.fold import fold_bn_
from .engine.layout import is_channels_last, to_channels_last_
from .engine.params import bake_parametrizations_, detach_hook_weights_
from .engine.surgery import replace_module
from .engine.trace import infer_input_shape, macs_from_trace, param_count, trace
from .errors import DecomposeError
from .io.files import check_writable, default_output, load_model, save_model
from .io.inputs import stat_input
from .methods.convs import is_factorizable
from .methods.module import is_lowrank
from .planning.plan import FilterFn, make_plan
from .planning.timing import LayerTimer
from .report import LayerPlan, Report, totals


def _resolve(config: DecomposeConfig | None, kwargs: dict[str, Any]) -> DecomposeConfig:
    if config is None:
        return DecomposeConfig(**kwargs)
    if kwargs:
        return DecomposeConfig.from_dict({**config.to_dict(), **kwargs})
    return config


def plan(model: nn.Module, config: DecomposeConfig | None = None, *,
         filter_fn: FilterFn | None = None, meta: dict | None = None,
         timer: Any = None, latency_fn: Any = None, error_curves: dict | None = None,
         **kwargs: Any) -> Report:
    """What :func:`decompose_` would do, as a report; the model is not changed.

    Args:
        model: any nn.Module with Conv1d/2d/3d (or ConvTranspose1d/2d/3d) layers.
        config: a :class:`DecomposeConfig`; keyword arguments (``rank=2``, ``method="cp"``,
            ...) build or override one.
        filter_fn: ``filter_fn(module, fqn) -> bool``; convs for which it is False stay as they are.
        meta: what a decompose file recorded (used for the input shape).
        timer: the clock for the planner's timings (``form="fastest"``, ``latency_aware``,
            ``target_latency``); default :func:`time.perf_counter`. For deterministic tests.
        latency_fn: ``latency_fn(layer, label, module, x) -> ms`` replaces those timings
            (see :mod:`decompose.planning.timing`).
        error_curves: measured output errors for ``allocation="output"``
            (:func:`decompose.planning.sensitivity.output_error_curves` on this model,
            BatchNorms folded first when ``fold_bn``); :func:`decompose_` measures them for you
            from its ``calibration`` images.
    """
    config = _resolve(config, kwargs)
    detach_hook_weights_(model)  # an old weight_norm's weight with history cannot be copied
    if config.allocation == "output" and error_curves is None:
        raise DecomposeError("allocation 'output' needs calibration images: pass --calibrate DIR "
                             "(Python: decompose_(..., calibration=...), or plan/decompose_ with "
                             "error_curves=output_error_curves(model, batches))")
    if config.fold_bn or (config.channels_last and config.timed and not is_channels_last(model)):
        model = copy.deepcopy(model)  # plan what decompose_ would do: on a folded / cl copy
        if config.channels_last:
            to_channels_last_(model)
    shape, source = infer_input_shape(model, config.input_shape, meta)
    folded = fold_bn_(model, shape) if config.fold_bn else None
    shapes = trace(model, shape)
    timing = None
    if config.timed:
        timing = LayerTimer(model, config, shape, timer=timer, latency_fn=latency_fn)
    layers = make_plan(model, config, shape, filter_fn, shapes, timing=timing,
                       error_curves=error_curves)
    macs_before = macs_from_trace(model, shapes)
    params = param_count(model)
    saved = sum(lp.params_before - lp.params_after for lp in layers if lp.skipped is None)
    report = Report(layers, totals(layers, params, params - saved, macs_before),
                    config.to_dict(), shape, source)
    if folded is not None:
        report.folded_bn = [list(p) for p in folded.folded]
        report.fold = folded.to_dict()
    if timing is not None:
        report.latency_plan = dict(timing.summary)
    return report


def apply_plan(model: nn.Module, layers: list[LayerPlan], *, forms: bool = True) -> nn.Module:
    """Replace every planned (not skipped) conv by the layer its plan chose, in place.

    The form is ``lp.form`` (plain when None); ``forms=False`` builds every layer plain (e.g. to
    calibrate first, then :func:`finalize_forms_`)."""
    for lp in layers:
        if lp.skipped is not None:
            continue
        if lp.choice is None:
            raise DecomposeError(f"layer {lp.name} has no candidate to build from; make the plan "
                                 "with decompose.plan on this model")
        cand, i = lp.choice
        conv = model.get_submodule(lp.name)
        form = lp.form if forms and lp.form else "plain"
        replace_module(model, lp.name, registry.build(conv, cand, i, form))
    return model


def finalize_forms_(model: nn.Module, report: Report | list[LayerPlan]) -> int:
    """Convert every factorized layer of ``model`` to the form its plan chose (``lp.form``,
    exact: the same function up to float rounding), in place; returns how many changed. Run
    after calibration (which works on the plain form) and before measuring or saving."""
    layers = report.layers if isinstance(report, Report) else report
    changed = 0
    for lp in layers:
        if lp.skipped is not None:
            continue
        m = model.get_submodule(lp.name)
        want = lp.form or "plain"
        if is_lowrank(m) and m.form != want:
            replace_module(model, lp.name, registry.to_form(m, want))
            changed += 1
    if isinstance(report, Report) and report.config.get("channels_last"):
        to_channels_last_(model)  # new modules (and refitted weights) in the model's layout
    return changed


def plain_forms_(model: nn.Module) -> int:
    """Convert every factorized layer of ``model`` that is not in its plain form to it, exactly,
    in place; returns how many. Calibration and fine-tuning expect the plain form;
    :func:`finalize_forms_` converts back."""
    names = [n for n, m in model.named_modules() if is_lowrank(m) and m.form != "plain"]
    for n in names:
        m = model.get_submodule(n)
        replace_module(model, n, registry.to_form(m, "plain"))
    return len(names)


def decompose_(model: nn.Module, config: DecomposeConfig | None = None, *,
               calibration: Iterable[Any] | None = None,
               calibration_config: CalibrationConfig | None = None,
               original: nn.Module | None = None, filter_fn: FilterFn | None = None,
               meta: dict | None = None, progress: bool = True, timer: Any = None,
               latency_fn: Any = None, error_curves: dict | None = None,
               **kwargs: Any) -> Report:
    """Factor the convolutions of ``model`` in place and, given images, calibrate; return the
    report.

    Each selected conv becomes a :class:`~decompose.methods.LowRankConv` built by the method
    its plan chose (Network Decoupling by default: ``conv_dw`` and ``conv_pw``), in the form the
    plan chose (``config.form``). With ``calibration`` (unlabeled batches: tensors or
    ``(inputs, labels)`` pairs, e.g. :func:`decompose.data.calibration_batches`), every
    factorized layer is then refitted to the original layer's output
    (:func:`decompose.recover.calibrate.calibrate_` with ``calibration_config``), and with
    ``config.allocation == "output"`` the budget's output errors are measured on the same images
    first. Arguments as in :func:`plan`, and:

    Args:
        calibration: unlabeled input batches; None skips calibration.
        calibration_config: a :class:`CalibrationConfig` (default: 512 images, joint fit).
        original: the untouched model, to calibrate against. Default: a deep copy taken before
            factoring, when calibrating (pass your own when you also need it afterwards).
        progress: show the calibration progress bar on stderr.

    Example:
        >>> import torch, decompose
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1))
        >>> rep = decompose.decompose_(net, rank=1, input_shape=(8, 16, 16))
        >>> rep.totals["layers_decomposed"]
        1
        >>> type(net[0]).__name__, list(net[0]._modules), net[0].stride
        ('LowRankConv', ['conv_dw', 'conv_pw'], (1, 1))
    """
    config = _resolve(config, kwargs)
    detach_hook_weights_(model)  # an old weight_norm's weight with history cannot be copied
    cal = calibration_config or CalibrationConfig()
    if calibration is not None and original is None:
        original = copy.deepcopy(model)
    curves = None
    measured_on = min(cal.allocation_samples, cal.samples)
    if config.allocation == "output" and calibration is not None:
        calibration = reusable_batches(calibration, cal.samples)
        curves = (error_curves if error_curves is not None else
                  measure_curves(original, config, calibration, measured_on))
    elif error_curves is not None:
        curves = error_curves
    params_given = param_count(model)
    shape, _ = infer_input_shape(model, config.input_shape, meta)
    exact = config.rank == "full"
    ref = reference(model, shape, capture=tuple(n for n, m in model.named_modules()
                                                 if is_factorizable(m)) if exact else ())
    if config.channels_last:
        to_channels_last_(model)  # before planning: the planner times in the model's layout
    folded = fold_bn_(model, shape) if config.fold_bn else None
    report = plan(model, dataclasses.replace(config, fold_bn=False), filter_fn=filter_fn,
                  meta=meta, timer=timer, latency_fn=latency_fn, error_curves=curves)
    report.config = config.to_dict()
    if folded is not None:
        report.folded_bn = [list(p) for p in folded.folded]
        report.fold = folded.to_dict()
        report.totals["params_before"] = params_given  # the model as given, BatchNorms included
    if curves is not None and calibration is not None:
        report.allocation = {"errors": "relative output error", "images": measured_on}
    apply_plan(model, report.layers, forms=calibration is None)
    if config.channels_last:
        to_channels_last_(model)
    if calibration is not None and report.decomposed:
        from .recover.calibrate import calibrate_
        result = calibrate_(model, original, calibration, cal, progress=progress)
        report.calibration = result.to_dict()
        finalize_forms_(model, report)  # the forms the plan chose (exact)
    if report.decomposed or (folded is not None and folded.folded):
        report.output_check = check(model, ref, exact=exact)
    return report


def decompose(model: nn.Module, config: DecomposeConfig | None = None, **kwargs: Any
              ) -> tuple[nn.Module, Report]:
    """Like :func:`decompose_` but on a deep copy; returns ``(new_model, report)``."""
    new = copy.deepcopy(model)
    return new, decompose_(new, config, **kwargs)


def reusable_batches(batches: Any, samples: int) -> Any:
    """Calibration batches that can be read again (each sweep setting, or the output-error
    allocation and then the calibration): a one-shot iterator (e.g.
    :func:`decompose.data.calibration_batches`) is read once, its first ``samples`` images kept;
    anything re-iterable (a list, a DataLoader, a tensor) is returned as it is."""
    if batches is None or not isinstance(batches, Iterable) or iter(batches) is not batches:
        return batches
    kept: list[Any] = []
    n = 0
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) and b else b
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            x = x[: samples - n]
            n += len(x)
        kept.append(x)
        if n >= samples:
            break
    return kept


def measure_curves(original: nn.Module, config: DecomposeConfig, batches: list[Any],
                   samples: int) -> dict:
    """Output-error curves of ``original`` for ``config``'s layers and methods, on its folded
    kernels when ``config.fold_bn`` (what the plan factors)."""
    from .planning.sensitivity import output_error_curves
    model = original
    if config.fold_bn:
        model = copy.deepcopy(original)
        fold_bn_(model, config.input_shape)
    return output_error_curves(model, batches, config=config, samples=samples)


def file_meta(report: Report, *, source: str | os.PathLike | None = None,
              arch: str | None = None) -> dict[str, Any]:
    """The metadata a decompose file records: how it was made (config, methods, ranks), from
    what, and what was measured."""
    meta: dict[str, Any] = {
        "config": report.config,
        "input_shape": list(report.input_shape),
        "source": None if source is None else str(source),
        "arch": arch,
        "totals": report.totals,
        "layers": [{"name": lp.name, "method": lp.method, "order": lp.variant,
                    "rank": list(lp.rank) if isinstance(lp.rank, tuple) else lp.rank}
                   for lp in report.decomposed],
    }
    for key in ("accuracy", "output_error", "latency", "calibration"):
        if getattr(report, key) is not None:
            meta[key] = getattr(report, key)
    return meta


def save(model: nn.Module, path: str | os.PathLike, report: Report | None = None, *,
         source: str | os.PathLike | None = None, arch: str | None = None,
         force: bool = False, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in decompose's format (atomic, loadable by the safe loader), with the
    metadata of ``report`` (:func:`file_meta`) plus ``meta``; ``report.output`` is set.
    ``decompose MODEL`` writes its files with this function.

    Weight parametrizations (``weight_norm`` and the like, e.g. on the convs a factorization
    left original) cannot be pickled: they are baked into plain weights first, *in place* and
    exactly (:func:`decompose.engine.params.bake_parametrizations_`; same outputs), and
    ``report.baked_parametrizations`` and the file's metadata name the modules."""
    check_writable(path, force)  # refuse before changing anything
    baked = bake_parametrizations_(model)
    if report is not None and baked:
        report.baked_parametrizations = baked
    data = file_meta(report, source=source, arch=arch) if report is not None else {}
    if baked:
        data["baked_parametrizations"] = baked
    data.update(meta or {})
    out = save_model(model, path, data, force=force)
    if report is not None:
        report.output = str(out)
    return out


def decompose_file(model_path: str | os.PathLike, config: DecomposeConfig, *,
                   arch: str | None = None, allow: Iterable[str] = (), trust: bool = False,
                   output: str | os.PathLike | None = None, force: bool = False,
                   write: bool = True, data_shape: tuple[int, ...] | None = None,
                   before_save: Callable | None = None, calibration: Any = None,
                   calibration_config: CalibrationConfig | None = None,
                   log: Callable[[str], None] | None = None, progress: bool = True,
                   allow_functions: Iterable[str] = ()):
    """``decompose MODEL``: load, plan, (factor, calibrate, measure, save). Returns
    ``(report, loaded, output path or None)``; nothing is written when no layer was factorized.

    ``output`` defaults to ``MODEL.decomposed.pt`` beside the model; it is checked before any
    work. ``data_shape``: one sample's shape from ``--data``, used to count multiply-adds when
    neither the config nor the model says its input shape. ``before_save(report, original,
    decomposed)`` runs after factoring and calibrating, before saving (so a data problem leaves
    no file behind), with an untouched copy of the model as ``original``. ``write=False``: only
    :func:`plan`."""
    say = log or (lambda msg: None)
    stat_input(model_path, "model file")  # the input first: a missing model is the news
    out = output if output else default_output(model_path)  # a str keeps a trailing "/"
    if write:
        check_writable(out, force, inputs=[model_path])  # fail before any work
    loaded = load_model(model_path, arch=arch, allow=allow, trust=trust,
                        allow_functions=allow_functions)
    say(f"loaded {model_path} ({loaded.kind}, {type(loaded.model).__name__})")
    model = loaded.model
    detach_hook_weights_(model)  # an old weight_norm's weight with history cannot be copied
    if data_shape is not None and config.input_shape is None:
        _, source = infer_input_shape(model, None, loaded.meta)
        if source == "default":
            config = dataclasses.replace(config, input_shape=tuple(data_shape))
    if not write:
        return plan(model, config, meta=loaded.meta), loaded, None
    keep = before_save is not None or calibration is not None
    original = copy.deepcopy(model) if keep else None
    if calibration is not None:
        n = (calibration_config or CalibrationConfig()).samples
        say(f"factoring, then calibrating on {n} images ...")
    report = decompose_(model, config, calibration=calibration,
                        calibration_config=calibration_config, original=original,
                        meta=loaded.meta, progress=progress)
    if not report.decomposed:
        return report, loaded, None
    if before_save is not None:
        before_save(report, original, model)
    save(model, out, report, source=model_path, arch=loaded.meta.get("arch", arch), force=force)
    return report, loaded, out
