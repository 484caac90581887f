"""Measuring a decomposed model against its original: accuracy, output error, latency.

Everything compares the two models *on the same inputs in the same process*:

* :func:`measure_accuracy`: top-1 / top-5 / loss of the original ("before") and the decomposed
  model ("after") on the same labelled images.
* :func:`measure_output_error`: the SQNR of the final outputs, and for every decoupled layer the
  relative error of its output, ``||f_dec(x) - f_orig(x)|| / ||f_orig(x)||``, where ``x`` is the
  input that layer receives *in the original network* (so each layer's figure is its own error,
  not the error accumulated by the layers before it).
* :func:`measure_latency`: whole-model and per-layer median latency, original and decoupled timed
  side by side by :func:`decompose.measure.clock.compare_latency` (warm-up, interleaved rounds, median).
  Each layer is timed on the input it actually receives (captured with a forward hook on the
  original network) at the given batch size.
* :func:`measure`: all of it, written into a :class:`~decompose.report.Report`.

The JSON these fill in is documented in docs/report.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.layout import is_channels_last, to_channels_last_
from ..engine.trace import calls_for as _calls_for
from ..engine.trace import capture_inputs, eval_mode
from ..engine.trace import device_of as _device
from ..errors import DecomposeError
from ..progress import is_quiet, progress
from ..report import LayerPlan, Report
from .clock import allocator_settings, compare_latency, speedups

Batch = tuple[torch.Tensor, torch.Tensor]


# ------------------------------------------------------------------------------------- helpers
def _forward(model: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``model(x)`` with a failure turned into one line that says what to check."""
    try:
        return model(x)
    except DecomposeError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shape = "x".join(map(str, x.shape[1:]))
        raise DecomposeError(f"the {what} model fails on a batch of {shape} images ({msg[:160]});"
                             " check --resize/--crop and that the images suit this model") from None


def check_finite(y: torch.Tensor, what: str) -> None:
    """Refuse NaN or Inf in a model's output: a measurement made from them (accuracy, SQNR,
    output error, a latency of a model that computes nothing useful) would be a number that
    means nothing."""
    if isinstance(y, torch.Tensor) and y.is_floating_point() and not bool(torch.isfinite(y).all()):
        bad = "NaN" if bool(torch.isnan(y).any()) else "Inf"
        raise DecomposeError(f"the {what} model outputs {bad}, so no measurement of it means "
                             "anything; check its weights and the preprocessing (--mean/--std)")


class Batches(list):
    """Batches read into memory, with the ``dataset`` they came from (its ``classes`` and
    ``labels`` let :func:`decompose.measure.evaluate.evaluate` check the data against the model)."""

    dataset: Any = None


def cache_batches(loader: Iterable[Batch], *, desc: str = "load images", quiet: bool | None = None
                  ) -> Batches:
    """Read every batch of ``loader`` once into memory, so that several models (before, after,
    every setting of a sweep) see the same tensors without decoding the images again."""
    out = Batches((x, y) for x, y in progress(loader, desc=desc, unit="batch", quiet=quiet))
    out.dataset = getattr(loader, "dataset", None)
    return out


def check_input_shape(sample_shape: Sequence[int], report: Report) -> None:
    """Refuse images whose (C, H, W) is not the shape ``report`` was planned for, unless that
    shape was only a default guess. Models with a global pool would run on any size silently."""
    from ..data import check_input_shape as check
    if report.input_shape_source != "default":
        check(report.input_shape, sample_shape)


def first_images(batches: Iterable[Any], n: int) -> list[torch.Tensor]:
    """The first ``n`` images of ``batches`` (each a tensor or an ``(images, labels)`` pair)."""
    out: list[torch.Tensor] = []
    seen = 0
    for b in batches:
        if seen >= n:
            break
        x = b if isinstance(b, torch.Tensor) else b[0]
        out.append(x[: n - seen])
        seen += len(out[-1])
    return out


# ------------------------------------------------------------------------------------ accuracy
def _result_dict(r: Any) -> dict[str, Any]:
    return {"top1": float(r.top1), "top5": float(r.top5), "loss": float(r.loss), "images": int(r.n),
            "k": int(getattr(r, "k", 5)), "seconds": float(getattr(r, "seconds", 0.0))}


