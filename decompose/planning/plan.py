"""Choosing an order and a rank T for every convolution, before anything is built.

Everything here is data-free: costs come from layer shapes (one traced forward pass) and errors
from singular values (Eckart-Young), so a plan is exact about what it will build.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import BUDGETS, DecoupleConfig
from ..engine.trace import Call, conv_macs, trace
from ..errors import BudgetError, DecomposeError
from ..methods.nd.kernel import (
    ORDER_NAMES,
    energy_curve,
    error_curve,
    rank_for_energy,
    singular_values,
)
from ..methods.nd.layers import is_conv, taps

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class LayerPlan:
    """One convolution: what it was, what it becomes, and what that costs and keeps.

    ``skipped`` is None for a layer that is decoupled, else the reason it is left as it is.
    ``kernel_error`` is ``||W - W_T||_F / ||W||_F`` and ``energy`` the kept fraction of squared
    singular values (0 and 1 for skipped layers).
    """

    name: str
    kernel_shape: tuple[int, ...]
    groups: int
    order: str | None = None
    rank: int | None = None
    max_rank: int | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    kernel_error: float = 0.0
    energy: float = 1.0
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["kernel_shape"] = list(self.kernel_shape)
        d.update(extra)
        return d


@dataclass
class Candidate:
    """One order of one layer: singular values, and cost per rank (linear in T)."""

    order: str
    s: torch.Tensor
    errors: list[float]
    energies: list[float]
    macs_per_rank: int
    params_per_rank: int
    bias_params: int
    #: measured relative output errors at T = 1..r (``allocation="output"``), else None
    output_errors: list[float] | None = None

    @property
    def max_rank(self) -> int:
        return len(self.errors)

    def alloc_error(self, t: int) -> float:
        """The error a budget minimises at rank ``t``: measured output error when known,
        else the relative kernel error."""
        return (self.output_errors if self.output_errors is not None else self.errors)[t - 1]

    def macs(self, t: int) -> int:
        return self.macs_per_rank * t

    def params(self, t: int) -> int:
        return self.params_per_rank * t + self.bias_params


def _costs(conv: nn.Module, call: Call, order: str) -> tuple[int, int]:
    """(MACs, params) per unit of rank T for one order, from the traced shapes."""
    c_in, c_out, g, k = conv.in_channels, conv.out_channels, conv.groups, taps(conv)
    in_px = math.prod(call.in_shape[2:])
    out_px = math.prod(call.out_shape[2:])
    if order == "dw-pw":
        # depthwise C_in -> C_in*T at the output size, then 1x1 C_in*T -> C_out (groups g)
        macs = c_in * k * out_px + c_out * (c_in // g) * out_px
        params = c_in * k + c_out * (c_in // g)
    else:
        # 1x1 C_in -> C_out*T (groups g) at the input size, then k x k C_out*T -> C_out
        macs = c_out * (c_in // g) * in_px + c_out * k * out_px
        params = c_out * (c_in // g) + c_out * k
    return macs, params


def candidates(conv: nn.Module, call: Call, orders=ORDER_NAMES) -> dict[str, Candidate]:
    bias = conv.out_channels if conv.bias is not None else 0
    out = {}
    for order in orders:
        s = singular_values(conv.weight, conv.groups, order)
        macs, params = _costs(conv, call, order)
        out[order] = Candidate(order, s, error_curve(s).tolist(), energy_curve(s).tolist(),
                               macs, params, bias)
    return out


def structural_skip(conv: nn.Module) -> str | None:
    """Why a conv can never gain from decoupling, or None."""
    if taps(conv) == 1:
        return "1x1 kernel: nothing to decouple"
    if conv.in_channels // conv.groups == 1:
        return "already depthwise"
    return None


def selected(name: str, module: nn.Module, config: DecoupleConfig,
             filter_fn: FilterFn | None) -> str | None:
    """Why the user's selection leaves this conv out, or None."""
    if config.include and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
        return "not matched by --include"
    for p in config.exclude:
        if fnmatch.fnmatchcase(name, p):
            return f"excluded by --exclude {p}"
    if filter_fn is not None and not filter_fn(module, name):
        return "excluded by filter_fn"
    return None


def choose_order(options: dict[str, tuple[int, float, int]]) -> str:
    """The ``auto`` rule. ``options``: order -> (rank, kernel error, MACs), all cheaper than the
    original. Take the order with the lower kernel error if it costs no more multiply-adds than
    the other; otherwise the cheaper order. Ties in error (within 1e-9) go to the cheaper order,
    then to dw-pw."""
    if len(options) == 1:
        return next(iter(options))
    a, b = "dw-pw", "pw-dw"
    (_, ea, ma), (_, eb, mb) = options[a], options[b]
    if abs(ea - eb) <= 1e-9:
        return a if ma <= mb else b
    low, high = (a, b) if ea < eb else (b, a)
    return low if options[low][2] <= options[high][2] else high


