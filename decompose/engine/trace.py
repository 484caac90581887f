"""Counting what a model costs: parameters, multiply-adds (by forward hooks), layer shapes.

Multiply-adds (MACs) count convolutions (regular and transposed) and linear layers, one per
weight use per output element: ``out_channels * in_channels/groups * K * output_pixels`` for a
conv, ``in_channels * out_channels/groups * K * input_pixels`` for a transposed conv (every
input element times every tap; see :func:`decompose.methods.convs.conv_macs`). Biases,
normalisation, activations and pooling are not counted. They depend on the input size, so every
count takes one sample's ``input_shape`` (no batch dimension) and runs one forward pass.

That pass runs on PyTorch's ``meta`` device: a copy of the model whose tensors have shapes and
dtypes but no data, fed a meta input, so counting a 3x4000x4000 input allocates no activations
at all. A model that cannot run on meta tensors (data-dependent control flow, tensors created
on the CPU inside ``forward``) is run for real on zeros instead, but only for inputs of at most
:data:`REAL_TRACE_MAX_ELEMENTS` elements; a larger input is then a one-line error.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import re
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DecomposeError, first_line
from ..methods.convs import CONV_TYPES, conv_macs, is_factorizable


@dataclass
class Call:
    """Shapes one module saw on its first call during a trace (batch dimension included)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int = 1
    #: called with more than its input (e.g. a transposed conv's ``output_size``)
    extra_args: bool = False


def linear_macs(lin: nn.Linear, out_shape: tuple[int, ...]) -> int:
    rows = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
    return lin.in_features * lin.out_features * rows


def fx_defaults(module: nn.Module) -> dict[str, object] | None:
    """The defaults of ``module.forward``'s parameters after the input, for ``torch.fx``'s
    ``concrete_args``: the graph is then traced as ``module(x)`` runs, so a flag such as
    ``forward(x, embed=False)`` that steers an ``if`` no longer stops the trace (fx cannot
    branch on a placeholder). Only plain values (None, bool, int, float, str) are fixed; None
    when there is nothing to fix."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a forward without a readable signature
        return None
    fixed = {p.name: p.default for p in params
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and (p.default is None or type(p.default) in (bool, int, float, str))}
    return fixed or None


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block; the flags are restored after."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training


def dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating-point parameter (float32 on the CPU
    for a model without one)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        return torch.float32, torch.device("cpu")
    return p.dtype, p.device


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without one)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def example_input(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(batch, *input_shape, dtype=dtype, device=device)


REAL_TRACE_MAX_ELEMENTS = 1 << 24  # 16M input elements (64 MB as float32)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the meta device (no data is
    copied; other attributes are deep-copied as usual)."""
    memo: dict[int, object] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        m = t.detach().to("meta")
        if isinstance(t, nn.Parameter):
            m = nn.Parameter(m, requires_grad=t.requires_grad)
        memo[id(t)] = m
    return copy.deepcopy(model, memo)