def evaluate_model(model: nn.Module, batches: Iterable[Batch], *, desc: str = "eval",
                   quiet: bool | None = None) -> dict[str, Any]:
    """``{"top1", "top5", "loss", "images", "k", "seconds"}`` of one model: fractions in [0, 1],
    mean cross-entropy, number of images, the k of top-k (5 unless fewer outputs), wall time."""
    from .evaluate import evaluate
    return _result_dict(evaluate(model, batches, progress=not is_quiet(quiet), desc=desc))


def accuracy_dict(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The report's ``accuracy`` object from two :func:`evaluate_model` results."""
    return {
        "before": {k: before[k] for k in ("top1", "top5", "loss")},
        "after": {k: after[k] for k in ("top1", "top5", "loss")},
        "drop_top1": round((before["top1"] - after["top1"]) * 100, 6),
        "drop_top5": round((before["top5"] - after["top5"]) * 100, 6),
        "images": after["images"],
    }


def measure_accuracy(original: nn.Module, decomposed: nn.Module, batches: Sequence[Batch], *,
                     before: dict[str, Any] | None = None, quiet: bool | None = None
                     ) -> dict[str, Any]:
    """Accuracy of both models on the same ``batches`` (a list, e.g. from :func:`cache_batches`).

    ``before``: an earlier :func:`evaluate_model` result of ``original`` on the same batches, to
    skip evaluating it again (sweeps). ``drop_top1`` is in percentage points.
    """
    if before is None:
        before = evaluate_model(original, batches, desc="eval original", quiet=quiet)
    after = evaluate_model(decomposed, batches, desc="eval decomposed", quiet=quiet)
    return accuracy_dict(before, after)


# -------------------------------------------------------------------------------- output error
def sqnr_db(signal_sq: float, noise_sq: float) -> float | None:
    """``10 log10(signal / noise)``; None when the noise is exactly zero (identical outputs) or
    the signal is (all-zero reference outputs)."""
    if noise_sq <= 0 or signal_sq <= 0:  # identical outputs, or all-zero ones: no ratio
        return None
    return 10.0 * math.log10(signal_sq / noise_sq)


def measure_output_error(original: nn.Module, decomposed: nn.Module, layers: list[LayerPlan],
                         batches: Iterable[Batch] | Iterable[torch.Tensor], *,
                         max_images: int = 256, folded: dict[str, str] | None = None
                         ) -> dict[str, Any]:
    """SQNR of the final outputs and each decoupled layer's own relative output error.

    Runs the first ``max_images`` images through both models. Per layer, a forward hook on the
    original conv feeds the very input it received to the decoupled module of ``decomposed``
    and accumulates ``||f_dec(x) - f_orig(x)||^2`` and ``||f_orig(x)||^2`` over all images;
    ``lp.output_rel_error`` is the square root of their ratio.

    ``folded``: conv name -> BatchNorm name for BatchNorms folded into their conv before
    decoupling (``report.folded_bn``); for those the reference ``f_orig`` is the conv
    followed by its BatchNorm, as the decoupled module computes both.

    Returns ``{"sqnr_db", "images", "input": "original network"}``; ``sqnr_db`` is
    ``10 log10(sum ||y||^2 / sum ||y - y_hat||^2)`` over the logits y of the original and y_hat
    of the decomposed model (None if they are bit-identical).
    """
    xs = first_images(batches, max_images)
    done = [lp for lp in layers if lp.skipped is None]
    folded = folded or {}
    sums = {lp.name: [0.0, 0.0] for lp in done}
    stash: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str):
        def fn(mod, inputs):
            stash[name] = inputs[0]
        return fn

    def compare(name: str, dec: nn.Module):
        def fn(mod, inputs, output):
            d = dec(stash.pop(name)).double()
            o = output.double()
            sums[name][0] += float((d - o).pow(2).sum())
            sums[name][1] += float(o.pow(2).sum())
        return fn

    for lp in done:
        conv = original.get_submodule(lp.name)
        out_module = original.get_submodule(folded[lp.name]) if lp.name in folded else conv
        handles.append(conv.register_forward_pre_hook(keep(lp.name)))
        handles.append(out_module.register_forward_hook(
            compare(lp.name, decomposed.get_submodule(lp.name))))
    signal = noise = 0.0
    images = 0
    try:
        with eval_mode(original, decomposed), torch.inference_mode():
            for x in xs:
                y = _forward(original, x, "original").double()
                y_hat = _forward(decomposed, x, "decomposed").double()
                check_finite(y, "original")
                check_finite(y_hat, "decomposed")
                signal += float(y.pow(2).sum())
                noise += float((y - y_hat).pow(2).sum())
                images += len(x)
    finally:
        for h in handles:
            h.remove()
    for lp in done:
        err, ref = sums[lp.name]
        lp.output_rel_error = math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else None)
    for lp in done:
        v = lp.output_rel_error
        if v is not None and not math.isfinite(v):
            raise DecomposeError(f"layer {lp.name}'s output error is {v}: its decoupled form "
                                 "computes NaN/Inf; check the model's weights")
    return {"sqnr_db": sqnr_db(signal, noise), "images": images, "input": "original network"}


