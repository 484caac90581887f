"""How one conv is factored: the method registry and the methods that ship with decompose.

* :mod:`.base`: the :class:`Method` protocol and the :class:`Candidate` it offers the planner;
* :mod:`.module`: :class:`LowRankConv`, the drop-in layer every method builds;
* :mod:`.registry`: :func:`register`, :func:`get`, :func:`names`, :func:`resolve`;
* one module (or package) per method, registered on import: :mod:`.nd` (Network Decoupling),
  :mod:`.cp` (CP, 3-way ``cp`` and one factor per spatial axis ``cp4``), :mod:`.tucker2`
  (Tucker-2), :mod:`.svd` (spatial and channel SVD).

The planner, budgets, calibration, reports, sweep, export and the CLI reach methods only
through the registry; none of them names a method.
"""

from __future__ import annotations

from torch import nn

from .base import Candidate, Method, Rank
from .convs import SamePad, conv_prefix, is_conv, is_factorizable, is_transposed
from .module import LowRankConv, is_lowrank, with_prefix
from .registry import AUTO, get, names, register, resolve

# built-in methods: registered on import, as any other
from . import nd  # noqa: E402,F401  isort: skip
from . import cp  # noqa: E402,F401  isort: skip
from . import tucker2  # noqa: E402,F401  isort: skip
from . import svd  # noqa: E402,F401  isort: skip


def helper_modules() -> tuple[type, ...]:
    """The non-``torch.nn`` classes registered methods put inside their layers (e.g. the
    channel moves of Network Decoupling's dw1 form), and the padding prefix of 'same' convs."""
    out: list[type] = [SamePad]
    for n in names():
        out += [c for c in get(n).custom_modules if c not in out]
    return tuple(out)


def custom_modules() -> tuple[type, ...]:
    """LowRankConv and every helper module: what the safe loader allows besides torch.nn."""
    return (LowRankConv, *helper_modules())


def skip_reason(method: Method, conv: nn.Module) -> str | None:
    """Why ``method`` cannot factor ``conv``: a transposed conv for a method without
    ``supports_transposed`` (naming the methods that have it), else the method's own
    :meth:`~decompose.methods.base.Method.skip_reason`. What the planner asks."""
    if is_transposed(conv) and not method.supports_transposed:
        able = [n for n in names() if get(n).supports_transposed]
        hint = f" ({', '.join(able)} does)" if len(able) == 1 else (
            f" ({', '.join(able)} do)" if able else "")
        return f"transposed conv: {method.name} does not factor transposed convs{hint}"
    return method.skip_reason(conv)


def build(conv: nn.Module, cand: Candidate, i: int, form: str = "plain") -> LowRankConv:
    """The layer of option ``i`` of ``cand`` for ``conv``, in ``form``: the method's build, with
    the padding a known conv subclass applies first (:func:`conv_prefix`) as its first part."""
    method = get(cand.method)
    layer = method.build(conv, cand, i)
    if form != layer.form:
        layer = method.to_form(layer, form)
    _, prefix = conv_prefix(conv)
    return layer if prefix is None else with_prefix(layer, prefix)


def to_form(layer: LowRankConv, form: str) -> LowRankConv:
    """``layer`` in ``form`` (exact), by its method; a padding prefix is kept in front."""
    if layer.form == form:
        return layer
    prefix = layer.prefix
    inner = layer if prefix is None else with_prefix(layer, None)
    out = get(layer.method).to_form(inner, form)
    return out if prefix is None else with_prefix(out, prefix)


__all__ = ["AUTO", "Candidate", "LowRankConv", "Method", "Rank", "build", "conv_prefix",
           "custom_modules", "get", "helper_modules", "is_conv", "is_factorizable",
           "is_lowrank", "is_transposed", "names", "register", "resolve", "skip_reason",
           "to_form", "with_prefix"]
