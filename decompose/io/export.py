"""Exporting a (decomposed) model to ONNX, a torch.export program (``.pt2``) or TorchScript,
checked against PyTorch before it lands.

    from decompose.io.export import export_onnx, export_pt2, export_torchscript, onnx_latency
    res = export_onnx(model, "model.onnx", input_shape=(3, 32, 32))
    print(res.max_rel_err)                       # onnxruntime vs PyTorch, on seeded random input
    export_pt2(model, "model.pt2", (3, 32, 32))  # torch.export.export + torch.export.save

Every file is *checked* before it lands, and written by :mod:`decompose.io.write` (a temporary
name in the target folder, renamed into place): an export whose outputs differ from PyTorch's by
more than ``tolerance`` raises :class:`~decompose.errors.DecomposeError` and leaves nothing behind,
and an existing file is only replaced with ``force=True``. TorchScript is serialised and checked
in memory (``torch.jit.save`` into a buffer), so a full disk can only fail in the writer, as a
one-line error; torch's own file writer aborts the process on a full disk.

ONNX exporter (measured on torch 2.13, onnx 1.23, onnxruntime 1.32, onnxscript 0.7; see
docs/export.md): the default is torch's TorchScript-based exporter, ``torch.onnx.export(...,
dynamo=False)``. It needs the ``onnx`` package but not ``onnxscript``, takes half a second on a
ResNet-56 and gives a dynamic batch axis directly; torch warns that it is deprecated (that
warning is silenced here). ``dynamo=True`` uses the torch.export-based exporter, which needs
``onnxscript`` and is slower (seconds); use it when the legacy path is gone or fails.

Decoupled layers are plain ``Conv`` nodes in both formats (``conv_dw`` with ``group = C``), so any
ONNX runtime runs them.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.trace import dtype_device, eval_mode, infer_input_shape
from ..errors import DecomposeError
from ..errors import first_line as _first_line
from ..measure.clock import Latency, compare_latency
from .write import atomic_write, check_target, write_bytes

DEFAULT_OPSET = 17         # the TorchScript-based exporter; onnxruntime >= 1.14 runs it
DEFAULT_OPSET_DYNAMO = 18  # the lowest the dynamo exporter writes without a version conversion
DEFAULT_TOLERANCE = 1e-4
INPUT_NAME = "input"


@dataclass
class ExportResult:
    """One exported file and how closely it matches the PyTorch model.

    ``max_abs_err`` is the largest absolute difference of any output element, over the checked
    batch sizes; ``max_rel_err`` the same divided by the largest absolute PyTorch output (None
    when the check was skipped). ``checked_batches`` lists the batch sizes run.
    """

    format: str
    path: str
    input_shape: tuple[int, ...]
    batch_size: int
    exporter: str
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    tolerance: float = DEFAULT_TOLERANCE
    checked_batches: tuple[int, ...] = ()
    opset: int | None = None
    dynamic_batch: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["checked_batches"] = list(self.checked_batches)
        return d


# ----------------------------------------------------------------------------- dependencies
def require_onnxruntime() -> Any:
    """Import onnxruntime, or say how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise DecomposeError("onnxruntime is not installed, so the ONNX file cannot be checked; "
                             "pip install onnxruntime (or 'decompose[onnx]'), or pass --no-check"
                             ) from None
    return onnxruntime


def require_onnx(dynamo: bool = False) -> None:
    """The packages torch's ONNX exporter needs: onnx always, onnxscript for dynamo=True."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise DecomposeError("ONNX export needs the onnx package; pip install onnx "
                             "(or 'decompose[onnx]')") from None
    if dynamo:
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise DecomposeError("the dynamo ONNX exporter needs onnxscript; pip install "
                                 "onnxscript, or leave out --dynamo") from None


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch's notices about the deprecated exporters we call on purpose, and keep
    anything an exporter prints off stdout (where results go). TracerWarnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export")
        with contextlib.redirect_stdout(sys.stderr):
            yield




def example(model: nn.Module, input_shape: tuple[int, ...], batch: int, seed: int = 0
            ) -> torch.Tensor:
    """Seeded standard-normal input of ``(batch, *input_shape)`` in the model's dtype/device."""
    dtype, device = dtype_device(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=g).to(dtype=dtype, device=device)


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    raise DecomposeError(f"the model returns a {type(out).__name__}; export supports models "
                         "that return a tensor or a tuple/list of tensors")


