"""CP factorizations of a conv (Lebedev et al., ICLR 2015), registered as ``"cp"`` and ``"cp4"``.

A rank-``R`` CP of each group's kernel tensor becomes a chain of standard convs (``R`` per group,
``g`` groups):

``cp`` (3-way, the ``(C_out, C_in, K)`` tensor)
    ``conv_in``: 1x1, ``C_in -> g*R`` (groups ``g``); ``conv_dw``: the full ``k`` kernel,
    depthwise on ``g*R`` channels, with the conv's stride, padding, dilation and padding mode;
    ``conv_out``: 1x1, ``g*R -> C_out`` (groups ``g``), with the conv's bias.
``cp4`` (one factor per spatial axis: the 4-way ``(C_out, C_in, k_h, k_w)`` tensor in 2-D)
    ``conv_in``; then one depthwise conv per spatial axis whose kernel size is above 1
    (``conv_dw0``: ``k_h x 1``, ``conv_dw1``: ``1 x k_w``; three for a 3-D ``k x k x k``), each
    with the stride, padding and dilation of its own axis (axes of kernel size 1 travel with
    ``conv_dw0``); ``conv_out``. On a conv with a single spatial axis of size above 1 (every
    1-D conv) it is the same chain as ``cp``, so ``cp4`` leaves those to ``cp`` (skip reason).

Every chain is exact for every padding mode, ``padding="same"``/``"valid"``, stride and dilation:
a bias-free 1x1 conv commutes with any padding (zeros stay zeros; reflect, replicate and
circular copy pixels), and a depthwise conv along one axis commutes with the padding of the
others for the same reason, so the chain computes exactly the conv whose kernel is the rebuilt
CP (tests/test_cp.py checks every mode against ``F.conv`` on that kernel).

The maths (tensorly's ALS, warm starts, the exact construction) is in :mod:`decompose.kernels.cp`.
Ranks offered:

* ``ranks=None`` (budgets): a geometric menu of :data:`MENU_FRACTIONS` of ``R_eq``, the rank at
  which the chain costs as much as the conv (in MACs, from the traced shapes, or in parameters,
  whichever is smaller), so every option is cheaper than the original. The largest is fitted
  from tensorly's SVD initialisation with :data:`MENU_SWEEPS` ALS sweeps, every smaller one
  from the previous fit truncated to its largest components with :data:`WARM_SWEEPS` sweeps
  (:func:`decompose.kernels.cp.fit_ladder`). Fits are cached per kernel (:data:`CACHE_FLOATS`),
  so planning the same model at several budgets fits once.
* ``ranks=[T]``: one fit at ``T`` from the SVD initialisation with :data:`FIXED_SWEEPS` sweeps;
  ``T`` is capped at the exact rank.
* ``"full"``: the exact rank ``prod(dims) / max(dims)`` of each group's tensor (e.g. 576 for a
  64x64x3x3 kernel), built by construction (:func:`decompose.kernels.cp.exact`): exact, and
  more expensive than the conv (2.1x its MACs for 64x64x3x3), as ``"full"`` is for checking.

Errors are the true relative kernel errors ``||W - W_hat|| / ||W||`` of the factors that
:meth:`CPMethod.build` puts in the layer (float64), never the solver's estimate.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..kernels import cp as kcp
from ..progress import progress
from .base import Candidate, Method, bias_params
from .convs import conv_dim, new_conv, taps
from .module import LowRankConv
from .registry import register

#: Cost fractions of ``R_eq`` in the budget menu: ``0.71 * 2^(-j/2)``, j = 0..7 (0.71 down to
#: 0.0625), ranks rounded down and deduplicated.
MENU_FRACTIONS = tuple(0.71 * 2 ** (-j / 2) for j in range(8))
#: ALS sweeps of the largest menu rank (from the SVD initialisation).
MENU_SWEEPS = 40
#: ALS sweeps of every smaller menu rank (warm-started from the fit above it).
WARM_SWEEPS = 15
#: ALS sweeps of a fixed rank (``--rank T``), from the SVD initialisation.
FIXED_SWEEPS = 200
#: Stopping tolerance on the change of the relative error in one sweep.
TOL = 1e-6
#: Ridge of every ALS least-squares step, on the kernel tensor scaled to unit norm (tensorly's
#: ``l2_reg``): it keeps components from growing large and cancelling (CP degeneracy) and, at
#: these bounded sweeps, also lowers the error (docs/methods.md).
L2_REG = 1e-3
#: Most ALS work (multiply-adds, :func:`decompose.kernels.cp.sweep_cost`) for one layer's menu or
#: fixed-rank fit; above it the sweeps shrink in proportion, down to :data:`MIN_SWEEPS`. No
#: layer of the CIFAR ResNets comes near it (a 64x64x3x3 menu is about 3e9); a 512x512x3x3 one
#: (VGG16) would need 1.6e12 and gets a few sweeps: CP at these ranks is that expensive.
MAX_WORK = 6e10
#: The fewest sweeps of the largest menu rank and of each smaller one when work is capped.
MIN_SWEEPS = (2, 1)
#: Torch threads while fitting and measuring errors (None: as set).
THREADS: int | None = 1
#: The fit cache holds at most this many float64 numbers (factors of every cached fit, 256 MiB).
CACHE_FLOATS = 32 * 2**20


# ------------------------------------------------------------------------------- geometry


def spatial_modes(conv: nn.Module, ways: str) -> kcp.Modes:
    """The kernel's spatial modes for ``ways`` (``"cp"``: one; ``"cp4"``: one per axis of kernel
    size above 1)."""
    if ways == "cp":
        return kcp.one_mode(conv_dim(conv))
    return kcp.axis_modes(conv.kernel_size)


def costs(conv: nn.Module, call: Any, modes: kcp.Modes) -> tuple[int, int]:
    """(MACs, parameters without bias) per unit of rank R, from the traced shapes.

    ``conv_in`` runs at the input size; the depthwise factor of mode ``j`` at the size where the
    axes of modes ``<= j`` already have their output size; ``conv_out`` at the output size."""
    g, c_in, c_out = conv.groups, conv.in_channels, conv.out_channels
    in_sp, out_sp = list(call.in_shape[2:]), list(call.out_shape[2:])
    k = [int(s) for s in conv.kernel_size]
    macs = c_in * math.prod(in_sp)
    params = c_in + c_out
    size = list(in_sp)
    for mode in modes:
        for a in mode:
            size[a] = out_sp[a]
        t = math.prod(k[a] for a in mode)
        macs += g * t * math.prod(size)
        params += g * t
    macs += c_out * math.prod(out_sp)
    return macs, params


def equal_cost_rank(conv: nn.Module, call: Any, modes: kcp.Modes) -> float:
    """``R_eq``: the (fractional) rank at which the chain costs as much as the conv, in MACs or
    in parameters, whichever comes first."""
    macs, params = costs(conv, call, modes)
    dense_macs = conv.out_channels * (conv.in_channels // conv.groups) * taps(conv) * math.prod(
        call.out_shape[2:])
    dense_params = conv.weight.numel()
    return min(dense_macs / macs, dense_params / params)


def menu_sweeps(dims: tuple[int, ...], groups: int, ranks: list[int]) -> tuple[int, int]:
    """(sweeps of the largest menu rank, of every smaller one): :data:`MENU_SWEEPS` and
    :data:`WARM_SWEEPS`, scaled down together when their work exceeds :data:`MAX_WORK`."""
    top, *rest = sorted(ranks, reverse=True)
    work = groups * (MENU_SWEEPS * kcp.sweep_cost(dims, top)
                     + WARM_SWEEPS * sum(kcp.sweep_cost(dims, r) for r in rest))
    scale = min(1.0, MAX_WORK / max(work, 1))
    return (max(MIN_SWEEPS[0], math.floor(MENU_SWEEPS * scale)),
            max(MIN_SWEEPS[1], math.floor(WARM_SWEEPS * scale)))


def fixed_sweeps(dims: tuple[int, ...], groups: int, rank: int) -> int:
    """:data:`FIXED_SWEEPS`, scaled down when their work exceeds :data:`MAX_WORK`."""
    work = groups * FIXED_SWEEPS * kcp.sweep_cost(dims, rank)
    return max(MIN_SWEEPS[0], math.floor(FIXED_SWEEPS * min(1.0, MAX_WORK / max(work, 1))))


def menu_ranks(conv: nn.Module, call: Any, modes: kcp.Modes) -> list[int]:
    """The budget menu: :data:`MENU_FRACTIONS` of ``R_eq``, strictly cheaper than the conv,
    below the exact rank, increasing."""
    r_eq = equal_cost_rank(conv, call, modes)
    top = kcp.exact_rank(conv.weight.shape, conv.groups, modes) - 1
    rs = {min(top, max(1, math.floor(f * r_eq))) for f in MENU_FRACTIONS}
    return sorted(r for r in rs if 1 <= r < r_eq)


# ------------------------------------------------------------------------------- fit cache


class _Cache:
    """Fits by (kernel bytes, geometry, ranks, settings), least recently used evicted first."""

    def __init__(self, floats: int) -> None:
        self.floats = floats
        self.items: OrderedDict[tuple, dict[int, kcp.CPFactors]] = OrderedDict()

    @staticmethod
    def _size(fits: dict[int, kcp.CPFactors]) -> int:
        return sum(a.numel() for f in fits.values() for a in f.factors)

    def get(self, key: tuple) -> dict[int, kcp.CPFactors] | None:
        hit = self.items.get(key)
        if hit is not None:
            self.items.move_to_end(key)
        return hit

    def put(self, key: tuple, fits: dict[int, kcp.CPFactors]) -> None:
        if self._size(fits) > self.floats:
            return
        self.items[key] = fits
        while sum(self._size(v) for v in self.items.values()) > self.floats:
            self.items.popitem(last=False)

    def clear(self) -> None:
        self.items.clear()


_CACHE = _Cache(CACHE_FLOATS)


def clear_cache() -> None:
    """Forget every cached fit."""
    _CACHE.clear()


def _fingerprint(w: torch.Tensor) -> str:
    data = w.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()


def _label(conv: nn.Module) -> str:
    k = "x".join(str(int(s)) for s in conv.kernel_size)
    return f"{conv.out_channels}x{conv.in_channels // conv.groups}x{k}"


# ------------------------------------------------------------------------------- the methods


class CPMethod(Method):
    """The shared implementation of ``cp`` and ``cp4`` (they differ in their spatial modes)."""

    ways = "cp"

    def skip_reason(self, conv: nn.Module) -> str | None:
        if taps(conv) == 1:
            return "1x1 kernel: nothing spatial to factor"
        if conv.groups > 1 and conv.in_channels == conv.groups and conv.out_channels == conv.groups:
            return "already depthwise: a CP adds two 1x1 convs and saves nothing"
        return None

    # ---------------------------------------------------------------- candidates
    def candidates(self, conv, call, *, ranks=None, variants=None, seed=0) -> list[Candidate]:
        # many small tensor operations: one thread (THREADS) is faster, above all on a busy
        # machine, where a second thread mostly waits for a core
        with kcp.torch_threads(THREADS):
            return self._candidates(conv, call, ranks, seed)

    def _candidates(self, conv, call, ranks, seed) -> list[Candidate]:
        modes = spatial_modes(conv, self.ways)
        w = conv.weight.detach()
        exact_r = kcp.exact_rank(w.shape, conv.groups, modes)
        if ranks is None:
            rs = menu_ranks(conv, call, modes)
            if not rs:  # no rank is cheaper than the conv: offer rank 1 (the planner drops it)
                rs = [1]
            fits = self._ladder(conv, rs, modes, seed)
        else:
            rs = sorted({exact_r if r == "full" else min(int(r), exact_r) for r in ranks})
            if any(r < 1 for r in rs):
                raise ValueError(f"a CP rank must be >= 1, got {ranks}")
            fits = {r: self._fixed(conv, r, modes, seed) for r in rs}
        macs, params = costs(conv, call, modes)
        b = bias_params(conv)
        return [Candidate(
            self.name, "", rs, [kcp.relative_error(w, fits[r]) for r in rs],
            [macs * r for r in rs], [params * r + b for r in rs], None, full_rank=exact_r,
            state={"fits": fits, "modes": modes})]

    def _fixed(self, conv: nn.Module, rank: int, modes: kcp.Modes, seed: int) -> kcp.CPFactors:
        w = conv.weight.detach()
        if rank >= kcp.exact_rank(w.shape, conv.groups, modes):
            return kcp.exact(w, conv.groups, modes)
        sweeps = fixed_sweeps(kcp.tensor_dims(w.shape, conv.groups, modes), conv.groups, rank)
        key = (_fingerprint(w), tuple(w.shape), conv.groups, modes, ("fixed", rank),
               sweeps, TOL, L2_REG, int(seed))
        hit = _CACHE.get(key)
        if hit is not None:
            return hit[rank]
        with progress(total=sweeps * conv.groups, desc=f"{self.name} {_label(conv)}",
                      unit="sweep") as bar:
            f = kcp.fit(w, rank, conv.groups, modes, n_iter_max=sweeps, tol=TOL,
                        seed=seed, l2_reg=L2_REG, on_iteration=lambda: bar.update(1))
        _CACHE.put(key, {rank: f})
        return f

    def _ladder(self, conv: nn.Module, rs: list[int], modes: kcp.Modes, seed: int
                ) -> dict[int, kcp.CPFactors]:
        w = conv.weight.detach()
        top, warm = menu_sweeps(kcp.tensor_dims(w.shape, conv.groups, modes), conv.groups, rs)
        key = (_fingerprint(w), tuple(w.shape), conv.groups, modes, ("menu", *rs), top, warm,
               TOL, L2_REG, int(seed))
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        total = (top + warm * (len(rs) - 1)) * conv.groups
        with progress(total=total, desc=f"{self.name} {_label(conv)}", unit="sweep") as bar:
            fits = kcp.fit_ladder(w, rs, conv.groups, modes, n_iter_max=top,
                                  n_iter_warm=warm, tol=TOL, seed=seed,
                                  l2_reg=L2_REG, on_iteration=lambda: bar.update(1))
        _CACHE.put(key, fits)
        return fits

    # ---------------------------------------------------------------- build / compose
    def build(self, conv, cand, i, form="plain") -> LowRankConv:
        if form != "plain":
            raise ValueError(f"method {self.name} has only the plain form, not {form!r}")
        f = cand.state["fits"][cand.ranks[i]]
        return cp_layer(conv, f, self.name)

    def approx_kernel(self, conv, cand, i) -> torch.Tensor:
        return kcp.rebuild(cand.state["fits"][cand.ranks[i]])

    def compose(self, module: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
        return compose(module)


@register
class CP3(CPMethod):
    name = "cp"
    summary = "CP, 3-way (Lebedev et al. 2015): 1x1 C_in->R, depthwise k on R, 1x1 R->C_out"
    ways = "cp"


@register
class CP4(CPMethod):
    name = "cp4"
    summary = "CP, one factor per spatial axis: 1x1, k_h x 1 and 1 x k_w depthwise, 1x1"
    ways = "cp4"

    def skip_reason(self, conv: nn.Module) -> str | None:
        why = super().skip_reason(conv)
        if why is None and len(spatial_modes(conv, self.ways)) < 2:
            return "one spatial axis with kernel size above 1: cp4 is the same chain as cp here"
        return why


# ------------------------------------------------------------------------------- layers


def cp_layer(conv: nn.Module, f: kcp.CPFactors, method: str) -> LowRankConv:
    """The chain of ``f`` (:class:`decompose.kernels.cp.CPFactors` of ``conv``'s weight) as a
    :class:`LowRankConv` of ``torch.nn`` convs in ``conv``'s dtype and device: ``conv_in``, one
    depthwise conv per spatial mode (``conv_dw`` for one, else ``conv_dw0``, ``conv_dw1``, ...)
    carrying the geometry of its axes, ``conv_out`` with the bias."""
    if tuple(f.weight_shape) != tuple(conv.weight.shape) or f.groups != conv.groups:
        raise ValueError(f"factors of a {tuple(f.weight_shape)} kernel (groups {f.groups}) do "
                         f"not fit a conv of {tuple(conv.weight.shape)} (groups {conv.groups})")
    if not f.info.get("exact"):
        f = kcp.balanced(f)
    g, r, n = conv.groups, f.rank, conv_dim(conv)
    c_in, c_out = conv.in_channels, conv.out_channels
    k = [int(s) for s in conv.kernel_size]
    ones = (1,) * n
    a_out, a_in, *a_sp = f.factors
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    parts["conv_in"] = new_conv(conv, c_in, g * r, ones, groups=g,
                                weight=a_in.transpose(1, 2).reshape(g * r, c_in // g, *ones))
    for j, (mode, d) in enumerate(zip(f.modes, a_sp)):
        kernel = tuple(k[a] if a in mode else 1 for a in range(n))
        if isinstance(conv.padding, str):
            padding: Any = conv.padding
        else:
            padding = tuple(int(conv.padding[a]) if a in mode else 0 for a in range(n))
        name = "conv_dw" if len(f.modes) == 1 else f"conv_dw{j}"
        parts[name] = new_conv(
            conv, g * r, g * r, kernel, groups=g * r,
            stride=tuple(int(conv.stride[a]) if a in mode else 1 for a in range(n)),
            padding=padding,
            dilation=tuple(int(conv.dilation[a]) if a in mode else 1 for a in range(n)),
            padding_mode=conv.padding_mode,
            weight=d.transpose(1, 2).reshape(g * r, 1, *kernel))
    bias = conv.bias.detach() if conv.bias is not None else None
    parts["conv_out"] = new_conv(conv, g * r, c_out, ones, groups=g, bias=bias is not None,
                                 weight=a_out.reshape(c_out, r, *ones), bias_value=bias)
    out = LowRankConv(parts, like=conv, method=method, rank=r)
    out.train(conv.training)
    return out


def compose(module: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of the dense conv equal to a CP chain (differentiable; summed in
    float64, returned in the layer's dtype): ``W[o, i, k] = sum_r L[o, r] P[r, i] S[r, k]``
    with ``S`` the product of the depthwise kernels (each has size 1 off its own axes, so
    they broadcast to the full kernel)."""
    first, *dws, last = list(module)
    g = module.groups
    r = first.out_channels // g
    dtype = last.weight.dtype
    p = first.weight.double().reshape(g, r, -1)
    lw = last.weight.double().reshape(g, -1, r)
    s = dws[0].weight.double().reshape(g, r, *dws[0].kernel_size)
    for dw in dws[1:]:
        s = s * dw.weight.double().reshape(g, r, *dw.kernel_size)
    oi = (lw[:, :, None, :] * p.transpose(1, 2)[:, None, :, :]).flatten(1, 2)  # (g, o*i, r)
    w = torch.bmm(oi, s.reshape(g, r, -1))
    w = w.reshape(module.out_channels, p.shape[-1], *module.kernel_size).to(dtype)
    return w, last.bias


__all__ = ["CP3", "CP4", "CPMethod", "clear_cache", "compose", "costs", "cp_layer",
           "equal_cost_rank", "menu_ranks", "spatial_modes"]
