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
model; the whole-model check below is then skipped) to :func:`decompose.plan` /
:func:`decompose.decompose_`, or set the module-level default :data:`LATENCY_FN`.

A latency budget is checked on the whole model: the sum of per-layer times misses what happens
between layers (measured on ResNet-56: a plan predicted at 0.70 of the original ran at 0.80), so
the planned model is built and timed against the original, interleaved, and while it is over the
target by more than :data:`VERIFY_TOLERANCE` the layers' budget is cut by the excess and the
plan solved again, at most :data:`VERIFY_ROUNDS` times. The report's ``latency_plan`` gives the
measured fraction of every round.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import methods as registry
from ..config import DecomposeConfig
from ..engine.layout import is_channels_last, to_channels_last_
from ..engine.surgery import replace_module
from ..engine.trace import calls_for, capture_inputs
from ..errors import BudgetError
from ..measure.clock import Timer, allocator_settings, compare_latency, speedups
from ..methods.base import Method
from ..methods.convs import is_conv, is_factorizable
from ..methods.module import LowRankConv
from .budget import Option, optimise

LatencyFn = Callable[[str, str, nn.Module, torch.Tensor], float]

#: A default ``latency_fn`` for every plan (tests may set it); None measures for real.
LATENCY_FN: LatencyFn | None = None

#: Timed rounds and untimed warm-up calls per comparison.
REPEATS = 15
WARMUP = 3
#: whole-model checks of a latency budget's plan, and how far over the target one may be
VERIFY_ROUNDS = 4
VERIFY_TOLERANCE = 0.01
#: A timed sample repeats the call until it lasts about this long (for microsecond layers).
MIN_SAMPLE_MS = 1.0


def _geometry(conv: nn.Module, x: torch.Tensor) -> tuple:
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return (type(conv).__name__, tuple(conv.weight.shape), conv.stride, str(conv.padding),
            conv.dilation, conv.groups, conv.padding_mode, conv.bias is not None,
            getattr(conv, "output_padding", None),
            tuple(x.shape), cl, x.dtype, str(x.device))