def _record(model: nn.Module, input_shape: tuple[int, ...], want) -> dict[str, Call]:
    seen: dict[str, Call] = {}
    handles = []

    def hook(name: str):
        def fn(mod, inputs, kwargs, output):
            extra = len(inputs) > 1 or any(v is not None for v in kwargs.values())
            if name in seen:
                seen[name].calls += 1
                seen[name].extra_args |= extra
                return
            x = inputs[0] if inputs else None
            seen[name] = Call(tuple(x.shape) if isinstance(x, torch.Tensor) else (),
                              tuple(output.shape) if isinstance(output, torch.Tensor) else (),
                              extra_args=extra)
        return fn

    for name, m in model.named_modules():
        if want(m):
            handles.append(m.register_forward_hook(hook(name), with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input(model, input_shape))
    finally:
        for h in handles:
            h.remove()
    return seen


def trace(model: nn.Module, input_shape: tuple[int, ...],
          want=lambda m: is_factorizable(m) or isinstance(m, nn.Linear)) -> dict[str, Call]:
    """Run one sample through ``model`` and record the shapes each wanted module saw: on the
    meta device when the model runs there (no activations allocated), else for real on zeros
    (inputs up to :data:`REAL_TRACE_MAX_ELEMENTS` elements); see the module docs."""
    shape = ",".join(map(str, input_shape))
    try:
        ghost = meta_copy(model)
    except Exception:  # noqa: BLE001 - an uncopyable model is traced for real
        ghost = None
    if ghost is not None:
        try:
            return _record(ghost, input_shape, want)
        except DecomposeError:
            raise
        except Exception:  # noqa: BLE001 - not runnable on meta tensors: try for real below
            pass
    if math.prod(input_shape) > REAL_TRACE_MAX_ELEMENTS:
        raise DecomposeError(
            f"this model cannot be traced on meta tensors, and input shape {shape} is too large "
            f"to run for real just to count multiply-adds (more than {REAL_TRACE_MAX_ELEMENTS} "
            "elements); pass a smaller --input-shape")
    try:
        return _record(model, input_shape, want)
    except DecomposeError:
        raise
    except Exception as e:
        raise DecomposeError(f"the model fails on input shape {shape} ({type(e).__name__}: "
                             f"{first_line(e, 160)}){_remedy(e, model, input_shape)}") from None


#: what a shape mismatch says, in torch's and the common libraries' words
_SHAPE_ERROR = re.compile(
    r"shape|size mismatch|sizes? of tensors|must match the size|size of tensor|input size|"
    r"kernel size|padded input|channels|dimension|\bdims?\b|mat1 and mat2|\d+d input|"
    r"expected .*input|to be of length|unpack|view size|invalid for input of size|"
    r"out of bounds|out of range", re.IGNORECASE)


def is_shape_error(e: BaseException) -> bool:
    """Whether a failure of the model's forward looks like a mismatch between the input's shape
    and what the model expects (then another ``--input-shape`` may help; otherwise it would
    not)."""
    return isinstance(e, (RuntimeError, ValueError, IndexError, AssertionError)) and bool(
        _SHAPE_ERROR.search(f"{e}"))


def shape_flag(model: nn.Module | None = None, input_shape: tuple[int, ...] | None = None) -> str:
    """``--input-shape C,L`` / ``C,H,W`` / ``C,D,H,W``: the flag's form for this model's first
    conv (or for a shape of that many axes)."""
    dim = None
    if model is not None:
        dim = next((len(m.kernel_size) for m in model.modules() if is_factorizable(m)), None)
    if dim is None and input_shape is not None:
        dim = len(input_shape) - 1
    return "--input-shape " + {1: "C,L", 2: "C,H,W", 3: "C,D,H,W"}.get(dim or 2, "C,H,W")


def _remedy(e: BaseException, model: nn.Module, input_shape: tuple[int, ...]) -> str:
    if is_shape_error(e):
        return f"; pass the shape it takes with {shape_flag(model, input_shape)}"
    return "; decompose runs the model on one tensor of this shape, so it must run on that"


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Independent MAC count of a whole model by forward hooks (every call counted)."""
    return macs_from_trace(model, trace(model, input_shape))


def macs_from_trace(model: nn.Module, shapes: dict[str, Call]) -> int:
    """Sum of conv and linear MACs over the calls a :func:`trace` recorded."""
    total = 0
    for name, call in shapes.items():
        m = model.get_submodule(name)
        one = (conv_macs(m, call.out_shape, call.in_shape) if is_factorizable(m)
               else linear_macs(m, call.out_shape))
        total += one * call.calls
    return total


def calls_for(module: nn.Module, x: torch.Tensor, min_ms: float) -> int:
    """How many calls make one timed sample last at least ``min_ms`` (1 to 1000)."""
    with torch.inference_mode():
        module(x)
        t0 = time.perf_counter()
        module(x)
        ms = (time.perf_counter() - t0) * 1e3
    return max(1, min(1000, math.ceil(min_ms / max(ms, 1e-4))))


def capture_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The input each named submodule receives when ``model(x)`` runs (first call, cloned)."""
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(mod, inputs):
            if name not in seen:
                seen[name] = inputs[0].detach().clone()
        return fn

    for n in names:
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        with eval_mode(model), torch.inference_mode():
            model(x)
    except DecomposeError:
        raise
    except Exception as e:
        shape = "x".join(map(str, x.shape[1:]))
        raise DecomposeError(f"the model fails on a batch of {shape} inputs ({first_line(e, 160)});"
                             " check the input shape and that the model runs") from None
    finally:
        for h in handles:
            h.remove()
    return seen


DEFAULT_SPATIAL = {1: (1024,), 2: (224, 224), 3: (16, 112, 112)}

#: The sizes a default input shape tries, in order, for a model whose first layer is a conv of
#: that dimension (one sample: channels, then these): the first the model runs on is taken.
#: Common audio lengths and frames (16000 samples, Whisper's 3000 frames), image and video
#: sizes; numbers named in a failure's message (e.g. "expects ... length 3000") are tried too.
PROBE_SIZES = {1: ((1024,), (16000,), (3000,), (4096,), (256,), (64,)),
               2: ((224, 224), (32, 32), (256, 256), (64, 64), (28, 28), (512, 512)),
               3: ((16, 112, 112), (32, 64, 64), (64, 64, 64), (32, 32, 32), (96, 96, 96),
                   (128, 128, 128))}

_GUESSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _valid_shape(shape: object) -> bool:
    return (isinstance(shape, (list, tuple, torch.Size)) and 1 <= len(shape) <= 5
            and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 1 << 20
                    for s in shape))