def _finish(lp: LayerPlan, cand: Candidate, t: int) -> LayerPlan:
    lp.order, lp.rank, lp.max_rank = cand.order, t, cand.max_rank
    lp.macs_after, lp.params_after = cand.macs(t), cand.params(t)
    lp.kernel_error = cand.errors[t - 1]
    lp.energy = cand.energies[t - 1]
    if cand.output_errors is not None:
        lp.extra["planned_output_error"] = cand.output_errors[t - 1]
    lp.skipped = None
    return lp


def _per_layer_rank(lp: LayerPlan, cands: dict[str, Candidate], config: DecoupleConfig,
                    forced_rank: int | None) -> LayerPlan:
    def rank_of(c: Candidate) -> int:
        if forced_rank is not None:
            return min(forced_rank, c.max_rank)
        if config.energy is not None:
            return rank_for_energy(c.s, config.energy)
        return min(config.rank or 1, c.max_rank)

    options = {o: (rank_of(c), c.errors[rank_of(c) - 1], c.macs(rank_of(c)))
               for o, c in cands.items()}
    cheaper = {o: v for o, v in options.items() if v[2] < lp.macs_before}
    if not cheaper:
        t, _, macs = min(options.values(), key=lambda v: v[2])
        lp.skipped = (f"rank {t} would cost {macs:,} MACs, not fewer than the original "
                      f"{lp.macs_before:,}")
        return lp
    order = choose_order(cheaper)
    return _finish(lp, cands[order], cheaper[order][0])


def _unfinish(lp: LayerPlan, reason: str) -> LayerPlan:
    """Turn a planned layer back into a kept original, with the reason."""
    lp.order = lp.rank = None
    lp.macs_after, lp.params_after = lp.macs_before, lp.params_before
    lp.kernel_error, lp.energy = 0.0, 1.0
    lp.skipped = reason
    lp.extra.pop("form", None)
    return lp


def form_params(conv: nn.Module, order: str, rank: int, form: str) -> int:
    """Parameters a form adds to the plain decoupled layer: the ``"dw1"`` pw-dw form carries its
    bias on a depthwise conv of ``C_out*T`` channels (zeros but the first of each group of T)."""
    if form == "dw1" and order == "pw-dw" and conv.bias is not None and rank > 1:
        return conv.out_channels * (rank - 1)
    return 0


def set_form(lp: LayerPlan, conv: nn.Module, form: str) -> LayerPlan:
    """Record the form a decoupled layer is built in (``lp.extra["form"]``) and its parameters.
    dw1 at T = 1 is the plain form. MACs do not change: the channel repeat / grouped sum of dw1
    are counted as 0 multiply-adds (they are memory moves and additions, not multiply-adds)."""
    if form == "dw1" and lp.rank == 1:
        form = "plain"
    lp.extra["form"] = form
    lp.params_after += form_params(conv, lp.order, lp.rank, form)
    return lp


Option = tuple  # (cost, squared error, payload); payload None = keep the original


