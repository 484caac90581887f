"""Bringing a batch to the input of one layer after another without re-running the network.

Calibration visits the decoupled layers in forward order and needs, for each, the input it sees
in the decoupled model and in the original model. Two ways to get there:

* :class:`GraphReplay` traces both models with ``torch.fx`` (decoupled modules and convs as leaf
  calls) and runs each graph node by node from where the batch last stopped, keeping only the
  values still needed later (liveness from the graph), so one calibration costs about one forward
  pass of each model per batch whatever the number of layers. A batch's paused state is what a
  forward pass holds at that point (a few activation maps); the caller decides how many to keep.
* :class:`HookReplay`, when a model does not trace (or its graph disagrees with its forward),
  runs the models from the input every time and stops them with an exception from a forward
  pre-hook on the layer: no state, bounded memory, but quadratic in depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..engine.trace import fx_defaults
from ..methods.convs import is_conv
from ..methods.module import is_lowrank


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted input is captured."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_lowrank(m) or is_conv(m) or super().is_leaf_module(m, qualname)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Walker:
    """One model's graph, runnable in pieces: ``state = [position, env]``."""

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        self.root = root
        self.nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        self.free: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n, i in last.items():
            self.free[i].append(n)
        self.calls: dict[str, list[int]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                self.calls.setdefault(n.target, []).append(index[n])
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        for p in self.placeholders[1:]:
            if not p.args:
                raise TypeError(f"forward takes a second input {p.target!r} without a default")

    def start(self, x: torch.Tensor) -> list:
        return [0, {}, x]

    def _run_node(self, n: fx.Node, env: dict, x: torch.Tensor) -> Any:
        def load(a):
            return fx.node.map_arg(a, lambda v: env[v])
        if n.op == "placeholder":
            return x if n is self.placeholders[0] else n.args[0]
        if n.op == "get_attr":
            return _fetch(self.root, n.target)
        args, kwargs = load(n.args), load(n.kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            obj, *rest = args
            return getattr(obj, n.target)(*rest, **kwargs)
        if n.op == "call_module":
            return self.root.get_submodule(n.target)(*args, **kwargs)
        if n.op == "output":
            return args[0]
        raise RuntimeError(f"unknown fx node kind {n.op}")  # pragma: no cover

    def run(self, state: list, stop: int) -> Any:
        """Run nodes ``state.position .. stop-1``; return the last value computed."""
        pos, env, x = state
        out = None
        for i in range(pos, stop):
            n = self.nodes[i]
            out = env[n] = self._run_node(n, env, x)
            for dead in self.free[i]:
                env.pop(dead, None)
            if not n.users:
                env.pop(n, None)
        state[0] = stop
        if pos == 0 and stop > 0:
            state[2] = None  # the input now lives in env (or is dead)
        return out

    def layer_input(self, state: list, name: str) -> torch.Tensor:
        """Advance to the (single) call of module ``name``; return its first argument."""
        i = self.calls[name][0]
        self.run(state, i)
        return fx.node.map_arg(self.nodes[i].args[0], lambda v: state[1][v])

    def layer_output(self, state: list, name: str) -> Any:
        """Advance past the (single) call of module ``name``; return its output."""
        i = self.calls[name][0]
        return self.run(state, i + 1) if state[0] <= i else state[1][self.nodes[i]]

    def output(self, x: torch.Tensor) -> Any:
        st = self.start(x)
        return self.run(st, len(self.nodes))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b)


def _nbytes(obj: Any, seen: set[int], skip: set[int]) -> int:
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = st.data_ptr()
        if key in seen or key in skip:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o, seen, skip) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o, seen, skip) for o in obj.values())
    return 0


class GraphReplay:
    """Pausable forward passes of the decoupled and the original model on the same batch."""

    resumable = True
    mode = "replay"

    def __init__(self, model: nn.Module, original: nn.Module, names: Sequence[str],
                 example: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Trace both models; raise if a graph does not reproduce its model's forward on
        ``example`` (inputs for the decoupled and the original model) or calls a layer in
        ``names`` other than once."""
        self.walkers = []
        for root, x in zip((model, original), example):
            w = _Walker(root, _Tracer().trace(root, concrete_args=fx_defaults(root)))
            for name in names:
                if len(w.calls.get(name, ())) != 1:
                    raise TypeError(f"{name} is called {len(w.calls.get(name, ()))} times in the graph")
            if not _same(w.output(x), root(x)):
                raise TypeError("the traced graph disagrees with the model's forward")
            self.walkers.append(w)
        self._params = {t.untyped_storage().data_ptr()
                        for m in (model, original) for t in (*m.parameters(), *m.buffers())}

    def start(self, x_dec: torch.Tensor, x_orig: torch.Tensor) -> tuple[list, list]:
        return self.walkers[0].start(x_dec), self.walkers[1].start(x_orig)

    def inputs(self, state: tuple[list, list], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of layer ``name`` in the decoupled model, its output in the original)."""
        return (self.walkers[0].layer_input(state[0], name),
                self.walkers[1].layer_output(state[1], name))

    def nbytes(self, state: tuple[list, list]) -> int:
        seen: set[int] = set()
        return sum(_nbytes(s[1], seen, self._params) + _nbytes(s[2], seen, self._params)
                   for s in state)


class HookReplay:
    """Both models run from the input and stopped at the layer: no state kept between layers."""

    resumable = False
    mode = "recompute"

    def __init__(self, model: nn.Module, original: nn.Module) -> None:
        self.models = (model, original)

    def start(self, x_dec: torch.Tensor, x_orig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x_dec, x_orig

    def inputs(self, state, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input of layer ``name`` in the decoupled model, its output in the original)."""
        return (capture(self.models[0], name, state[0]),
                capture(self.models[1], name, state[1], output=True))

    def nbytes(self, state) -> int:
        return 0


def capture(model: nn.Module, name: str, x: torch.Tensor, output: bool = False) -> torch.Tensor:
    """The first argument (or with ``output``, the result) of the first call of submodule
    ``name`` during ``model(x)``; the pass stops there."""
    got: list[torch.Tensor] = []

    def hook(mod, args, out=None):
        got.append(out if output else args[0])
        raise _Stop

    mod = model.get_submodule(name)
    h = mod.register_forward_hook(hook) if output else mod.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise LookupError(f"{name} was not called in a forward pass")
    return got[0]


def call_order(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, int]:
    """How many times each module in ``names`` is called in ``model(x)``, in first-call order."""
    counts: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            counts[name] = counts.get(name, 0) + 1
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return counts