def _resolve_shape(model: nn.Module, input_shape, meta) -> tuple[int, ...]:
    shape, _ = infer_input_shape(model, tuple(input_shape) if input_shape else None, meta)
    return shape


def _check_batch(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DecomposeError(f"batch size must be an integer >= 1, got {batch_size!r}; "
                             "e.g. --batch-size 1")
    return batch_size


def _check_batches(batch_size: int, dynamic: bool) -> tuple[int, ...]:
    """The batch sizes to compare at: the export's, and another one when the axis is dynamic."""
    return (batch_size, 2 if batch_size == 1 else 1) if dynamic else (batch_size,)


class _Errors:
    """Running maximum of absolute error and of the reference's magnitude."""

    def __init__(self) -> None:
        self.abs = 0.0
        self.scale = 0.0

    def add(self, got: list, ref: list[torch.Tensor], what: str) -> None:
        if len(got) != len(ref):
            raise DecomposeError(f"{what} returns {len(got)} outputs, PyTorch {len(ref)}; "
                                 "report this model to the decompose developers")
        for g, r in zip(got, ref):
            g = torch.as_tensor(g).to(torch.float64).cpu()
            r = r.detach().to(torch.float64).cpu()
            if tuple(g.shape) != tuple(r.shape):
                raise DecomposeError(f"{what} output has shape {tuple(g.shape)}, PyTorch "
                                     f"{tuple(r.shape)}; export with --static-batch or check "
                                     "--input-shape")
            if r.numel():
                self.abs = max(self.abs, float((g - r).abs().max()))
                self.scale = max(self.scale, float(r.abs().max()))
            if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(r).all()):
                self.abs = math.inf

    @property
    def rel(self) -> float:
        return self.abs / self.scale if self.scale > 0 else self.abs


def _verify(errors: _Errors, tolerance: float, what: str, hint: str = "") -> None:
    if not errors.rel <= tolerance:
        raise DecomposeError(
            f"{what} differs from PyTorch: max abs error {errors.abs:.3g}, max rel error "
            f"{errors.rel:.3g} > tolerance {tolerance:g}; nothing written. Raise --tolerance if "
            f"that is acceptable{hint}")


_OPSET_CAUSES = ("opset", "unsupportedoperatorerror", "is not supported in", "not supported by "
                 "onnx", "exporting the operator", "unsupported: onnx export")


def _opset_related(e: BaseException) -> bool:
    """Whether an ONNX export or load failure is about the opset (an operator the chosen opset
    lacks, or a version onnxruntime does not run), so that another --opset may help."""
    text = f"{type(e).__name__}: {e}".lower()
    return any(c in text for c in _OPSET_CAUSES)


