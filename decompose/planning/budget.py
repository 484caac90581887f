"""Spreading a global budget over layers: one option per layer, least summed squared error.

Every layer offers options ``(cost, squared error, payload)`` (payload None: keep the original,
error 0, full cost). :func:`optimise` picks one per layer with the summed cost under the budget
and the least summed error. The costs are whatever the budget counts: multiply-adds, parameters
or measured milliseconds (:mod:`decompose.planning.timing`); the options come from any mix of
methods, so ``method="auto"`` is the same optimisation over more options.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Option(NamedTuple):
    """One choice for one layer: its cost, its squared error and what to build (None: keep the
    original)."""

    cost: float
    error: float
    payload: Any


def pareto(options: list[Option]) -> list[Option]:
    """The options no other option beats on both cost and error (the first of equals kept),
    sorted by cost: the only ones an optimiser of summed error under a summed cost can pick."""
    out: list[Option] = []
    best = float("inf")
    for o in sorted(options, key=lambda o: (o.cost, o.error)):
        if o.error < best:
            out.append(o)
            best = o.error
    return out


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
