"""Label-free calibration: refit every decoupled layer to the original layer's output.

    import copy, decompose
    original = copy.deepcopy(model)
    decompose.decompose_(model, rank=3, exclude=("conv1",))
    report = decompose.calibrate_(model, original, batches)   # unlabeled images, e.g. 512
    print(report)

(``decompose.decompose_(model, config, calibration=batches)`` does both.) Walking the
factorized layers (any method) in forward order, each one is fitted so that, fed with the
*decoupled* network's own activations (its input in the calibrated-so-far decoupled model), its
output matches the *original* layer's output in the original model on the same images. Errors
made earlier are thereby corrected later instead of compounding. No labels, no gradients: each
fit is a ridge least-squares problem solved from accumulated second moments
(:mod:`decompose.refit`), so memory does not depend on the number of images; a batch's forward
pass is paused at the current layer and resumed for the next (:mod:`decompose._replay`), so the
whole calibration costs about one forward pass of each model per image plus the solves.
See docs/calibration.md for what each part gains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import methods as registry
from ..config import CalibrationConfig
from ..engine.trace import device_of as _device
from ..engine.trace import eval_mode
from ..errors import DecomposeError
from ..kernels import lstsq
from ..kernels.transposed import own_layout, regular_layout
from ..methods.convs import is_factorizable, set_weights, transposed
from ..methods.module import LowRankConv, is_lowrank
from ..progress import progress as _progress
from ._replay import GraphReplay, HookReplay, call_order

JOINT_MAX_DIM = 4096  # patch features (C_in/g * K) or depthwise unknowns above this: last conv only


@dataclass
class LayerCalibration:
    """What calibration did to one factorized layer.

    ``error_before``/``error_after``: relative output error ``||y_hat - y|| / ||y||`` of the layer
    on the calibration images, where ``y`` is the original layer's output in the original model
    and ``y_hat`` this layer's output on its input in the factorized model (so the "before"
    figure includes the drift of the layers before it). ``method``/``order``/``rank``: how the
    layer was factorized (``order`` is the method's variant). ``fit``: ``"joint"`` (every factor,
    from patch statistics) or ``"last"`` (one least-squares fit of the conv that produces the
    output).
    """

    name: str
    order: str
    rank: Any
    fit: str
    error_before: float
    error_after: float
    rows: int
    seconds: float
    note: str | None = None
    method: str = "nd"


@dataclass
class CalibrationReport:
    """Per-layer results and the run's settings. ``mode`` is ``"replay"`` (paused and resumed
    forward passes) or ``"recompute"`` (the model did not trace with torch.fx: every layer re-ran
    the network from the input)."""

    layers: list[LayerCalibration]
    skipped: dict[str, str]
    samples: int
    seconds: float
    mode: str
    threads: int
    cache_peak_mb: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(lc) for lc in self.layers]
        return d

    def __str__(self) -> str:
        head = f"{'layer':<28} {'order':<6} {'T':>2} {'fit':<5} {'err before':>10} {'err after':>9}"
        lines = [head, "-" * len(head)]
        for lc in self.layers:
            lines.append(f"{lc.name:<28} {lc.order or lc.method:<6} {_rank(lc.rank):>2} {lc.fit:<5} "
                         f"{lc.error_before:>10.4f} {lc.error_after:>9.4f}"
                         + (f"  ({lc.note})" if lc.note else ""))
        for name, why in self.skipped.items():
            lines.append(f"{name:<28} skipped: {why}")
        lines.append(f"{len(self.layers)} layers calibrated on {self.samples} images in "
                     f"{self.seconds:.1f} s ({self.mode}, {self.threads} threads, "
                     f"cache peak {self.cache_peak_mb:.0f} MB)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ inputs


class _Inputs:
    """Up to ``samples`` input tensors from ``batches`` (tensors or (x, y) pairs), re-iterable.

    A re-iterable source (a list, a DataLoader) is iterated again when needed; a one-shot
    iterator (a generator) is read once and its first ``samples`` images kept in memory.
    """

    def __init__(self, batches: Any, samples: int) -> None:
        if isinstance(batches, torch.Tensor):
            if batches.dim() < 2:
                raise DecomposeError(f"calibration input must have a batch dimension, got shape "
                                     f"{tuple(batches.shape)}; pass a batch like (N, C, H, W)")
            batches = list(batches.split(64))
        if not isinstance(batches, Iterable):
            raise DecomposeError(f"batches must be an iterable of input tensors or (inputs, "
                                 f"labels) pairs, got {type(batches).__name__}; pass e.g. "
                                 f"decompose.data.calibration_batches(path)")
        self.samples = samples
        self.batches = batches
        self.stored: list[torch.Tensor] | None = None
        if iter(batches) is batches:  # one-shot
            self.stored = list(self._take())

    def _take(self) -> Iterator[torch.Tensor]:
        n = 0
        for b in self.batches:
            x = b[0] if isinstance(b, (tuple, list)) and b else b
            if not isinstance(x, torch.Tensor):
                raise DecomposeError(f"a calibration batch is a {type(x).__name__}, not a tensor; "
                                     f"give input tensors or (inputs, labels) pairs")
            if x.dim() < 2 or len(x) == 0:
                raise DecomposeError(f"a calibration batch has shape {tuple(x.shape)}; give "
                                     f"batches with a batch dimension, like (N, C, H, W)")
            x = x[: self.samples - n].detach()
            n += len(x)
            yield x
            if n >= self.samples:
                return
        if n == 0:
            raise DecomposeError("no calibration images: the batches were empty; give at least "
                                 "one batch of unlabeled images (512 is a good number)")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.stored) if self.stored is not None else self._take()


# -------------------------------------------------------------------------------------- layers


@dataclass
class _Layer:
    name: str
    seq: nn.Module
    conv: nn.Module  # the original conv (or the layer itself): patch geometry and groups
    after: nn.Module  # applied to the original conv's output to get the target: a folded BN or
    # nn.Identity


def _folded_bns(model: nn.Module, original: nn.Module, example: Any) -> dict[str, str]:
    """conv name -> BN name for BNs folded into convs of ``model`` (Identity there, BN in
    ``original``); ``example()``: an input batch, for an original fx cannot trace."""
    maybe = any(isinstance(m, nn.Identity)
                and isinstance(_submodule(original, n), nn.modules.batchnorm._BatchNorm)
                for n, m in model.named_modules())
    if not maybe:
        return {}
    from ..engine.fold import find_conv_bn_pairs
    return {c: b for c, b in find_conv_bn_pairs(original, example=example())
            if isinstance(_submodule(model, b), nn.Identity)}


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
             "groups", "padding_mode", "transposed", "output_padding")


def _match(name: str, seq: LowRankConv, original: nn.Module, folded: dict[str, str]) -> _Layer:
    conv = _submodule(original, name)
    fix = "pass the untouched model the factorized one was made from (copy.deepcopy it first)"
    if conv is None or not is_factorizable(conv):
        raise DecomposeError(f"the original model has no conv named {name}; {fix}")
    if any(getattr(seq, a) != getattr(conv, a) for a in _GEOMETRY):
        raise DecomposeError(f"layer {name} does not match the original conv {tuple(conv.weight.shape)} "
                             f"(shape, stride, padding or groups differ); {fix}")
    after = original.get_submodule(folded[name]) if name in folded else nn.Identity()
    return _Layer(name, seq, conv, after)


def _rank(r: Any) -> str:
    return "x".join(map(str, r)) if isinstance(r, (tuple, list)) else str(r)


# ------------------------------------------------------------------------------------- the fit


class _Sampler:
    """A seeded random subset of at most ``per_image`` output pixels per image (all if None)."""

    def __init__(self, per_image: int | None, seed: int) -> None:
        self.per_image = per_image
        self.gen = torch.Generator().manual_seed(seed)

    def rows(self, total: int, images: int) -> torch.Tensor | None:
        if self.per_image is None or total <= self.per_image * images:
            return None
        return torch.randperm(total, generator=self.gen)[: self.per_image * images]


def _rows(layer: _Layer, x: torch.Tensor, y: torch.Tensor, joint: bool,
          rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares problem's rows ``(u, y)``: patches of the layer input (joint fit) or of
    the first conv's output under the last conv (last-conv fit), and the target pixels; only the
    pixels in ``rows`` when given."""
    if joint:
        if layer.seq.prefix is not None:  # a 'same'-padding conv pads before its conv
            x = layer.seq.prefix(x)
        u = lstsq.patches(x, layer.conv, rows)
        groups = layer.conv.groups
    else:
        *head, last = list(layer.seq)
        for part in head:
            x = part(x)
        u = lstsq.patches(x, last, rows)
        groups = last.groups
    yy = lstsq.pixels(y, groups)
    return u, (yy if rows is None else yy[rows])


