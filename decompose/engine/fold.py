"""Folding a BatchNorm into the convolution that feeds it.

In eval mode ``BN(conv(x))`` is a per-output-channel affine map of the conv output::

    s = gamma / sqrt(running_var + eps)                  (gamma = 1, beta = 0 when affine=False)
    BN(conv(x)) = conv'(x)  with  W' = W * s[o],  b' = (b - running_mean) * s + beta

so the BN can be removed (replaced by ``nn.Identity``) after rewriting the conv's weight and bias.
Decoupling the folded kernel approximates exactly what the next layer sees, which is what the
authors of Network Decoupling do (see docs/bn-folding.md for measurements). Regular and
transposed convs (1-D, 2-D, 3-D) both fold.

Which BNs are folded is decided on the model's ``torch.fx`` graph, never on module names: a BN
is folded only when its one input is the output of a conv and nothing else reads that output,
and when both modules are called exactly once. A BN after anything else, a conv whose output
also feeds a shortcut, a module shared between call sites, a BN without running statistics
(``track_running_stats=False``), weight-parametrized convs (``weight_norm``) and convs or BNs
whose class overrides ``forward`` are left alone, each with its reason.

A model that ``torch.fx`` cannot trace (data-dependent control flow, as in most Hugging Face
models) is run once instead, on a seeded random batch of its input shape, with forward hooks
recording which conv's output tensor each BN receives; those pairs are folded, and the folded
model is run again on the same batch: every fold is kept only if the outputs stay the same
(relative error at most :data:`CHECK_TOLERANCE`), else the pairs are checked one by one and the
ones that change the outputs (a conv output also read by code outside the hooks' view) are
undone. Nothing needs a warning then: what is folded was checked. A model without BatchNorm is
left alone without tracing anything.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import DecomposeError, first_line
from ..methods import conv_prefix, helper_modules
from ..methods.convs import is_factorizable, transposed
from .surgery import replace_module
from .trace import fx_defaults

_BN = nn.modules.batchnorm._BatchNorm

#: largest relative output change allowed when folds found by forward hooks are checked
CHECK_TOLERANCE = 1e-4


def _parametrized(m: nn.Module) -> bool:
    """A module whose weight is computed from other parameters (``torch.nn.utils.
    parametrize``, or the old ``weight_norm`` / ``spectral_norm`` hooks)."""
    if torch.nn.utils.parametrize.is_parametrized(m):
        return True
    return any(type(h).__name__ in ("WeightNorm", "SpectralNorm")
               for h in m._forward_pre_hooks.values())


def _plain_conv(m: nn.Module) -> bool:
    """A Conv1d/2d/3d or ConvTranspose1d/2d/3d (subclasses too) whose forward is torch's own,
    or a known 'same'-padding subclass (:func:`decompose.methods.conv_prefix`), with a plain
    weight: W and b enter its output only through the convolution, so a BN after it folds into
    them."""
    return (is_factorizable(m)
            and conv_prefix(m)[0]
            and not isinstance(m.weight, nn.parameter.UninitializedParameter)
            and not _parametrized(m))


def _why_not_conv(m: nn.Module) -> str:
    """Why a conv that feeds a BN cannot take it."""
    if not conv_prefix(m)[0]:
        return f"its conv's class {type(m).__name__} overrides forward"
    if _parametrized(m):
        return "its conv is weight-parametrized (weight_norm)"
    return "its conv has no initialised weight"


def _foldable_bn(m: nn.Module) -> bool:
    """A BatchNorm with running statistics whose forward is torch's own."""
    return (isinstance(m, _BN)
            and type(m).forward in (_BN.forward, nn.SyncBatchNorm.forward)
            and m.running_mean is not None and m.running_var is not None
            and not isinstance(m.running_mean, nn.parameter.UninitializedBuffer))


def _why_not_bn(m: nn.Module) -> str:
    if type(m).forward not in (_BN.forward, nn.SyncBatchNorm.forward):
        return f"its class {type(m).__name__} overrides forward"
    return "no running statistics (track_running_stats=False)"


@dataclass
class FoldResult:
    """What :func:`fold_bn_` did: the (conv, BN) pairs folded, and every BatchNorm left with
    the reason. ``how`` is ``"fx"`` (the torch.fx graph), ``"hooks"`` (a forward pass with
    hooks, every fold checked on a random batch) or ``"none"`` (no BatchNorm)."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    how: str = "none"
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"how": self.how, "bns": len(self.folded) + len(self.left),
                             "folded": [list(p) for p in self.folded], "left": dict(self.left)}
        if self.note:
            d["note"] = self.note
        return d


class _Tracer(fx.Tracer):
    """fx's tracer, with plain convs and BNs as leaves even when their class is the user's, and
    factorized layers and the methods' helper modules too (e.g. the dw1 form's channel moves
    branch on the memory layout, which fx cannot trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (_plain_conv(m) or _foldable_bn(m) or isinstance(m, helper_modules())
                or super().is_leaf_module(m, qualname))