# ----------------------------------------------------------------------------- ONNX
def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's count),
    one inter-op thread, sequential execution and all graph optimisations."""
    ort = require_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        hint = ("; try another --opset" if _opset_related(e) else
                "; try exporting with or without --dynamo, or check the file")
        raise DecomposeError(f"onnxruntime cannot load {path} ({_first_line(e)}){hint}"
                             ) from None


def _run_session(sess: Any, x: torch.Tensor) -> list:
    return sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})


def _torch_onnx_export(model: nn.Module, x: torch.Tensor, path: str, opset: int | None,
                       dynamic_batch: bool, dynamo: bool) -> None:
    n_out = len(_flat(model(x)))
    outputs = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    kwargs: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=outputs)
    if dynamo:
        if dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        torch.onnx.export(model, (x,), path, dynamo=True, external_data=False, verbose=False,
                          opset_version=opset, **kwargs)
    else:
        if dynamic_batch:
            kwargs["dynamic_axes"] = {n: {0: "batch"} for n in [INPUT_NAME, *outputs]}
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset,
                          do_constant_folding=True, **kwargs)


def _opset_of(path: str) -> int | None:
    try:
        import onnx
        proto = onnx.load(path, load_external_data=False)
        return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    except Exception:
        return None


def export_onnx(model: nn.Module, path: str | os.PathLike,
                input_shape: tuple[int, ...] | None = None, *, batch_size: int = 1,
                opset: int | None = None, dynamic_batch: bool = True,
                dynamo: bool = False, check: bool = True,
                tolerance: float = DEFAULT_TOLERANCE, force: bool = False,
                meta: dict | None = None) -> ExportResult:
    """Write ``model`` as an ONNX file and check it in onnxruntime against PyTorch.

    Args:
        model: any nn.Module taking one tensor; exported in eval mode (its mode is restored).
        path: the ``.onnx`` file to write.
        input_shape: one sample's shape without the batch, e.g. ``(3, 32, 32)``. Default:
            ``model.input_shape``, else ``meta["input_shape"]``, else the first conv's channels at
            224x224 (:func:`decompose.engine.trace.infer_input_shape`).
        batch_size: batch of the example input used to export and check. Default 1.
        opset: ONNX opset. Default (None): 17, or 18 with ``dynamo=True``.
        dynamic_batch: make the batch axis dynamic (then the check also runs another batch
            size). Default True.
        dynamo: use torch's torch.export-based exporter (needs onnxscript) instead of the
            TorchScript-based one. Default False.
        check: run the file in onnxruntime on seeded random input and compare. Default True.
        tolerance: the largest allowed ``max|ort - torch| / max|torch|``. Default 1e-4.
        force: replace an existing file. Default False.
        meta: a decompose file's metadata (for the input shape).

    Raises:
        DecomposeError: missing packages, an existing file without ``force``, an export that
            fails, or outputs over ``tolerance`` (nothing is written then).
    """
    batch_size = _check_batch(batch_size)
    shape = _resolve_shape(model, input_shape, meta)
    opset = int(opset) if opset else (DEFAULT_OPSET_DYNAMO if dynamo else DEFAULT_OPSET)
    require_onnx(dynamo)
    if check:
        require_onnxruntime()
    result = ExportResult("onnx", str(path), shape, batch_size,
                          "torch.onnx.export(dynamo=True)" if dynamo
                          else "torch.onnx.export(dynamo=False)",
                          tolerance=tolerance, dynamic_batch=dynamic_batch)
    # torch.export specialises a batch of 1, so the dynamo path traces with 2 for a dynamic axis
    x = example(model, shape, max(batch_size, 2) if dynamo and dynamic_batch else batch_size)

    def write(tmp: str) -> None:
        with eval_mode(model), torch.no_grad():
            try:
                with _quiet_exporter():
                    _torch_onnx_export(model, x, tmp, opset, dynamic_batch, dynamo)
            except (DecomposeError, OSError):
                raise  # OSError: the writer says what went wrong with the disk
            except Exception as e:
                other = "without --dynamo" if dynamo else "with --dynamo"
                hint = (f"try another --opset or export {other}" if _opset_related(e)
                        else f"try exporting {other}")
                raise DecomposeError(f"ONNX export failed ({type(e).__name__}: "
                                     f"{_first_line(e)}); {hint}") from None
            result.opset = _opset_of(tmp)
            if check:
                sess = ort_session(tmp)
                errors = _Errors()
                for b in _check_batches(batch_size, dynamic_batch):
                    xb = example(model, shape, b, seed=b)
                    errors.add(_run_session(sess, xb), _flat(model(xb)), "the ONNX model")
                result.max_abs_err, result.max_rel_err = errors.abs, errors.rel
                result.checked_batches = _check_batches(batch_size, dynamic_batch)
                _verify(errors, tolerance, "the ONNX model (onnxruntime)",
                        ", or export " + ("without" if dynamo else "with") + " --dynamo")

    result.path = str(atomic_write(path, write, force))
    return result


# ----------------------------------------------------------------------------- torch.export
def export_pt2(model: nn.Module, path: str | os.PathLike,
               input_shape: tuple[int, ...] | None = None, *, batch_size: int = 1,
               dynamic_batch: bool = True, check: bool = True,
               tolerance: float = DEFAULT_TOLERANCE, force: bool = False,
               meta: dict | None = None) -> ExportResult:
    """Write ``model`` as a ``torch.export`` program (``.pt2``): ``torch.export.export`` then
    ``torch.export.save``; ``torch.export.load(path).module()`` runs it without our code.

    The program is saved into memory, loaded back from those bytes and run at ``batch_size``
    and, with a dynamic batch axis, at another batch size, compared with the model within
    ``tolerance``; only then is it written (:mod:`decompose.io.write`). A batch of 1 is
    specialised by torch.export, so a dynamic axis is traced at batch 2. Other arguments as in
    :func:`export_onnx`.

    Raises:
        DecomposeError: an existing file without ``force``, an export that fails (the first
            line of torch's reason), or outputs over ``tolerance``; nothing is written then.
    """
    batch_size = _check_batch(batch_size)
    shape = _resolve_shape(model, input_shape, meta)
    result = ExportResult("pt2", str(path), shape, batch_size, "torch.export.export",
                          tolerance=tolerance, dynamic_batch=dynamic_batch)
    check_target(path, force)
    x = example(model, shape, max(batch_size, 2) if dynamic_batch else batch_size)
    with eval_mode(model), torch.no_grad():
        buf = io.BytesIO()
        try:
            with _quiet_exporter():
                dyn = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
                program = torch.export.export(model, (x,), dynamic_shapes=dyn)
                torch.export.save(program, buf)
        except Exception as e:
            hint = ""
            text = f"{type(e).__name__} {e}".lower()
            if dynamic_batch and ("constraint" in text or "dynamic" in text
                                  or "specializ" in text or "guard" in text):
                hint = "; the batch axis may not be dynamic in this model: try --static-batch"
            raise DecomposeError(f"torch.export failed ({type(e).__name__}: "
                                 f"{_first_line(e)}){hint}") from None
        data = buf.getvalue()
        if check:
            with _quiet_exporter():
                loaded = torch.export.load(io.BytesIO(data)).module()
            errors = _Errors()
            batches = _check_batches(batch_size, dynamic_batch)
            for b in batches:
                xb = example(model, shape, b, seed=b)
                try:
                    got = loaded(xb)
                except Exception as e:
                    raise DecomposeError(f"the torch.export program fails at batch {b} "
                                         f"({type(e).__name__}: {_first_line(e)}); export with "
                                         "--static-batch") from None
                errors.add(_flat(got), _flat(model(xb)), "the torch.export program")
            result.max_abs_err, result.max_rel_err = errors.abs, errors.rel
            result.checked_batches = batches
            _verify(errors, tolerance, "the torch.export program")
    result.path = str(write_bytes(path, data, force))
    return result


# ----------------------------------------------------------------------------- TorchScript
def export_torchscript(model: nn.Module, path: str | os.PathLike,
                       input_shape: tuple[int, ...] | None = None, *, batch_size: int = 1,
                       method: str = "trace", check: bool = True,
                       tolerance: float = DEFAULT_TOLERANCE, force: bool = False,
                       meta: dict | None = None) -> ExportResult:
    """Write ``model`` as a TorchScript file (``torch.jit.load`` reads it without our code).

    Args:
        method: ``"trace"`` (records one forward on the example input; works for any model
            without data-dependent control flow) or ``"script"`` (compiles ``forward``; keeps
            control flow but needs scriptable code). Default ``"trace"``.
        check: load the written file back and compare at ``batch_size`` and another batch size.
            Default True.
        Other arguments as in :func:`export_onnx`.

    Note: TorchScript is deprecated in the PyTorch used here (torch 2.13 marks ``torch.jit``
    so); it still works and is what libtorch (C++) loads, but :func:`export_pt2` is its
    successor. The notice is silenced here.
    """
    if method not in ("trace", "script"):
        raise DecomposeError(f"method must be 'trace' or 'script', got {method!r}")
    batch_size = _check_batch(batch_size)
    shape = _resolve_shape(model, input_shape, meta)
    result = ExportResult("torchscript", str(path), shape, batch_size, f"torch.jit.{method}",
                          tolerance=tolerance, dynamic_batch=True)
    x = example(model, shape, batch_size)
    check_target(path, force)
    with eval_mode(model), torch.no_grad():
        buf = io.BytesIO()
        try:
            with _quiet_exporter():
                ts = torch.jit.trace(model, x) if method == "trace" else torch.jit.script(model)
                torch.jit.save(ts, buf)
        except Exception as e:
            other = "script" if method == "trace" else "trace"
            raise DecomposeError(f"TorchScript {method} failed ({type(e).__name__}: "
                                 f"{_first_line(e)}); try method={other!r}") from None
        data = buf.getvalue()
        if check:
            with _quiet_exporter():
                loaded = torch.jit.load(io.BytesIO(data), map_location=x.device)
            errors = _Errors()
            for b in _check_batches(batch_size, True):
                xb = example(model, shape, b, seed=b)
                errors.add(_flat(loaded(xb)), _flat(model(xb)), "the TorchScript model")
            result.max_abs_err, result.max_rel_err = errors.abs, errors.rel
            result.checked_batches = _check_batches(batch_size, True)
            _verify(errors, tolerance, "the TorchScript model")
    result.path = str(write_bytes(path, data, force))
    return result


# ----------------------------------------------------------------------------- latency
def onnx_latency(paths: Mapping[str, str | os.PathLike], input_shape: tuple[int, ...], *,
                 batch_size: int = 1, threads: int | None = None, repeats: int = 30,
                 warmup: int = 3, timer: Callable[[], float] | None = None
                 ) -> dict[str, Latency]:
    """onnxruntime latency of several ONNX files, side by side.

    Each file gets a CPU session with ``threads`` intra-op threads (default: torch's thread
    count) and one inter-op thread; the sessions are timed in alternating rounds on the same
    seeded float32 input by :func:`decompose.measure.clock.compare_latency`, and the medians compared.

    ``timer`` defaults to wall-clock :func:`time.perf_counter`. On a machine shared with other
    jobs, ``threads=1`` with ``timer=time.thread_time`` (CPU time of the calling thread, which
    runs the whole graph when there is one intra-op thread) leaves out the time the scheduler
    gives to other processes.

    Returns:
        name -> :class:`~decompose.measure.clock.Latency` (``threads`` is the intra-op count used).
    """
    batch_size = _check_batch(batch_size)
    n = int(threads or torch.get_num_threads())
    x = torch.randn(batch_size, *input_shape,
                    generator=torch.Generator().manual_seed(0)).numpy()
    runners = {}
    for name, p in paths.items():
        sess = ort_session(p, n)
        feed_name = sess.get_inputs()[0].name
        runners[name] = _Runner(sess, feed_name)
    extra = {"timer": timer} if timer is not None else {}
    return compare_latency(runners, x, repeats=repeats, warmup=warmup, threads=n, **extra)


class _Runner:
    """A session as a one-argument callable (what compare_latency times)."""

    def __init__(self, sess: Any, input_name: str) -> None:
        self.sess, self.input_name = sess, input_name

    def __call__(self, x: Any) -> Any:
        return self.sess.run(None, {self.input_name: x})


@contextlib.contextmanager
def temporary_onnx(model: nn.Module, input_shape: tuple[int, ...], **kwargs: Any
                   ) -> Iterator[ExportResult]:
    """Export ``model`` to a checked ONNX file in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="decompose-") as d:
        yield export_onnx(model, Path(d) / "model.onnx", input_shape, **kwargs)


__all__ = ["ExportResult", "export_onnx", "export_pt2", "export_torchscript", "onnx_latency",
           "ort_session",
           "require_onnx", "require_onnxruntime", "temporary_onnx"]
