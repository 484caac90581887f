"""Planning by the clock: forms, latency-aware keep/decouple decisions, a latency budget.

Multiply-adds do not predict CPU latency for depthwise convs (docs/layouts.md), so these parts of
the planner *time* each candidate layer on this machine, original and decomposed side by side:

* every convolution's input is captured from one forward pass of seeded N(0, 1) input of the
  planned ``input_shape`` at batch ``config.latency_batch``;
* each layer's original conv and its decomposed options are timed interleaved by
  :func:`decompose.measure.clock.compare_latency` (warm-up, rounds in rotating order, median of the
  rounds), at ``config.threads`` threads;
* an option's time is the original's median divided by the option's speed-up, the median of
  per-round paired ratios (load that drifts between rounds cancels); the original is timed in
  every comparison;
* a decomposed option counts as faster only if ``original_ms >= config.latency_margin *
  option_ms`` (default 1.05): a layer that is not faster by that margin is kept original, and
  the report says so with both times.

Layers of the same geometry (conv shape, stride, padding, groups, input shape and layout) share
one timing, so a ResNet's dozens of identical blocks are timed once per shape.

For deterministic tests, pass ``timer=`` (a clock, as :func:`compare_latency` takes) or
``latency_fn=`` (``latency_fn(layer_name, label, module, x) -> ms``, replacing the measurement
entirely; ``label`` is ``"original"``, ``"<order>/T<rank>/<form>"`` or ``"model"`` for the whole
model) to :func:`decompose.plan` / :func:`decompose.decompose_`, or set the module-level default
:data:`LATENCY_FN`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import DecoupleConfig
from ..engine.trace import calls_for, capture_inputs
from ..errors import BudgetError
from ..measure.clock import Timer, allocator_settings, compare_latency, speedups
from ..methods.nd.forms import AUTO_MARGIN, auto_form, estimated_speedup, fast_form
from ..methods.nd.kernel import factorize
from ..methods.nd.layers import decouple_conv, is_conv

LatencyFn = Callable[[str, str, nn.Module, torch.Tensor], float]

#: A default ``latency_fn`` for every plan (tests may set it); None measures for real.
LATENCY_FN: LatencyFn | None = None

#: Timed rounds and untimed warm-up calls per comparison.
REPEATS = 15
WARMUP = 3
#: A timed sample repeats the call until it lasts about this long (for microsecond layers).
MIN_SAMPLE_MS = 1.0


def _geometry(conv: nn.Module, x: torch.Tensor) -> tuple:
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return (type(conv).__name__, tuple(conv.weight.shape), conv.stride, str(conv.padding),
            conv.dilation, conv.groups, conv.padding_mode, conv.bias is not None,
            tuple(x.shape), cl, x.dtype, str(x.device))


class LayerTimer:
    """Times layers of one model on their captured inputs (see the module docstring)."""

    def __init__(self, model: nn.Module, config: DecoupleConfig, input_shape: tuple[int, ...], *,
                 timer: Timer | None = None, latency_fn: LatencyFn | None = None) -> None:
        self.model, self.config = model, config
        self.latency_fn = latency_fn if latency_fn is not None else LATENCY_FN
        self.timer = timer
        p = next(model.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        device = p.device if p is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(config.latency_batch, *input_shape, generator=g).to(dtype=dtype,
                                                                          device=device)
        if x.dim() == 4 and p is not None and any(
                is_conv(m) and m.weight.dim() == 4 and not m.weight.is_contiguous()
                and m.weight.is_contiguous(memory_format=torch.channels_last)
                for m in model.modules()):
            x = x.contiguous(memory_format=torch.channels_last)  # a channels_last model
        self.x = x
        self._inputs: dict[str, torch.Tensor] | None = None
        self._cache: dict[tuple, float] = {}
        self.summary: dict[str, Any] = {
            "batch_size": config.latency_batch, "threads": config.threads or torch.get_num_threads(),
            "margin": config.latency_margin, "repeats": REPEATS, "warmup": WARMUP,
            "clock": ("latency_fn" if self.latency_fn else
                      "injected" if timer is not None else "perf_counter"),
            "input": "random", "median": True, "allocator": allocator_settings()}

    def input_of(self, name: str) -> torch.Tensor:
        if self._inputs is None:
            names = [n for n, m in self.model.named_modules() if is_conv(m)]
            self._inputs = capture_inputs(self.model, names, self.x)
        return self._inputs[name]

    def time(self, name: str, conv: nn.Module, modules: dict[str, nn.Module]) -> dict[str, float]:
        """Median ms of every module (label -> module) on the input layer ``name`` receives."""
        x = self.input_of(name)
        if self.latency_fn is not None:
            return {k: float(self.latency_fn(name, k, m, x)) for k, m in modules.items()}
        key = _geometry(conv, x)
        todo = {k: m for k, m in modules.items() if k != "original" and (key, k) not in self._cache}
        if todo or (key, "original") not in self._cache:
            # the original is timed in every call: decisions use paired per-round ratios
            number = _calls_for(conv, x)
            res = compare_latency({"original": modules["original"], **todo}, x, repeats=REPEATS,
                                  warmup=WARMUP, number=number,
                                  timer=self.timer or time.perf_counter,
                                  threads=self.config.threads)
            sp = speedups(res, "original")
            self._cache.setdefault((key, "original"), res["original"].median_ms)
            for k in todo:
                self._cache[(key, k)] = sp[k]  # speed-up over the original
        before = self._cache[(key, "original")]
        return {k: before if k == "original" else before / self._cache[(key, k)]
                for k in modules}

    def whole(self) -> float:
        """Median ms of the whole model on the planner's input."""
        if self.latency_fn is not None:
            return float(self.latency_fn("", "model", self.model, self.x))
        res = compare_latency({"model": self.model}, self.x, repeats=REPEATS, warmup=WARMUP,
                              timer=self.timer or time.perf_counter, threads=self.config.threads)
        return res["model"].median_ms