# ------------------------------------------------------------------------------------- latency
def _time_pair(before: nn.Module, after: nn.Module, x: torch.Tensor, *, repeats: int,
               warmup: int, threads: int | None, min_sample_ms: float,
               same_layout: nn.Module | None = None) -> dict[str, Any]:
    """Time ``before`` and ``after`` side by side; with ``same_layout`` (the original in the
    decomposed model's memory layout) that one too, in the same rounds."""
    number = _calls_for(before, x, min_sample_ms)
    modules = {"before": before, "after": after}
    if same_layout is not None:
        modules["same_layout"] = same_layout
    res = compare_latency(modules, x, repeats=repeats, warmup=warmup, number=number,
                          threads=threads)
    out = {"before_ms": res["before"].median_ms, "after_ms": res["after"].median_ms,
           "speedup": speedups(res, "before")["after"], "threads": res["before"].threads,
           "number": number}
    if same_layout is not None:
        out["before_same_layout_ms"] = res["same_layout"].median_ms
        out["speedup_same_layout"] = speedups(res, "same_layout")["after"]
    return out


def _same_layout_original(original: nn.Module, decomposed_cl: bool) -> nn.Module | None:
    """The original laid out channels_last when only the decomposed model is (else None): the
    speed-up that decoupling alone brings is measured against it."""
    if decomposed_cl and not is_channels_last(original):
        twin = copy.deepcopy(original)
        to_channels_last_(twin)
        return twin
    return None


def latency_input(model: nn.Module, input_shape: Sequence[int], batch_size: int,
                  batches: Sequence[Batch] | None = None) -> tuple[torch.Tensor, str]:
    """A batch to time on: real images when ``batches`` are given, else seeded N(0, 1) noise."""
    if batches:
        xs = first_images(batches, batch_size)
        x = torch.cat(xs) if xs else None
        if x is not None and len(x) == batch_size:
            return x.contiguous(), "images"
    g = torch.Generator().manual_seed(0)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = torch.randn(batch_size, *input_shape, generator=g).to(dtype=dtype, device=_device(model))
    return x, "random"