def optimise(layers: list[list[Option]], budget: float) -> list[int]:
    """Pick one option per layer with total cost <= ``budget`` minimising the summed squared
    error: Lagrangian relaxation (each layer minimises err^2 + lam * cost; bisection on lam),
    then a greedy fill of the remaining budget by best error decrease per unit cost. The caller
    checks the cheapest choice fits."""
    def pick(lam: float) -> list[int]:
        return [min(range(len(o)), key=lambda i: (o[i][1] + lam * o[i][0], o[i][0])) for o in layers]

    def total(choice: list[int]) -> float:
        return sum(layers[i][j][0] for i, j in enumerate(choice))

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 10
        if hi > 1e30:
            break
    for _ in range(100):
        mid = (lo + hi) / 2
        if total(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = pick(hi)
    if total(choice) > budget:  # fall back to the cheapest option everywhere
        choice = [min(range(len(o)), key=lambda i: o[i][0]) for o in layers]
    slack = budget - total(choice)
    while True:
        best, best_gain = None, 0.0
        for i, opts in enumerate(layers):
            cur = opts[choice[i]]
            for j, o in enumerate(opts):
                extra = o[0] - cur[0]
                gain = cur[1] - o[1]
                if gain > 0 and extra <= slack:
                    ratio = gain / max(extra, 1e-12)
                    if ratio > best_gain:
                        best, best_gain = (i, j), ratio
        if best is None:
            break
        i, j = best
        slack -= layers[i][j][0] - layers[i][choice[i]][0]
        choice[i] = j
    return choice


def _budget(plans: list[tuple[LayerPlan, dict[str, Candidate]]], key: str, fraction: float) -> None:
    """Spread ranks under a global budget (MACs or params) to minimise the sum over layers of the
    squared relative kernel error; a layer may also stay original (error 0, full cost).
    (:func:`optimise`; the latency budget uses the same optimiser with measured costs.)
    """
    cost_of = (lambda c, t: c.macs(t)) if key == "macs" else (lambda c, t: c.params(t))
    before = (lambda lp: lp.macs_before) if key == "macs" else (lambda lp: lp.params_before)
    layers = []
    for lp, cands in plans:
        opts = [(before(lp), 0.0, None)]  # keep the original
        for c in cands.values():
            for t in range(1, c.max_rank + 1):
                cost = cost_of(c, t)
                if cost < before(lp):
                    opts.append((cost, c.alloc_error(t) ** 2, (c, t)))
        layers.append(opts)
    budget = fraction * sum(before(lp) for lp, _ in plans)
    cheapest = sum(min(o[0] for o in opts) for opts in layers)
    if cheapest > budget:
        total = sum(before(lp) for lp, _ in plans)
        flag = "--target-macs" if key == "macs" else "--target-params"
        raise BudgetError(f"{flag} {fraction} cannot be met: the cheapest plan (rank 1 "
                          f"everywhere) costs {cheapest / total:.3f} of the original; raise it")
    choice = optimise(layers, budget)
    for (lp, _cands), opts, j in zip(plans, layers, choice):
        payload = opts[j][2]
        if payload is None:
            lp.skipped = f"kept original: the {key} budget is better spent elsewhere"
        else:
            _finish(lp, *payload)


def make_plan(model: nn.Module, config: DecoupleConfig, input_shape: tuple[int, ...],
              filter_fn: FilterFn | None = None, shapes: dict[str, Call] | None = None,
              timing: Any = None, error_curves: dict | None = None) -> list[LayerPlan]:
    """Plan every Conv1d/2d/3d of ``model`` (nothing is changed).

    ``error_curves``: measured output errors per layer and order
    (:func:`decompose.planning.sensitivity.output_error_curves`), which the budgets then minimise
    instead of kernel errors (``config.allocation == "output"``).

    ``timing``: a :class:`decompose.planning.timing.LayerTimer` for the options that time layers
    (``config.timed``); one is made when needed and not given. Its ``summary`` says what it
    measured."""
    shapes = shapes if shapes is not None else trace(model, input_shape)
    orders = ORDER_NAMES if config.order == "auto" else (config.order,)
    plans: list[LayerPlan] = []
    budgeted: list[tuple[LayerPlan, dict[str, Candidate]]] = []
    for name, m in model.named_modules():
        if not is_conv(m):
            continue
        call = shapes.get(name)
        lp = LayerPlan(name, tuple(m.weight.shape), m.groups)
        lp.params_before = lp.params_after = sum(p.numel() for p in m.parameters())
        plans.append(lp)
        if call is None:
            lp.skipped = "not called in a forward pass with this input shape"
            continue
        if call.calls > 1:
            lp.skipped = f"called {call.calls} times per forward pass (shared module)"
        lp.macs_before = lp.macs_after = conv_macs(m, call.out_shape)
        if not torch.isfinite(m.weight).all() or (m.bias is not None and not torch.isfinite(m.bias).all()):
            raise DecomposeError(f"layer {name} has NaN or Inf weights; fix or retrain the model "
                                 "before decomposing it")
        reason = lp.skipped or structural_skip(m) or selected(name, m, config, filter_fn)
        if reason:
            lp.skipped = reason
            continue
        cands = candidates(m, call, orders)
        if error_curves is not None and config.allocation == "output":
            for order, c in cands.items():
                curve = error_curves.get(name, {}).get(order)
                if curve is None or len(curve) != c.max_rank:
                    raise DecomposeError(f"no measured output errors for layer {name} ({order}); "
                                         "measure them on this model with output_error_curves")
                c.output_errors = list(curve)
        lp.max_rank = max(c.max_rank for c in cands.values())
        if config.selection in BUDGETS and name not in config.rank_overrides:
            budgeted.append((lp, cands))
        else:
            _per_layer_rank(lp, cands, config, config.rank_overrides.get(name))
    needs_forms = config.form != "plain" or config.timed
    if needs_forms and timing is None:
        from .timing import LayerTimer
        timing = LayerTimer(model, config, input_shape)
    if budgeted and config.selection == "target_latency":
        from .timing import latency_budget
        latency_budget(model, budgeted, config, timing)
    elif budgeted:
        key = "macs" if config.selection == "target_macs" else "params"
        _budget(budgeted, key, config.target_macs or config.target_params)
    if needs_forms:
        from .timing import choose_forms
        fixed = {id(lp) for lp, _ in budgeted} if config.selection == "target_latency" else set()
        choose_forms(model, [lp for lp in plans if id(lp) not in fixed], config, timing)
    return plans