def _wants_joint(layer: _Layer, joint: bool) -> tuple[bool, str | None]:
    if not joint:
        return False, None
    n = registry.get(layer.seq.method).unknowns(layer.seq)
    if n > JOINT_MAX_DIM:
        return False, f"too wide for the joint fit ({n} > {JOINT_MAX_DIM})"
    return True, None


def _objective(w: torch.Tensor, bias: torch.Tensor | None, m: lstsq.Moments) -> float:
    return float(lstsq.objective(lstsq.with_bias(w, bias), m).sum())


def generic_refit(module: LowRankConv, m: lstsq.Moments, *, ridge: float, iterations: int,
                  add_bias: bool, steps: int = 30) -> tuple[float, float]:
    """The joint refit of any method: minimise ``sum ||y - W(theta) u - b||^2`` over every
    factor ``theta`` of the layer at once, where ``W(theta)`` is the kernel the method composes
    (:meth:`decompose.methods.base.Method.compose`, differentiable) and the sum is read from the
    patch moments ``m``; L-BFGS in float64 from the current factors, with the ridge pulling
    towards them. ``iterations`` + 1 rounds of ``steps`` L-BFGS steps. In place; returns the
    objective before and after (the factors are kept only if it fell)."""
    method = registry.get(module.method)
    params = [p for p in module.parameters()]
    saved = [p.detach().clone() for p in params]  # clone keeps the memory layout
    bias_param = None
    last = module[-1]
    if add_bias and module.bias is None and hasattr(last, "bias") and last.bias is None:
        last.bias = nn.Parameter(torch.zeros(last.out_channels, dtype=last.weight.dtype,
                                             device=last.weight.device))
        bias_param = last.bias
        params.append(bias_param)
        saved.append(bias_param.detach().clone())
    g = module.groups
    scale = max(float(m.yy.sum()), 1e-30)

    def loss_of() -> torch.Tensor:
        w, b = method.compose(module)
        w = regular_layout(w, g, transposed(module)).double().reshape(g, module.out_channels // g, -1)
        b = None if b is None else b.double().reshape(g, -1)
        return lstsq.objective(lstsq.with_bias(w, b), m).sum()

    with torch.no_grad():
        before = float(loss_of())
    originals = [p.detach().double().contiguous() for p in params]
    for p in params:  # L-BFGS flattens with .view(-1): contiguous here (channels_last is not)
        p.data = p.data.double().contiguous()
    lam = ridge * scale / max(sum(p.numel() for p in params), 1)
    opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of() / scale
        if lam:
            loss = loss + lam / scale * sum(((p - o) ** 2).sum() for p, o in zip(params, originals))
        loss.backward()
        return loss

    with torch.enable_grad():
        for _ in range(iterations + 1):
            opt.step(closure)
    with torch.no_grad():
        after = float(loss_of())
    for p, s0 in zip(params, saved):  # back to each factor's dtype and memory layout
        p.data = torch.empty_like(s0).copy_(p.data)
        p.grad = None
    if not (after <= before) or not math.isfinite(after):
        with torch.no_grad():
            for p, s0 in zip(params, saved):
                p.copy_(s0)
        if bias_param is not None:
            last.bias = None
        return before, before
    return before, after


def _solve(layer: _Layer, m: lstsq.Moments, joint: bool, ridge: float, iterations: int,
           add_bias: bool) -> tuple[float, float]:
    """Refit the layer from its moments in place; return (objective before, after)."""
    if joint:
        method = registry.get(layer.seq.method)
        done = method.refit(layer.seq, m, ridge=ridge, iterations=iterations, add_bias=add_bias)
        if done is not None:
            return done
        return generic_refit(layer.seq, m, ridge=ridge, iterations=iterations, add_bias=add_bias)
    last = layer.seq[-1]
    g = last.groups
    tr = transposed(last)  # a transposed conv's patches pair with its adjoint-layout weight
    w = regular_layout(last.weight.detach(), g, tr).double().reshape(g, last.out_channels // g, -1)
    bias = last.bias.detach().double().reshape(g, -1) if last.bias is not None else None
    if bias is None and add_bias:
        bias = torch.zeros(w.shape[:2], dtype=torch.float64, device=w.device)
    before = _objective(w, bias, m)
    w2, b2 = lstsq.full_solve(m, w, bias, ridge)
    after = _objective(w2, b2, m)
    if after <= before:
        kernel = w2.reshape(last.out_channels, last.in_channels // g, *last.kernel_size)
        set_weights(last, own_layout(kernel, g, tr), b2)
    return before, min(before, after)


# --------------------------------------------------------------------------------------- API


def calibrate_(model: nn.Module, original: nn.Module, batches: Iterable[Any],
               config: CalibrationConfig | None = None, *, progress: bool = True,
               **fields: Any) -> CalibrationReport:
    """Refit the factorized layers of ``model`` in place, without labels; return a report.

    Args:
        model: the factorized model (after :func:`decompose.decompose_`), changed in place.
        original: the untouched model it was made from (same module names), not changed.
        batches: an iterable of input tensors or ``(inputs, labels)`` pairs (labels are
            ignored), e.g. ``decompose.data.calibration_batches(path)`` or a DataLoader; a
            one-shot iterator is read once and its images kept, a re-iterable one is re-read when
            needed. A single tensor (N, ...) is split into batches of 64.
        config: a :class:`decompose.CalibrationConfig` (images, joint or last-conv fit, ridge,
            iterations, bias, pixel subsets, cache, seed); keyword ``fields`` build or amend
            it (``samples=256``). The joint fit refits every factor of a layer (the method's
            own solve where it has one, Network Decoupling's alternating least squares, else
            :func:`generic_refit`); ``method="last"`` only the conv that produces the output:
            fewer unknowns, less accurate (docs/calibration.md).
        progress: show a progress bar on stderr. Default True.

    Raises:
        DecomposeError: no factorized layers, an original that does not match, bad batches or
            settings.
    """
    if config is None:
        config = CalibrationConfig(**fields)
    elif fields:
        config = CalibrationConfig.from_dict({**config.to_dict(), **fields})
    if not isinstance(model, nn.Module) or not isinstance(original, nn.Module):
        raise DecomposeError("calibrate_ needs the factorized model and the original model (both "
                             "nn.Module); pass (model, original, batches)")
    if model is original:
        raise DecomposeError("model and original are the same object; keep a copy of the original "
                             "(copy.deepcopy) before decompose_ and pass it as original")
    samples, ridge, iterations = config.samples, config.ridge, config.iterations
    add_bias, pixels_per_image, seed = config.add_bias, config.pixels_per_image, config.seed
    cache_mb, joint_fit = config.cache_mb, config.method == "joint"
    names = [n for n, m in model.named_modules() if is_lowrank(m)]
    if not names:
        raise DecomposeError("the model has no factorized layers; run decompose.decompose_(model, "
                             "...) on it first, then calibrate")
    fast = [n for n in names if model.get_submodule(n).form != "plain"]
    if fast:
        raise DecomposeError(f"layer {fast[0]} is not in its plain form; convert it first with "
                             "decompose.api.plain_forms_(model), then calibrate")
    t0 = time.perf_counter()
    inputs = _Inputs(batches, samples)
    folded = _folded_bns(model, original,
                         lambda: next(iter(inputs))[:2].to(_device(original)))
    layers = [_match(n, model.get_submodule(n), original, folded) for n in names]
    dev_m, dev_o = _device(model), _device(original)
    results: list[LayerCalibration] = []
    skipped: dict[str, str] = {}
    with eval_mode(model, original), torch.no_grad():
        first = next(iter(inputs))
        counts = call_order(model, names, first[:2].to(dev_m))
        by_name = {lay.name: lay for lay in layers}
        for n in names:
            if n not in counts:
                skipped[n] = "not called in a forward pass"
            elif counts[n] > 1:
                skipped[n] = f"called {counts[n]} times per forward pass (shared module)"
        ordered = [by_name[n] for n in counts if n not in skipped]
        runner = _runner(model, original, [lay.name for lay in ordered],
                         (first[:2].to(dev_m), first[:2].to(dev_o)))
        states = _Batches(runner, inputs, (dev_m, dev_o), cache_mb * 2**20)
        sampler = _Sampler(pixels_per_image, seed)
        n_images = 0
        bar = _progress(ordered, desc="calibrate", unit="layer", quiet=not progress)
        for layer in bar:
            t1 = time.perf_counter()
            joint, note = _wants_joint(layer, joint_fit)
            if not joint and not is_factorizable(list(layer.seq)[-1]):
                joint, note = True, "its last part is not a conv: fitted jointly"
            m: lstsq.Moments | None = None
            n_images = 0
            for i, state in states:
                x_dec, y = runner.inputs(state, layer.name)
                y = layer.after(y).to(dev_m)
                rows = sampler.rows(y[0, 0].numel() * len(y), len(y))
                u, yy = _rows(layer, x_dec, y, joint, None if rows is None else rows.to(y.device))
                if m is None:
                    m = lstsq.Moments(u.shape[1], u.shape[2], yy.shape[2], device=u.device)
                m.add(u, yy)
                n_images += len(x_dec)
                del u, yy, y, x_dec
                states.keep(i, state)
            before, after = _solve(layer, m, joint, ridge, iterations, add_bias)
            norm = max(float(m.yy.sum()), 1e-30)
            lc = LayerCalibration(layer.name, layer.seq.variant, layer.seq.rank,
                                  "joint" if joint else "last",
                                  math.sqrt(max(before, 0) / norm), math.sqrt(max(after, 0) / norm),
                                  m.rows, time.perf_counter() - t1, note, layer.seq.method)
            results.append(lc)
            bar.set_postfix_str(f"{layer.name} err {lc.error_before:.3f}->{lc.error_after:.3f}")
        bar.close()
    settings = config.to_dict()
    return CalibrationReport(results, skipped, n_images, time.perf_counter() - t0, runner.mode,
                             torch.get_num_threads(), states.peak / 2**20, settings)


def _runner(model, original, names, example):
    try:
        return GraphReplay(model, original, names, example)
    except Exception:  # noqa: BLE001 - any failure to trace or replay means: run from the input
        return HookReplay(model, original)


class _Batches:
    """(batch index, paused state) for every batch, from the cache of paused passes where it has
    one, else started from the input; once every batch is cached the source is not read again."""

    def __init__(self, runner, inputs: _Inputs, devices, budget: float) -> None:
        self.runner, self.inputs, self.devices, self.budget = runner, inputs, devices, budget
        self.cache: dict[int, Any] = {}
        self.used = self.peak = 0
        self.count: int | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        self.used = 0
        if self.count is not None and len(self.cache) == self.count:
            for i in range(self.count):
                yield i, self.cache.pop(i)
            return
        n = 0
        for i, x in enumerate(self.inputs):
            n = i + 1
            state = self.cache.pop(i, None)
            if state is None:
                state = self.runner.start(*(_fast_layout(x.to(d)) for d in self.devices))
            yield i, state
        self.count = n

    def keep(self, i: int, state: Any) -> None:
        """Cache batch ``i``'s paused pass if the runner can resume and it fits the budget."""
        if not self.runner.resumable:
            return
        size = self.runner.nbytes(state)
        if self.used + size <= self.budget:
            self.cache[i] = state
            self.used += size
            self.peak = max(self.peak, self.used)


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last inputs: the whole forward pass then runs channels-last, which on CPU makes
    depthwise and 1x1 convs several times faster (the models are not changed)."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x