def measure_latency(original: nn.Module, decomposed: nn.Module, layers: list[LayerPlan],
                    x: torch.Tensor, *, repeats: int = 20, warmup: int = 3,
                    threads: int | None = None, per_layer: bool = True,
                    min_sample_ms: float = 1.0, folded: dict[str, str] | None = None,
                    quiet: bool | None = None) -> dict[str, Any]:
    """Median latency of both models on ``x`` (whole model, and every decoupled layer).

    Args:
        x: the input batch; its first dimension is the batch size reported.
        repeats: interleaved timed rounds per comparison (default 20).
        warmup: untimed calls of each module first (default 3).
        threads: ``torch.set_num_threads`` while timing (default: leave as it is); the count
            used is reported.
        per_layer: also time each decoupled layer against its original conv, on the input it
            receives in the original network, and write ``latency_before_ms`` /
            ``latency_after_ms`` of each layer plan.
        min_sample_ms: a timed sample repeats the call until it lasts about this long (for
            layers that take microseconds); the mean per call is reported.
        folded: conv name -> folded BatchNorm name; such a layer is timed against the original
            conv followed by its BatchNorm (what the decoupled module replaces).

    Returns the report's ``latency`` object: ``before_ms``, ``after_ms``, ``speedup`` (median of
    paired round ratios, > 1 is faster), ``batch_size``, ``threads``, ``repeats``, ``warmup``.
    """
    done = [lp for lp in layers if lp.skipped is None]
    timed = done if per_layer else []
    decomposed_cl = is_channels_last(decomposed)
    with eval_mode(original, decomposed):
        with torch.inference_mode():  # a model that computes NaN is not timed as if it worked
            for model, what in ((original, "original"), (decomposed, "decomposed")):
                out = _forward(model, x, what)
                for y in out if isinstance(out, (tuple, list)) else [out]:
                    check_finite(y, what)
            del out
        inputs = capture_inputs(original, [lp.name for lp in timed], x) if timed else {}
        jobs: list[LayerPlan | None] = [None, *timed]  # None: the whole model
        whole: dict[str, Any] = {}
        for lp in progress(jobs, desc="time original vs decomposed", unit="module",
                           quiet=quiet if len(jobs) > 1 else True):
            if lp is None:
                whole = _time_pair(original, decomposed, x, repeats=repeats, warmup=warmup,
                                   threads=threads, min_sample_ms=min_sample_ms,
                                   same_layout=_same_layout_original(original, decomposed_cl))
                continue
            if lp.name not in inputs:
                continue
            one = _time_pair(_replaced(original, lp.name, folded or {}),
                             decomposed.get_submodule(lp.name), inputs[lp.name],
                             repeats=repeats, warmup=warmup, threads=threads,
                             min_sample_ms=min_sample_ms)
            lp.latency_before_ms = one["before_ms"]
            lp.latency_after_ms = one["after_ms"]
            lp.latency_speedup = one["speedup"]
    out = {"before_ms": whole["before_ms"], "after_ms": whole["after_ms"],
           "speedup": whole["speedup"], "batch_size": int(x.shape[0]),
           "threads": whole["threads"], "repeats": repeats, "warmup": warmup,
           "per_layer": bool(per_layer and done),
           "layout": "channels_last" if decomposed_cl else "as given",
           "allocator": allocator_settings()}
    for k in ("before_same_layout_ms", "speedup_same_layout"):
        if k in whole:
            out[k] = whole[k]
    return out


def _replaced(original: nn.Module, name: str, folded: dict[str, str]) -> nn.Module:
    """What the decoupled module at ``name`` replaces: the conv, or the conv and its folded BN."""
    conv = original.get_submodule(name)
    if name not in folded:
        return conv
    return nn.Sequential(conv, original.get_submodule(folded[name]))


# ----------------------------------------------------------------------------------- all of it
def measure(report: Report, original: nn.Module, decomposed: nn.Module, *,
            batches: Sequence[Batch] | None = None, latency: bool = True,
            latency_batch: int = 1, repeats: int = 20, threads: int | None = None,
            error_images: int = 256, before: dict[str, Any] | None = None,
            quiet: bool | None = None) -> Report:
    """Fill ``report.accuracy``, ``report.output_error`` and ``report.latency`` (in place).

    Args:
        report: what :func:`decompose.decompose_` returned for ``decomposed``.
        original: the model before decomposition (e.g. a ``copy.deepcopy`` taken first).
        decomposed: the model after.
        batches: labelled ``(images, labels)`` batches (a list, see :func:`cache_batches`); when
            None, accuracy and output error are left out and latency runs on random inputs.
        latency: measure latency (default True).
        latency_batch: batch size of the latency input (default 1).
        repeats: timed rounds per latency comparison (default 20).
        threads: torch threads while timing (default: as set).
        error_images: images used for the output error (default 256).
        before: an earlier evaluation of ``original`` on ``batches`` (skips that pass).
    """
    folded = {c: b for c, b in report.folded_bn or []}
    if batches is not None:
        if not batches:
            raise DecomposeError("the data folder gave no images; point --data at a folder "
                                 "of class sub-folders holding images")
        check_input_shape(tuple(batches[0][0].shape[1:]), report)
        report.accuracy = measure_accuracy(original, decomposed, batches, before=before,
                                           quiet=quiet)
        report.output_error = measure_output_error(original, decomposed, report.layers, batches,
                                                   max_images=error_images, folded=folded)
    if latency:
        x, kind = latency_input(original, report.input_shape, latency_batch, batches)
        report.latency = measure_latency(original, decomposed, report.layers, x, repeats=repeats,
                                         threads=threads, folded=folded, quiet=quiet)
        report.latency["input"] = kind
    return report


__all__ = ["Batches", "accuracy_dict", "cache_batches", "capture_inputs", "check_finite",
           "check_input_shape",
           "eval_mode", "evaluate_model", "first_images", "latency_input", "measure",
           "measure_accuracy", "measure_latency", "measure_output_error", "sqnr_db"]
