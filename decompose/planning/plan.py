"""Choosing a method, variant and rank for every convolution, before anything is built.

The planner knows no method: for each conv it asks the methods the config names
(:mod:`decompose.methods`) for their candidates, then applies the config's rank rule:

* ``rank=T`` / ``rank="full"`` / ``rank_overrides``: every candidate at that rank; the layer
  takes the most accurate when it is also the cheapest, else the cheapest (:func:`choose`);
  a layer that would not get cheaper is left alone (``"full"`` builds it anyway, to check);
* ``energy=E``: per candidate the fewest terms keeping that fraction of the squared singular
  values, then the same choice;
* a budget (``target_macs``, ``target_params``): every option of every candidate, and the
  global optimiser of :mod:`decompose.planning.budget` (``target_latency`` times them:
  :mod:`decompose.planning.timing`).

Everything here is data-free: costs come from layer shapes (one traced forward pass) and errors
from the methods (closed forms where they exist), so a plan is exact about what it will build.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import methods as registry
from ..config import BUDGETS, DecomposeConfig
from ..engine.trace import Call, trace
from ..errors import BudgetError, DecomposeError
from ..methods.base import Candidate, Method
from ..methods.convs import conv_macs, conv_prefix, has_own_forward, is_factorizable, transposed
from ..methods.module import is_lowrank
from ..report import LayerPlan
from .budget import Option, optimise, pareto
from .timing import LayerTimer, choose_forms, latency_budget

FilterFn = Callable[[nn.Module, str], bool]


def selected(name: str, module: nn.Module, config: DecomposeConfig,
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


def method_skip(conv: nn.Module, methods: list[Method]) -> tuple[list[Method], str | None]:
    """The methods that can factor ``conv``, and why none can (None when some can)."""
    reasons = [registry.skip_reason(m, conv) for m in methods]
    usable = [m for m, r in zip(methods, reasons) if r is None]
    if usable:
        return usable, None
    if len(methods) == 1:
        return [], reasons[0]
    return [], "; ".join(f"{m.name}: {r}" for m, r in zip(methods, reasons))


def layer_skip(conv: nn.Module) -> str | None:
    """Why no method may replace this conv whatever it is: a subclass computing more than its
    weight does."""
    if has_own_forward(conv) and not conv_prefix(conv)[0]:
        return f"custom forward ({type(conv).__name__} overrides forward)"
    return None


def decomposed_parts(model: nn.Module) -> dict[str, str]:
    """The convs inside layers a method already built (a file written by decompose), by name,
    with why they are left alone: factoring a factor again is not what a user asks for."""
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if is_lowrank(mod):
            for sub, conv in mod.named_modules():
                if sub and is_factorizable(conv):
                    out[f"{name}.{sub}" if name else sub] = (
                        f"part of {name or 'the model'}, already decomposed by {mod.method}")
    return out


def variants_for(method: Method, config: DecomposeConfig) -> tuple[str, ...]:
    """The config's ``order`` restricts a method whose variants include it (ND's orders)."""
    if config.order != "auto" and config.order in method.variants:
        return (config.order,)
    return method.variants


def choose(options: dict[str, tuple[Any, float, int]]) -> str:
    """The per-layer rule among candidates at a fixed rule. ``options``: label -> (rank,
    kernel error, MACs). The most accurate option when it costs no more multiply-adds than any
    other; otherwise the cheapest. Errors within 1e-9 count as equal (then the cheaper, then
    the first given)."""
    labels = list(options)
    cheapest = min(options[k][2] for k in labels)
    best = min(labels, key=lambda k: (round(options[k][1] / 1e-9), options[k][2], labels.index(k)))
    if options[best][2] <= cheapest:
        return best
    return min(labels, key=lambda k: (options[k][2], options[k][1], labels.index(k)))


def choose_order(options: dict[str, tuple[Any, float, int]]) -> str:
    """:func:`choose` (ND's ``order="auto"`` rule, by its old name)."""
    return choose(options)


def _per_layer(lp: LayerPlan, cands: list[Candidate], config: DecomposeConfig,
               forced: Any) -> LayerPlan:
    """The rank rule of one layer: a fixed rank (or ``"full"``), or the energy rule."""
    def option(c: Candidate) -> int:
        if forced is not None or config.energy is None:
            return 0  # asked for one rank: the candidate offers only it
        return c.index(registry.get(c.method).rank_for_energy(c, config.energy))

    options = {c.label: (c, option(c)) for c in cands}
    table = {k: (c.ranks[i], c.errors[i], c.macs[i]) for k, (c, i) in options.items()}
    full = forced == "full" or (forced is None and config.rank == "full")
    cheaper = table if full else {k: v for k, v in table.items() if v[2] < lp.macs_before}
    if not cheaper:
        t, _, macs = min(table.values(), key=lambda v: v[2])
        lp.skipped = (f"rank {t} would cost {macs:,} MACs, not fewer than the original "
                      f"{lp.macs_before:,}")
        return lp
    if full:  # exact options first: "full" is for checking exactness
        exact = {k: v for k, v in cheaper.items() if options[k][0].exact(options[k][1])}
        cheaper = exact or cheaper
    k = choose(cheaper)
    return lp.take(*options[k])


def _budget(plans: list[tuple[LayerPlan, list[Candidate]]], key: str, fraction: float) -> None:
    """Spread options under a global budget (MACs or params) to minimise the sum over layers of
    the squared relative errors; a layer may also stay original (error 0, full cost)."""
    before = (lambda lp: lp.macs_before) if key == "macs" else (lambda lp: lp.params_before)
    layers = []
    for lp, cands in plans:
        opts = [Option(before(lp), 0.0, None)]  # keep the original
        for c in cands:
            costs = c.macs if key == "macs" else c.params
            opts += [Option(costs[i], c.alloc_error(i) ** 2, (c, i))
                     for i in range(len(c)) if costs[i] < before(lp)]
        layers.append(pareto(opts))
    budget = fraction * sum(before(lp) for lp, _ in plans)
    cheapest = sum(min(o.cost for o in opts) for opts in layers)
    if cheapest > budget:
        total = sum(before(lp) for lp, _ in plans)
        flag = "--target-macs" if key == "macs" else "--target-params"
        raise BudgetError(f"{flag} {fraction} cannot be met: the cheapest plan (every layer at "
                          f"its cheapest option) costs {cheapest / total:.3f} of the original; "
                          "raise it")
    choice = optimise(layers, budget)
    for (lp, _cands), opts, j in zip(plans, layers, choice):
        payload = opts[j].payload
        if payload is None:
            lp.skipped = f"kept original: the {key} budget is better spent elsewhere"
        else:
            lp.take(*payload)


def _attach_curves(name: str, cands: list[Candidate], curves: dict) -> None:
    """Measured output errors (``allocation="output"``) onto the candidates, by rank."""
    for c in cands:
        curve = curves.get(name, {}).get(c.label)
        if curve is None or any(_key(r) not in curve for r in c.ranks):
            raise DecomposeError(f"no measured output errors for layer {name} ({c.label}); "
                                 "measure them on this model with output_error_curves")
        c.output_errors = [curve[_key(r)] for r in c.ranks]


def _key(rank: Any) -> str:
    """A JSON-safe key for a rank."""
    return "x".join(map(str, rank)) if isinstance(rank, (tuple, list)) else str(rank)


def layer_candidates(name: str, conv: nn.Module, call: Call, *, config: DecomposeConfig,
                     methods: list[Method], budgeted: bool) -> list[Candidate]:
    """Every usable method's candidates for one conv under the config's rank rule."""
    forced = config.rank_overrides.get(name)
    if forced is None and not budgeted and config.energy is None:
        forced = config.rank
    ranks = None if forced is None else [forced]
    out: list[Candidate] = []
    for m in methods:
        out += m.candidates(conv, call, ranks=ranks, variants=variants_for(m, config),
                            seed=config.seed)
    return out


def make_plan(model: nn.Module, config: DecomposeConfig, input_shape: tuple[int, ...],
              filter_fn: FilterFn | None = None, shapes: dict[str, Call] | None = None,
              timing: Any = None, error_curves: dict | None = None) -> list[LayerPlan]:
    """Plan every Conv1d/2d/3d and ConvTranspose1d/2d/3d of ``model`` (nothing is changed).

    ``error_curves``: measured output errors per layer and candidate
    (:func:`decompose.planning.sensitivity.output_error_curves`), which the budgets then
    minimise instead of kernel errors (``config.allocation == "output"``).

    ``timing``: a :class:`decompose.planning.timing.LayerTimer` for the options that time layers
    (``config.timed``); one is made when needed and not given. Its ``summary`` says what it
    measured."""
    shapes = shapes if shapes is not None else trace(model, input_shape)
    methods = [registry.get(n) for n in config.methods]
    plans: list[LayerPlan] = []
    budgeted: list[tuple[LayerPlan, list[Candidate]]] = []
    parts = decomposed_parts(model)
    for name, m in model.named_modules():
        if not is_factorizable(m):
            continue
        call = shapes.get(name)
        lp = LayerPlan(name, tuple(m.weight.shape), m.groups, transposed=transposed(m))
        lp.params_before = lp.params_after = sum(p.numel() for p in m.parameters())
        plans.append(lp)
        if call is None:
            lp.skipped = "not called in a forward pass with this input shape"
            continue
        if call.calls > 1:
            lp.skipped = f"called {call.calls} times per forward pass (shared module)"
        elif call.extra_args:
            lp.skipped = ("called with more than its input (e.g. output_size); a factorized "
                          "layer takes only the input")
        lp.macs_before = lp.macs_after = conv_macs(m, call.out_shape, call.in_shape)
        if not torch.isfinite(m.weight).all() or (m.bias is not None and not torch.isfinite(m.bias).all()):
            raise DecomposeError(f"layer {name} has NaN or Inf weights; fix or retrain the model "
                                 "before decomposing it")
        usable, why = method_skip(m, methods)
        reason = (lp.skipped or parts.get(name) or layer_skip(m) or why
                  or selected(name, m, config, filter_fn))
        if reason:
            lp.skipped = reason
            continue
        budget = config.selection in BUDGETS and name not in config.rank_overrides
        cands = layer_candidates(name, m, call, config=config, methods=usable, budgeted=budget)
        if error_curves is not None and config.allocation == "output":
            _attach_curves(name, cands, error_curves)
        lp.max_rank = cands[0].max_rank
        if budget:
            budgeted.append((lp, cands))
        else:
            _per_layer(lp, cands, config, config.rank_overrides.get(name))
    needs_forms = config.form != "plain" or config.timed
    if needs_forms and timing is None:
        timing = LayerTimer(model, config, input_shape)
    if budgeted and config.selection == "target_latency":
        latency_budget(model, budgeted, config, timing)
    elif budgeted:
        key = "macs" if config.selection == "target_macs" else "params"
        _budget(budgeted, key, config.target_macs or config.target_params)
    if needs_forms:
        fixed = {id(lp) for lp, _ in budgeted} if config.selection == "target_latency" else set()
        choose_forms(model, [lp for lp in plans if id(lp) not in fixed], config, timing)
    return plans
