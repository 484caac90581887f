"""How one conv is factored: the method registry and the methods that ship with decompose.

* :mod:`.base`: the :class:`Method` protocol and the :class:`Candidate` it offers the planner;
* :mod:`.module`: :class:`LowRankConv`, the drop-in layer every method builds;
* :mod:`.registry`: :func:`register`, :func:`get`, :func:`names`, :func:`resolve`;
* one module (or package) per method, registered on import: :mod:`.nd` (Network Decoupling),
  :mod:`.cp` (CP, 3-way ``cp`` and one factor per spatial axis ``cp4``).

The planner, budgets, calibration, reports, sweep, export and the CLI reach methods only
through the registry; none of them names a method.
"""

from __future__ import annotations

from .base import Candidate, Method, Rank
from .convs import is_conv
from .module import LowRankConv, is_lowrank
from .registry import AUTO, get, names, register, resolve

# built-in methods: registered on import, as any other
from . import nd  # noqa: E402,F401  isort: skip
from . import cp  # noqa: E402,F401  isort: skip


def helper_modules() -> tuple[type, ...]:
    """The non-``torch.nn`` classes registered methods put inside their layers (e.g. the
    channel moves of Network Decoupling's dw1 form)."""
    out: list[type] = []
    for n in names():
        out += [c for c in get(n).custom_modules if c not in out]
    return tuple(out)


def custom_modules() -> tuple[type, ...]:
    """LowRankConv and every helper module: what the safe loader allows besides torch.nn."""
    return (LowRankConv, *helper_modules())


__all__ = ["AUTO", "Candidate", "LowRankConv", "Method", "Rank", "custom_modules", "get", "helper_modules",
           "is_conv", "is_lowrank", "names", "register", "resolve"]