def _trace(module: nn.Module) -> fx.Graph:
    return _Tracer().trace(module, concrete_args=fx_defaults(module))


def _bns(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BN)}


def _fx_pairs(model: nn.Module, graph: fx.Graph) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The foldable (conv, BN) pairs of a traced model, and why each other BN is left."""
    pairs: list[tuple[str, str]] = []
    left: dict[str, str] = {}
    calls: Counter[int] = Counter()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(model.get_submodule(node.target))] += 1
    seen: set[int] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if not isinstance(bn, _BN) or id(bn) in seen:
            continue
        seen.add(id(bn))
        name = node.target
        src = node.args[0] if node.args else None
        why = None
        if not _foldable_bn(bn):
            why = _why_not_bn(bn)
        elif len(node.args) != 1 or node.kwargs:
            why = "called with more than its input"
        elif calls[id(bn)] != 1:
            why = f"called {calls[id(bn)]} times per forward pass (shared module)"
        elif not (isinstance(src, fx.Node) and src.op == "call_module"):
            what = src.target if isinstance(src, fx.Node) else type(src).__name__
            what = getattr(what, "__name__", what)
            why = f"its input is not a conv's output (it comes from {what})"
        else:
            conv = model.get_submodule(src.target)
            if not is_factorizable(conv):
                why = (f"its input is not a conv's output (it comes from {src.target}, a "
                       f"{type(conv).__name__})")
            elif not _plain_conv(conv):
                why = _why_not_conv(conv)
            elif conv.out_channels != bn.num_features:
                why = (f"its conv {src.target} has {conv.out_channels} channels, the BN "
                       f"{bn.num_features}")
            elif len(src.users) != 1:
                why = f"the output of {src.target} is also read elsewhere"
            elif calls[id(conv)] != 1:
                why = f"its conv {src.target} is called {calls[id(conv)]} times per forward pass"
            else:
                pairs.append((src.target, name))
        if why:
            left[name] = why
    for name, bn in _bns(model).items():
        if id(bn) not in seen:
            left[name] = "not called in the forward pass"
    return pairs, left


# --------------------------------------------------------------------------- hooks


def _example(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2,
             seed: int = 0) -> torch.Tensor:
    from .trace import dtype_device
    dtype, device = dtype_device(model)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=g).to(dtype=dtype, device=device)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    from .check import _tensors
    from .trace import eval_mode
    with eval_mode(model), torch.no_grad():
        return [t.detach().clone() for t in _tensors(model(x))]


def _hook_pairs(model: nn.Module, x: torch.Tensor
                ) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Candidate (conv, BN) pairs from one forward pass: the BN's one input is the very tensor a
    conv returned, and both were called once. Not proof that nothing else reads that tensor
    (:func:`fold_bn_` checks the outputs)."""
    from .trace import eval_mode
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(tensor) -> (conv name, tensor)
    conv_calls: Counter[str] = Counter()
    bn_calls: Counter[str] = Counter()
    bn_input: dict[str, tuple[object, bool]] = {}
    handles = []

    def on_conv(name):
        def fn(mod, args, out):
            conv_calls[name] += 1
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)  # the tensor is kept: its id stays unique
        return fn

    def on_bn(name):
        def fn(mod, args, kwargs):
            bn_calls[name] += 1
            if name not in bn_input:
                x0 = args[0] if args else None
                hit = produced.get(id(x0)) if isinstance(x0, torch.Tensor) else None
                bn_input[name] = (hit[0] if hit is not None and hit[1] is x0 else None,
                                  len(args) != 1 or bool(kwargs))
        return fn

    bns = _bns(model)
    for name, m in model.named_modules():
        if is_factorizable(m):
            handles.append(m.register_forward_hook(on_conv(name)))
        elif name in bns:
            handles.append(m.register_forward_pre_hook(on_bn(name), with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    pairs: list[tuple[str, str]] = []
    left: dict[str, str] = {}
    taken: Counter[str] = Counter(src for src, _ in bn_input.values() if src)
    for name, bn in bns.items():
        if name not in bn_input:
            left[name] = "not called in the forward pass"
            continue
        src, extra = bn_input[name]
        conv = model.get_submodule(src) if src else None
        if not _foldable_bn(bn):
            left[name] = _why_not_bn(bn)
        elif extra:
            left[name] = "called with more than its input"
        elif bn_calls[name] != 1:
            left[name] = f"called {bn_calls[name]} times per forward pass (shared module)"
        elif conv is None:
            left[name] = "its input is not a conv's output"
        elif not _plain_conv(conv):
            left[name] = _why_not_conv(conv)
        elif conv.out_channels != bn.num_features:
            left[name] = (f"its conv {src} has {conv.out_channels} channels, the BN "
                          f"{bn.num_features}")
        elif conv_calls[src] != 1:
            left[name] = f"its conv {src} is called {conv_calls[src]} times per forward pass"
        elif taken[src] != 1:
            left[name] = f"the output of {src} is also read by another BatchNorm"
        else:
            pairs.append((src, name))
    return pairs, left


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return math.inf
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.double().pow(2).sum()) for w in want)
    if not math.isfinite(num):
        return math.inf
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else math.inf)