class LayerTimer:
    """Times layers of one model on their captured inputs (see the module docstring)."""

    def __init__(self, model: nn.Module, config: DecomposeConfig, input_shape: tuple[int, ...], *,
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
            names = [n for n, m in self.model.named_modules() if is_factorizable(m)]
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

    def planned_fraction(self, planned: nn.Module) -> float | None:
        """The whole ``planned`` model's time as a fraction of the original's: the median of
        per-round paired ratios, both timed interleaved on the planner's input (None with an
        injected ``latency_fn``: its per-layer times are the whole truth there)."""
        if self.latency_fn is not None:
            return None
        res = compare_latency({"original": self.model, "planned": planned}, self.x,
                              repeats=REPEATS, warmup=WARMUP,
                              timer=self.timer or time.perf_counter, threads=self.config.threads)
        return 1.0 / speedups(res, "original")["planned"]

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


def forms_for(form: str, method: Method, module: LowRankConv) -> list[str]:
    """The forms a config's ``form`` allows for one built layer; empty when ``"auto"`` expects
    the dense conv to be as fast (the layer should then stay original). A method without the
    named form builds its plain form."""
    if form == "plain":
        return ["plain"]
    if form == "auto":
        a = method.auto_form(module)
        return [] if a is None else [a]
    have = list(method.forms(module))
    if form == "fastest":
        return have
    return [form] if form in have else have[:1]


def option_label(cand: Any, rank: Any, form: str) -> str:
    """How the planner names a timed option (``latency_fn``'s ``label``):
    ``"<method>[/<variant>]/T<rank>/<form>"``, e.g. ``"nd/dw-pw/T2/dw1"``."""
    r = "x".join(map(str, rank)) if isinstance(rank, tuple) else rank
    return f"{cand.label}/T{r}/{form}"


def _not_faster(best: str, after: float, before: float, config: DecomposeConfig) -> str:
    return (f"kept original: decomposing is not faster ({best} {after:.3f} ms vs original "
            f"{before:.3f} ms at batch {config.latency_batch}; needs {config.latency_margin}x)")


def _set_form(lp: Any, module: LowRankConv, method: Method, form: str) -> None:
    """Record the form a planned layer is built in, and that form's parameter count."""
    built = registry.to_form(module, form)
    lp.form = built.form
    lp.params_after = sum(p.numel() for p in built.parameters())


def choose_forms(model: nn.Module, plans: list, config: DecomposeConfig,
                 timing: LayerTimer | None) -> None:
    """Give every planned layer of ``plans`` its form (``lp.form``), keeping the original
    where the chosen form is not faster (the method's untimed rule, or measured with
    ``timing``)."""
    for lp in plans:
        if lp.skipped is not None:
            continue
        conv = model.get_submodule(lp.name)
        cand, i = lp.choice
        method = registry.get(cand.method)
        seq = registry.build(conv, cand, i)
        forms = forms_for(config.form, method, seq)
        if not forms:
            lp.keep(f"kept original: decomposing is not faster (form auto: "
                    f"{method.auto_note(seq)})")
            continue
        form = forms[0]
        if config.timed:
            mods = {"original": conv, **{option_label(cand, lp.rank, f):
                                         registry.to_form(seq, f) for f in forms}}
            ms = timing.time(lp.name, conv, mods)
            form = min(forms, key=lambda f: ms[option_label(cand, lp.rank, f)])
            before, after = ms["original"], ms[option_label(cand, lp.rank, form)]
            lp.plan_ms_before, lp.plan_ms_after = before, after
            if before < config.latency_margin * after:
                lp.keep(_not_faster(form, after, before, config))
                lp.plan_ms_before, lp.plan_ms_after = before, after
                continue
        _set_form(lp, seq, method, form)


def latency_budget(model: nn.Module, budgeted: list, config: DecomposeConfig,
                   timing: LayerTimer) -> None:
    """``--target-latency F``: per layer (method, variant, rank, form) under a measured latency
    budget.

    Costs are measured ms: whole model = (measured whole-model ms - sum of the budgeted layers'
    original ms) + sum of every budgeted layer's chosen option's ms. Options not faster than the
    original by the margin are dropped. :func:`decompose.planning.budget.optimise` (the
    MACs/params budget's optimiser) minimises the summed squared relative error under
    ``F * whole``.
    """
    layers = []
    why: dict[str, str] = {}
    for lp, cands in budgeted:
        conv = model.get_submodule(lp.name)
        modules: dict[str, nn.Module] = {"original": conv}
        what: dict[str, tuple] = {}
        for c in cands:
            method = registry.get(c.method)
            for i in range(len(c)):
                if c.macs[i] >= lp.macs_before:
                    continue
                seq = registry.build(conv, c, i)
                for form in forms_for(config.form, method, seq):
                    label = option_label(c, c.ranks[i], form)
                    modules[label] = registry.to_form(seq, form)
                    what[label] = (c, i, form, seq, method)
        ms = timing.time(lp.name, conv, modules)
        before = ms["original"]
        opts = [Option(before, 0.0, None)]
        for label, (c, i, form, seq, method) in what.items():
            if config.latency_margin * ms[label] <= before:
                opts.append(Option(ms[label], c.alloc_error(i) ** 2,
                                   (c, i, form, seq, method, modules[label])))
        layers.append(opts)
        lp.plan_ms_before = before
        if len(opts) == 1:
            best = min(what, key=ms.get) if what else None
            why[lp.name] = (_not_faster(best, ms[best], before, config) if best else
                            "kept original: no decomposed option costs fewer MACs")
    whole = timing.whole()
    orig_sum = sum(o[0].cost for o in layers)
    remainder = max(whole - orig_sum, 0.0)
    fraction = config.target_latency
    budget = fraction * whole - remainder
    cheapest = sum(min(o.cost for o in opts) for opts in layers)
    timing.summary.update(whole_ms=whole, remainder_ms=remainder, layers_ms=orig_sum)
    if cheapest > budget:
        raise BudgetError(
            f"--target-latency {fraction} cannot be met: the fastest plan measured takes "
            f"{(remainder + cheapest) / whole:.3f} of the original's {whole:.3f} ms at batch "
            f"{config.latency_batch}; raise it to at least that")
    choice = optimise(layers, budget)
    measured = [timing.planned_fraction(_planned_model(model, budgeted, layers, choice))]
    while (measured[-1] is not None and measured[-1] > fraction + VERIFY_TOLERANCE
           and len(measured) <= VERIFY_ROUNDS):
        if budget <= cheapest:
            break  # already the fastest plan
        budget = max(budget - (measured[-1] - fraction) * whole, cheapest)  # what the sum missed
        choice = optimise(layers, budget)
        measured.append(timing.planned_fraction(_planned_model(model, budgeted, layers, choice)))
    predicted = remainder
    for (lp, _), opts, j in zip(budgeted, layers, choice):
        cost, _, payload = opts[j]
        predicted += cost
        if payload is None:
            lp.skipped = why.get(lp.name) or "kept original: the latency budget is better spent elsewhere"
            continue
        c, i, form, seq, method, _built = payload
        lp.take(c, i)
        _set_form(lp, seq, method, form)
        lp.plan_ms_after = cost
    timing.summary.update(predicted_ms=predicted, predicted_fraction=predicted / whole,
                          target_latency=fraction)
    if measured[-1] is not None:
        timing.summary.update(measured_fraction=measured[-1], measured_rounds=measured,
                              met=measured[-1] <= fraction + VERIFY_TOLERANCE)


def _planned_model(model: nn.Module, budgeted: list, layers: list, choice: list) -> nn.Module:
    """A copy of ``model`` with every budgeted conv replaced by its chosen option's module
    (the built, formed module the option was timed as: the payload's last item)."""
    planned = copy.deepcopy(model)
    for (lp, _), opts, j in zip(budgeted, layers, choice):
        payload = opts[j].payload
        if payload is not None:
            replace_module(planned, lp.name, copy.deepcopy(payload[-1]))
    if is_channels_last(model):
        to_channels_last_(planned)  # as decompose_ lays out the model it builds
    return planned.eval()
