"""Kernel maths of Tucker-2 (Kim et al. 2016): HOSVD and HOOI on the two channel modes.

A convolution weight ``W`` has shape ``(C_out, C_in/g, *k)``, ``K = prod(k)`` taps, ``g``
groups; per group ``Co = C_out/g``, ``Ci = C_in/g``, and ``X`` is the group's ``(Co, Ci, K)``
block. Tucker-2 keeps the spatial mode whole and compresses the two channel modes:

    X ~= core x_0 U_out x_1 U_in,   X_hat[o, i, k] = sum_{p,q} U_out[o, p] core[p, q, k] U_in[i, q]

with orthonormal ``U_out`` ``(Co, R_out)`` and ``U_in`` ``(Ci, R_in)`` and ``core = U_out^T x_0 X
x_1 U_in^T`` ``(R_out, R_in, K)``. As convs: a 1x1 ``C_in -> g*R_in`` (``U_in^T``), a k x k
``g*R_in -> g*R_out`` (the core, the original geometry), a 1x1 ``g*R_out -> C_out`` (``U_out``),
all with ``groups = g``. Ranks are written ``(R_in, R_out)``, in forward order, and are the same
in every group.

* HOSVD (:func:`hosvd`): ``U_out`` = left singular vectors of the ``(Co, Ci*K)`` unfolding,
  ``U_in`` of the ``(Ci, Co*K)`` unfolding. The truncation to ``(R_in, R_out)`` keeps the
  leading columns, so its core is the leading sub-block ``core[:R_out, :R_in]`` of the full
  core, and since ``X_hat = P_out X P_in`` is an orthogonal projection of ``X`` (``P = U U^T``),
  Pythagoras gives ``||X - X_hat||^2 = ||X||^2 - ||core[:R_out, :R_in]||^2``: the errors of
  every rank pair come from one decomposition (:func:`error_table`). Exact at the full ranks
  ``(min(Ci, Co*K), min(Co, Ci*K))``, the ranks of the two unfoldings at most.
* HOOI (:func:`hooi`): from the HOSVD, alternately the best ``U_out`` given ``U_in`` and the
  best ``U_in`` given ``U_out`` (leading singular vectors of ``X`` contracted with the other
  factor). Each step maximises ``||core||`` over one factor with the other fixed, so the error
  never rises; it converges to a stationary point, usually a little below the HOSVD error.

The maths is float64 whatever the weight's dtype; signs are deterministic (the
largest-magnitude entry of every column of ``U_in`` and ``U_out`` is positive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TuckerFactors", "compose", "error", "error_table", "factor_weights", "full_ranks",
           "hooi", "hosvd", "rebuild", "truncate"]


@dataclass
class TuckerFactors:
    """Tucker-2 factors of every group of one conv kernel (float64).

    ``u_in`` ``(g, Ci, R_in)``, ``core`` ``(g, R_out, R_in, K)``, ``u_out`` ``(g, Co, R_out)``;
    ``norm_sq``: ``||W||_F^2``. ``history``: relative errors after the HOSVD start and after
    each HOOI sweep (empty for a plain HOSVD).
    """

    u_in: torch.Tensor
    core: torch.Tensor
    u_out: torch.Tensor
    weight_shape: tuple[int, ...]
    groups: int
    norm_sq: float
    history: tuple[float, ...] = ()

    @property
    def ranks(self) -> tuple[int, int]:
        """``(R_in, R_out)``."""
        return int(self.u_in.shape[-1]), int(self.u_out.shape[-1])


def full_ranks(weight_shape: tuple[int, ...], groups: int = 1) -> tuple[int, int]:
    """``(R_in, R_out)`` at which Tucker-2 is exact for every kernel of this shape:
    ``(min(Ci, Co*K), min(Co, Ci*K))``."""
    c_out, ci = weight_shape[:2]
    co, k = c_out // groups, math.prod(weight_shape[2:])
    return min(ci, co * k), min(co, ci * k)


def channel_modes(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The ``(g, Co, Ci, K)`` float64 blocks Tucker-2 works on."""
    c_out, ci = weight.shape[:2]
    if groups < 1 or c_out % groups:
        raise ValueError(f"groups={groups} does not divide C_out={c_out}")
    return weight.detach().double().reshape(groups, c_out // groups, ci, -1)


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of every ``m[j]``, signs fixed."""
    u = torch.linalg.svd(m, full_matrices=False)[0][..., :r]
    idx = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(u, -2, idx))
    sign[sign == 0] = 1
    return u * sign


def _core(x: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    return torch.einsum("gop,goik,giq->gpqk", u_out, x, u_in)


def hosvd(weight: torch.Tensor, groups: int = 1) -> TuckerFactors:
    """The full-rank HOSVD of every group (exact: ``rebuild`` gives back ``weight``).

    Args:
        weight: ``(C_out, C_in/g, *k)``, any float dtype.
        groups: the conv's groups (default 1).
    """
    x = channel_modes(weight, groups)
    g, co, ci, k = x.shape
    r_in, r_out = full_ranks(tuple(weight.shape), groups)
    u_out = _leading(x.reshape(g, co, ci * k), r_out)
    u_in = _leading(x.transpose(1, 2).reshape(g, ci, co * k), r_in)
    return TuckerFactors(u_in, _core(x, u_out, u_in), u_out, tuple(weight.shape), groups,
                         float(x.pow(2).sum()))


def _check_ranks(f: TuckerFactors, ranks: tuple[int, int]) -> tuple[int, int]:
    r_in, r_out = (int(r) for r in ranks)
    if r_in < 1 or r_out < 1:
        raise ValueError(f"Tucker-2 ranks must be >= 1, got {ranks}")
    full_in, full_out = full_ranks(f.weight_shape, f.groups)
    return min(r_in, full_in), min(r_out, full_out)


def truncate(f: TuckerFactors, ranks: tuple[int, int]) -> TuckerFactors:
    """The truncated HOSVD at ``(R_in, R_out)`` (capped at the full ranks): leading columns of
    both factors and the leading sub-block of the core. ``f`` must hold at least those ranks."""
    r_in, r_out = _check_ranks(f, ranks)
    if r_in > f.ranks[0] or r_out > f.ranks[1]:
        raise ValueError(f"factors of ranks {f.ranks} cannot be truncated to {(r_in, r_out)}")
    return TuckerFactors(f.u_in[..., :r_in], f.core[:, :r_out, :r_in], f.u_out[..., :r_out],
                         f.weight_shape, f.groups, f.norm_sq)


def error(f: TuckerFactors) -> float:
    """Relative error ``||W - W_hat||_F / ||W||_F`` of orthonormal factors whose core is the
    projection of ``W`` (HOSVD or HOOI): ``sqrt(||W||^2 - ||core||^2) / ||W||``."""
    if f.norm_sq == 0:
        return 0.0
    kept = float(f.core.pow(2).sum())
    return math.sqrt(max(f.norm_sq - kept, 0.0) / f.norm_sq)


def error_table(f: TuckerFactors) -> torch.Tensor:
    """Relative errors of the truncated HOSVD at every rank pair: ``table[R_in-1, R_out-1]``,
    shape ``(R_in_max, R_out_max)``, float64, from the full-rank HOSVD ``f``.

    ``err^2 = ||W||^2 - ||core[:R_out, :R_in]||^2 = `` the core's energy outside the leading
    block, summed without cancellation (exactly 0 at the full ranks)."""
    e = f.core.pow(2).sum(dim=(0, 3))                  # (R_out_max, R_in_max)
    if f.norm_sq == 0:
        return torch.zeros(e.shape[1], e.shape[0], dtype=torch.float64)
    # rows p >= R_out, all q; plus rows p < R_out and columns q >= R_in
    below = e.sum(1).flip(0).cumsum(0).flip(0)           # below[p] = sum of rows >= p
    below = torch.cat([below[1:], below.new_zeros(1)])   # rows >= R_out, at index R_out-1
    right = e.flip(1).cumsum(1).flip(1)                  # right[p, q] = sum of row p at cols >= q
    right = torch.cat([right[:, 1:], right.new_zeros(e.shape[0], 1)], 1).cumsum(0)
    out = (below[:, None] + right).clamp_min(0) / f.norm_sq
    return out.sqrt().T.contiguous()


def hooi(weight: torch.Tensor, ranks: tuple[int, int], groups: int = 1, *, iterations: int = 10,
         tol: float = 1e-8, start: TuckerFactors | None = None) -> TuckerFactors:
    """Tucker-2 by higher-order orthogonal iteration, from the truncated HOSVD.

    Args:
        weight: ``(C_out, C_in/g, *k)``.
        ranks: ``(R_in, R_out)``, capped at :func:`full_ranks` (where HOOI is not needed: the
            HOSVD is exact there and is returned).
        groups: the conv's groups (default 1).
        iterations: at most this many sweeps (one sweep updates ``U_out`` then ``U_in``);
            default 10; 0 returns the truncated HOSVD.
        tol: stop when a sweep lowers the relative error by less than ``tol`` (default 1e-8).
        start: the full-rank HOSVD of ``weight`` when already computed.

    The error never rises from sweep to sweep; ``history`` records it after the start and
    after each sweep.
    """
    f = start if start is not None else hosvd(weight, groups)
    r_in, r_out = _check_ranks(f, ranks)
    t = truncate(f, (r_in, r_out))
    hist = [error(t)]
    if iterations <= 0 or (r_in, r_out) == full_ranks(f.weight_shape, groups):
        t.history = tuple(hist)
        return t
    x = channel_modes(weight, groups)
    g, co, ci, k = x.shape
    u_in, u_out, core = t.u_in, t.u_out, t.core
    for _ in range(iterations):
        y = torch.einsum("goik,giq->goqk", x, u_in).reshape(g, co, r_in * k)
        u_out = _leading(y, r_out)
        z = torch.einsum("goik,gop->gipk", x, u_out).reshape(g, ci, r_out * k)
        u_in = _leading(z, r_in)
        core = _core(x, u_out, u_in)
        step = TuckerFactors(u_in, core, u_out, f.weight_shape, groups, f.norm_sq)
        hist.append(error(step))
        if hist[-2] - hist[-1] < tol:
            break
    if hist[-1] > hist[0]:  # cannot happen in exact arithmetic; keep the HOSVD if rounding did
        t.history = tuple(hist)
        return t
    return TuckerFactors(u_in, core, u_out, f.weight_shape, groups, f.norm_sq, tuple(hist))


def factor_weights(f: TuckerFactors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three conv weights in forward order (float64): first 1x1 ``(g*R_in, Ci, 1, ..)``,
    core ``(g*R_out, R_in, *k)``, last 1x1 ``(C_out, R_out, 1, ..)``. Output channel
    ``j*R + r`` of the first two convs is component ``r`` of group ``j``."""
    c_out, ci, *k = f.weight_shape
    g, n = f.groups, len(k)
    r_in, r_out = f.ranks
    ones = (1,) * n
    first = f.u_in.transpose(1, 2).reshape(g * r_in, ci, *ones)
    core = f.core.reshape(g * r_out, r_in, *k)
    last = f.u_out.reshape(c_out, r_out, *ones)
    return first.contiguous(), core.contiguous(), last.contiguous()


def compose(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor, groups: int,
            kernel_size: tuple[int, ...]) -> torch.Tensor:
    """The dense kernel ``(C_out, Ci, *k)`` of the three convs (differentiable, any dtype):
    ``W[o, i, k] = sum_{p,q} last[o, p] core[p, q, k] first[q, i]`` per group."""
    g = groups
    c_out, r_out = last.shape[:2]
    r_in, ci = first.shape[0] // g, first.shape[1]
    w = torch.einsum("gop,gpqk,gqi->goik", last.reshape(g, c_out // g, r_out),
                     core.reshape(g, r_out, r_in, -1), first.reshape(g, r_in, ci))
    return w.reshape(c_out, ci, *kernel_size)


def rebuild(f: TuckerFactors) -> torch.Tensor:
    """The kernel the factors compute, in the original weight layout (float64)."""
    return compose(*factor_weights(f), f.groups, tuple(f.weight_shape[2:]))