class _Undo:
    """Fold pairs in place, remembering how to put each back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: dict[tuple[str, str], tuple] = {}

    def fold(self, pair: tuple[str, str]) -> None:
        conv_name, bn_name = pair
        conv, bn = self.model.get_submodule(conv_name), self.model.get_submodule(bn_name)
        self.saved[pair] = (conv.weight.detach().clone(),
                            None if conv.bias is None else conv.bias.detach().clone(), bn)
        _fold_pair(self.model, conv_name, bn_name)

    def undo(self, pair: tuple[str, str]) -> None:
        conv_name, bn_name = pair
        w, b, bn = self.saved.pop(pair)
        conv = self.model.get_submodule(conv_name)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is None:
                conv.bias = None
            else:
                conv.bias.copy_(b)
        replace_module(self.model, bn_name, bn)


def _checked_folds(model: nn.Module, pairs: list[tuple[str, str]], x: torch.Tensor,
                   left: dict[str, str]) -> list[tuple[str, str]]:
    """Fold ``pairs`` in place, keeping only those that leave the outputs on ``x`` unchanged;
    the others are undone and get their reason in ``left``."""
    if not pairs:
        return []
    want = _outputs(model, x)
    undo = _Undo(model)
    for p in pairs:
        undo.fold(p)
    if _rel(_outputs(model, x), want) <= CHECK_TOLERANCE:
        return list(pairs)
    for p in reversed(pairs):
        undo.undo(p)
    kept: list[tuple[str, str]] = []
    for p in pairs:  # one by one, on top of those already kept
        undo.fold(p)
        err = _rel(_outputs(model, x), want)
        if err <= CHECK_TOLERANCE:
            kept.append(p)
        else:
            undo.undo(p)
            left[p[1]] = (f"folding it into {p[0]} changed the model's outputs (relative "
                          f"error {err:.1e}): the conv's output is also read elsewhere")
    return kept


def _analyse(model: nn.Module, input_shape: tuple[int, ...] | None, example: Any = None
             ) -> tuple[str, list[tuple[str, str]], dict[str, str], torch.Tensor | None, str]:
    """(how, candidate pairs, reasons for the other BNs, the input to check them on, note)."""
    try:
        graph = _trace(model)
    except Exception as e:  # symbolic tracing raises many kinds of errors
        note = (f"{type(model).__name__} does not trace with torch.fx "
                f"({type(e).__name__}: {first_line(e, 100)}); ")
    else:
        pairs, left = _fx_pairs(model, graph)
        return "fx", pairs, left, None, ""
    x = example
    if x is None:
        from .trace import REAL_TRACE_MAX_ELEMENTS, infer_input_shape
        try:
            shape, _ = infer_input_shape(model, input_shape)
        except DecomposeError as e:
            return "hooks", [], {}, None, note + f"and its input shape is unknown ({e})"
        if math.prod(shape) > REAL_TRACE_MAX_ELEMENTS:
            return "hooks", [], {}, None, note + "and its input is too large to run for folding"
        x = _example(model, shape)
    try:
        pairs, left = _hook_pairs(model, x)
    except Exception as e:  # noqa: BLE001 - a model that does not run folds nothing
        return "hooks", [], {}, None, note + (f"and it fails on a random input "
                                              f"({type(e).__name__}: {first_line(e, 100)})")
    return "hooks", pairs, left, x, note + "folded what a forward pass with hooks showed, "         "each fold checked on a random batch"


def find_conv_bn_pairs(model: nn.Module, input_shape: tuple[int, ...] | None = None, *,
                       example: torch.Tensor | None = None) -> list[tuple[str, str]]:
    """The (conv name, BN name) pairs the model's structure allows folding; the model is
    unchanged. From the ``torch.fx`` graph; for a model fx cannot trace, from one forward pass
    with hooks on ``example`` (else a seeded random batch of ``input_shape``, or of the shape
    :func:`decompose.engine.trace.infer_input_shape` finds), *not* checked: :func:`fold_bn_`
    checks every such fold on the outputs."""
    if not _bns(model):
        return []
    return _analyse(model, input_shape, example)[1]


def fold_bn_(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> FoldResult:
    """Fold every BatchNorm that only consumes a conv's output into that conv, in place, and say
    what happened to every BatchNorm (:class:`FoldResult`).

    Each folded conv gets ``W' = W * s``, ``b' = (b - running_mean) * s + beta`` with
    ``s = gamma / sqrt(running_var + eps)`` per output channel, and the BN is replaced by
    ``nn.Identity``. The result equals the original model *in eval mode* (to float rounding); in
    train mode the BNs would have normalised with batch statistics, which a folded model no longer
    does, so fold a model that is done training.

    Which pairs are folded is read from the ``torch.fx`` graph; for a model that does not trace,
    from a forward pass with hooks on a random batch of ``input_shape`` (default: inferred),
    every fold then checked on the model's outputs (see the module docstring). Never raises for
    a model without BatchNorm.
    """
    bns = _bns(model)
    if not bns:
        return FoldResult(how="none", note="the model has no BatchNorm")
    how, pairs, left, x, note = _analyse(model, input_shape)
    if how == "fx":
        for conv_name, bn_name in pairs:
            _fold_pair(model, conv_name, bn_name)
        folded = pairs
    else:
        folded = _checked_folds(model, pairs, x, left) if x is not None else []
    if x is None and how == "hooks":
        for name in bns:
            left.setdefault(name, "not analysed: " + note.split("; ", 1)[-1])
    return FoldResult(folded, left, how, note or None)


def _fold_pair(model: nn.Module, conv_name: str, bn_name: str) -> None:
    fold_into_conv_(model.get_submodule(conv_name), model.get_submodule(bn_name))
    ident = nn.Identity()
    ident.train(model.get_submodule(bn_name).training)
    replace_module(model, bn_name, ident)


@torch.no_grad()
def fold_into_conv_(conv: nn.Module, bn: nn.Module) -> None:
    """Rewrite ``conv`` so that ``conv(x)`` equals ``bn(conv(x))`` with ``bn`` in eval mode.

    The arithmetic is done in float64 and cast back to the conv's dtype. The conv gets a bias if
    it had none. ``bn`` itself is not changed.
    """
    w = conv.weight
    f64 = dict(dtype=torch.float64, device=w.device)
    var = bn.running_var.to(**f64)
    mean = bn.running_mean.to(**f64)
    gamma = bn.weight.to(**f64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.to(**f64) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = conv.bias.to(**f64) if conv.bias is not None else torch.zeros_like(var)
    if transposed(conv):  # weight (C_in, C_out/g, *k): output channel (c // (C_in/g), j)
        c_in, og = w.shape[:2]
        group = torch.arange(c_in, device=w.device) // (c_in // conv.groups)
        index = group[:, None] * og + torch.arange(og, device=w.device)[None, :]
        per = scale[index].reshape(c_in, og, *([1] * (w.dim() - 2)))
    else:
        per = scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_w = w.to(**f64) * per
    new_b = (b - mean) * scale + beta
    w.copy_(new_w.to(w.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=w.dtype, device=w.device),
                                 requires_grad=w.requires_grad)
    conv.bias.copy_(new_b.to(conv.bias.dtype))


def fold_batchnorm_(model: nn.Module, input_shape: tuple[int, ...] | None = None
                    ) -> list[tuple[str, str]]:
    """Fold every BatchNorm that only consumes a conv's output into that conv, in place; returns
    the (conv name, BN name) pairs folded, in graph order (empty if there was nothing to fold).
    :func:`fold_bn_` also says why the other BNs were left.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> fold_batchnorm_(net)
        [('0', '1')]
        >>> type(net[1]).__name__, net[0].bias is not None
        ('Identity', True)
    """
    return fold_bn_(model, input_shape).folded


__all__ = ["CHECK_TOLERANCE", "FoldResult", "find_conv_bn_pairs", "fold_batchnorm_", "fold_bn_",
           "fold_into_conv_"]