def _calls_for(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return calls_for(module, x, MIN_SAMPLE_MS)


def forms_for(form: str, seq: nn.Module, rank: int) -> list[str]:
    """The decoupled forms a config's ``form`` allows for one built layer (never ``"dense"``);
    empty when ``"auto"`` would pick the dense conv (the layer should then stay original)."""
    if form == "plain" or rank == 1:
        if form == "auto" and auto_form(seq) == "dense":
            return []
        return ["plain"]
    if form == "dw1":
        return ["dw1"]
    if form == "auto":
        a = auto_form(seq)
        return [] if a == "dense" else [a]
    return ["plain", "dw1"]  # fastest


def _not_faster(best: str, after: float, before: float, config: DecoupleConfig) -> str:
    return (f"kept original: decoupling is not faster ({best} {after:.3f} ms vs original "
            f"{before:.3f} ms at batch {config.latency_batch}; needs {config.latency_margin}x)")


def choose_forms(model: nn.Module, plans: list, config: DecoupleConfig,
                 timing: LayerTimer | None) -> None:
    """Give every decoupled layer of ``plans`` its form (``lp.extra["form"]``), keeping the
    original where the chosen form is not faster (auto rule, or measured with ``timing``)."""
    from .plan import _unfinish, set_form
    for lp in plans:
        if lp.skipped is not None:
            continue
        conv = model.get_submodule(lp.name)
        seq = decouple_conv(conv, lp.rank, lp.order)
        forms = forms_for(config.form, seq, lp.rank)
        if not forms:
            _unfinish(lp, "kept original: decoupling is not faster (form auto: estimated "
                          f"speed-up {estimated_speedup(seq):.2f} <= {AUTO_MARGIN}; the dense "
                          "conv is as fast)")
            continue
        form = forms[0]
        if config.timed:
            label = f"{lp.order}/T{lp.rank}/"
            mods = {"original": conv, **{label + f: fast_form(seq, f) for f in forms}}
            ms = timing.time(lp.name, conv, mods)
            form = min(forms, key=lambda f: ms[label + f])
            before, after = ms["original"], ms[label + form]
            if before < config.latency_margin * after:
                _unfinish(lp, _not_faster(form, after, before, config))
                lp.extra.update(plan_ms_before=before, plan_ms_after=after)
                continue
            lp.extra.update(plan_ms_before=before, plan_ms_after=after)
        set_form(lp, conv, form)


def latency_budget(model: nn.Module, budgeted: list, config: DecoupleConfig,
                   timing: LayerTimer) -> None:
    """``--target-latency F``: per layer (order, rank, form) under a measured latency budget.

    Costs are measured ms: whole model = (measured whole-model ms - sum of the budgeted layers'
    original ms) + sum of every budgeted layer's chosen option's ms. Options not faster than the
    original by the margin are dropped. :func:`decompose.planning.plan.optimise` (the MACs/params budget's
    optimiser) minimises the summed squared relative kernel error under ``F * whole``.
    """
    from .plan import _finish, optimise, set_form
    layers = []
    for lp, cands in budgeted:
        conv = model.get_submodule(lp.name)
        modules: dict[str, nn.Module] = {"original": conv}
        what: dict[str, tuple] = {}
        for c in cands.values():
            f = factorize(conv.weight, conv.groups, c.order)
            for t in range(1, c.max_rank + 1):
                if c.macs(t) >= lp.macs_before:
                    continue
                seq = decouple_conv(conv, t, c.order, factors=f)
                for form in forms_for(config.form, seq, t):
                    label = f"{c.order}/T{t}/{form}"
                    modules[label] = seq if form == "plain" else fast_form(seq, form)
                    what[label] = (c, t, form)
        ms = timing.time(lp.name, conv, modules)
        before = ms["original"]
        opts = [(before, 0.0, None)]
        for label, (c, t, form) in what.items():
            if config.latency_margin * ms[label] <= before:
                opts.append((ms[label], c.alloc_error(t) ** 2, (c, t, form)))
        layers.append(opts)
        lp.extra["plan_ms_before"] = before
        if len(opts) == 1:
            best = min(what, key=ms.get) if what else None
            lp.extra["plan_why"] = (_not_faster(best, ms[best], before, config) if best else
                                    "kept original: no decomposed option costs fewer MACs")
    whole = timing.whole()
    orig_sum = sum(o[0][0] for o in layers)
    remainder = max(whole - orig_sum, 0.0)
    fraction = config.target_latency
    budget = fraction * whole - remainder
    cheapest = sum(min(o[0] for o in opts) for opts in layers)
    timing.summary.update(whole_ms=whole, remainder_ms=remainder, layers_ms=orig_sum)
    if cheapest > budget:
        raise BudgetError(
            f"--target-latency {fraction} cannot be met: the fastest plan measured takes "
            f"{(remainder + cheapest) / whole:.3f} of the original's {whole:.3f} ms at batch "
            f"{config.latency_batch}; raise it to at least that")
    choice = optimise(layers, budget)
    predicted = remainder
    for (lp, _), opts, j in zip(budgeted, layers, choice):
        cost, _, payload = opts[j]
        predicted += cost
        why = lp.extra.pop("plan_why", None)
        if payload is None:
            lp.skipped = why or "kept original: the latency budget is better spent elsewhere"
            continue
        c, t, form = payload
        _finish(lp, c, t)
        set_form(lp, model.get_submodule(lp.name), form)
        lp.extra["plan_ms_after"] = cost
    timing.summary.update(predicted_ms=predicted, predicted_fraction=predicted / whole,
                          target_latency=fraction)