def _probe(model: nn.Module, shape: tuple[int, ...]) -> BaseException | None:
    """None when ``model`` runs on one sample of ``shape`` (on meta tensors where it can, else
    for real on zeros for small inputs), else the exception."""
    try:
        ghost = meta_copy(model)
        _record(ghost, shape, lambda m: False)
        return None
    except Exception as e:  # noqa: BLE001 - a failure is the answer
        err: BaseException = e
    if math.prod(shape) <= REAL_TRACE_MAX_ELEMENTS:
        try:
            _record(model, shape, lambda m: False)
            return None
        except Exception as e:  # noqa: BLE001
            err = e if is_shape_error(e) or not is_shape_error(err) else err
    return err


def _named_sizes(e: BaseException, dim: int) -> list[tuple[int, ...]]:
    """Sizes a failure's message names (``"expects ... length 3000"``), as candidates."""
    nums = [int(n) for n in re.findall(r"(?<![\w.])(\d{2,6})(?![\w.])", str(e))]
    out = []
    for n in nums:
        if 8 <= n <= 1 << 17 and (n,) * dim not in out:
            out.append((n,) * dim)
    return out[:4]


def guess_input_shape(model: nn.Module) -> tuple[int, ...]:
    """One sample's shape for a model that does not say: from its first layer, the first of
    :data:`PROBE_SIZES` it runs on (a conv with one input channel is also tried without the
    channel axis, as raw-audio models take ``(N, L)``); else a one-line error naming the flag."""
    hit = _GUESSES.get(model)
    if hit is not None:
        return hit
    first = next((m for m in model.modules() if is_factorizable(m) or isinstance(m, nn.Linear)),
                 None)
    if first is None:
        raise DecomposeError("cannot tell this model's input shape (it has no conv or linear "
                             "layer); pass --input-shape, e.g. 3,32,32")
    if isinstance(first, nn.Linear):
        shapes = [(first.in_features,)]
        dim = 0
    else:
        dim = len(first.kernel_size)
        c = first.in_channels
        shapes = [(c, *s) for s in PROBE_SIZES[dim]]
        if c == 1 and dim == 1:  # raw audio: (N, L), the model adds the channel axis
            shapes = [s for pair in zip(shapes, [s[1:] for s in shapes]) for s in pair]
    tried: list[tuple[int, ...]] = []
    first_error: BaseException | None = None
    while shapes:
        shape = shapes.pop(0)
        if shape in tried:
            continue
        tried.append(shape)
        err = _probe(model, shape)
        if err is None:
            _GUESSES[model] = shape
            return shape
        if isinstance(err, DecomposeError):
            raise err
        if not is_shape_error(err):  # another size would not help: say what failed
            where = ",".join(map(str, shape))
            raise DecomposeError(f"the model fails on one input of shape {where} "
                                 f"({type(err).__name__}: {first_line(err, 160)}); decompose "
                                 "runs the model on one tensor, so it must run on that")
        if first_error is None:
            first_error = err
        if dim:
            shapes += [(shape[0], *n) if len(shape) == dim + 1 else n
                       for n in _named_sizes(err, dim) if len(tried) + len(shapes) < 16]
    flag = shape_flag(model) if dim else "--input-shape N"
    shown = ", ".join(",".join(map(str, s)) for s in tried[:4]) + (", ..." if len(tried) > 4
                                                                   else "")
    why = f"{type(first_error).__name__}: {first_line(first_error, 120)}" if first_error else ""
    raise DecomposeError(f"cannot guess this model's input shape: it fails on {shown} ({why}); "
                         f"pass the shape it takes with {flag}")


def infer_input_shape(model: nn.Module, given: tuple[int, ...] | None = None,
                      meta: dict | None = None) -> tuple[tuple[int, ...], str]:
    """One sample's input shape and where it came from.

    Order: ``given`` (``--input-shape``), ``model.input_shape`` (set by decompose's own models and
    any user model that defines it), a decompose file's recorded shape, else a guess from the
    first conv (its input channels, and the first size of :data:`PROBE_SIZES` the model runs on;
    :func:`guess_input_shape`), source ``"default"``.
    """
    if given:
        return tuple(given), "given"
    own = getattr(model, "input_shape", None)
    if own:
        if not _valid_shape(own):
            raise DecomposeError(f"the model's input_shape attribute ({str(own)[:40]}) is not a "
                                 f"list of positive integers; pass {shape_flag(model)}")
        return tuple(int(s) for s in own), "model.input_shape"
    if meta and meta.get("input_shape"):
        if not _valid_shape(meta["input_shape"]):
            raise DecomposeError("the file's recorded input_shape is not a list of positive "
                                 f"integers; pass {shape_flag(model)}")
        return tuple(meta["input_shape"]), "file"
    return guess_input_shape(model), "default"


__all__ = ["CONV_TYPES", "PROBE_SIZES", "REAL_TRACE_MAX_ELEMENTS", "Call", "conv_macs",
           "count_macs", "example_input", "guess_input_shape", "infer_input_shape",
           "is_shape_error", "meta_copy", "param_count", "shape_flag", "trace"]
