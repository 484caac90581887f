"""Kernel maths of the two SVD factorizations of a conv: channel SVD and spatial SVD.

A convolution weight ``W`` has shape ``(C_out, C_in/g, *k)`` with ``n = len(k)`` spatial axes,
``K = prod(k)`` taps and ``g`` groups; per group ``Co = C_out/g`` and ``Ci = C_in/g``. Both
factorizations are one truncated SVD of a reshaping of each group's ``(Co, Ci, *k)`` block,
group by group, with the same rank ``R`` in every group:

``"channel"`` (Zhang et al. 2015, data-free): ``M = W`` reshaped to ``(Co, Ci*K)``. The rank-R
    truncation ``U_R S_R V_R^T`` is a k x k conv ``C_in -> g*R`` (weights ``sqrt(S) V^T``,
    the original geometry) followed by a 1x1 conv ``g*R -> C_out`` (``U sqrt(S)``), both with
    ``groups = g``. Full rank ``min(Co, Ci*K)``.
``"spatial"`` (Jaderberg et al. 2014, scheme 2): the spatial axes are split after the first
    ``split`` axes (default 1: ``k_h | k_w`` in 2-D, ``k_d | k_h k_w`` in 3-D) and
    ``M[(i, a), (o, b)] = W[o, i, a, b]`` has shape ``(Ci*Ka, Co*Kb)`` with ``Ka`` the taps of
    the first axes and ``Kb`` of the rest. The rank-R truncation is a ``k_h x 1`` conv
    ``C_in -> g*R`` (``U sqrt(S)``) followed by a ``1 x k_w`` conv ``g*R -> C_out``
    (``sqrt(S) V^T``), both with ``groups = g``. Full rank ``min(Ci*Ka, Co*Kb)``.

The singular values are split evenly between the two factors (``sqrt(S)`` on each), which keeps
them of similar scale for a later joint refit. By Eckart-Young the truncation is the best
approximation of ``W`` in the Frobenius norm among all pairs of convs of that form with ``R``
intermediate channels per group, and ``||W - W_R||_F^2`` is the sum of the dropped squared
singular values over the groups. The maths runs in float64 whatever the weight's dtype; signs
are deterministic (the largest-magnitude entry of every right singular vector is positive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .nd import energy_curve, error_curve

KINDS = ("channel", "spatial")

__all__ = ["KINDS", "SVDFactors", "compose", "energy_curve", "error_curve", "factor_weights",
           "factorize", "matrices", "rebuild", "singular_values"]


@dataclass
class SVDFactors:
    """The full SVD of every group's matrix of one kind.

    ``u``: (g, m, r) left vectors, ``s``: (g, r) singular values (descending, float64),
    ``vh``: (g, r, p) right vectors, for the ``(g, m, p)`` matrices of :func:`matrices`
    (``r = min(m, p)``, the full rank). ``split``: the spatial split (``"spatial"`` only).
    """

    kind: str
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    weight_shape: tuple[int, ...]
    groups: int
    split: int = 1

    @property
    def max_rank(self) -> int:
        """The rank at which the factorization is exact (``min`` of the matrix sides)."""
        return int(self.s.shape[1])


def _check(kind: str, weight_shape: tuple[int, ...], groups: int, split: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if groups < 1 or weight_shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide C_out={weight_shape[0]}")
    n = len(weight_shape) - 2
    if kind == "spatial" and not 1 <= split < n:
        raise ValueError(f"a spatial split needs 1 <= split < {n} (the kernel's spatial axes), "
                         f"got {split}")


def matrices(weight: torch.Tensor, groups: int = 1, kind: str = "channel", split: int = 1
             ) -> torch.Tensor:
    """The ``(g, m, p)`` matrices the SVD runs on: ``(g, Co, Ci*K)`` for ``"channel"``,
    ``(g, Ci*Ka, Co*Kb)`` for ``"spatial"``, in float64.

    Args:
        weight: ``(C_out, C_in/g, *k)``.
        groups: the conv's groups (default 1).
        kind: ``"channel"`` (default) or ``"spatial"``.
        split: spatial only: how many leading spatial axes the first factor covers
            (1 <= split < n; default 1).
    """
    _check(kind, tuple(weight.shape), groups, split)
    w = weight.detach().double()
    c_out, ci = w.shape[:2]
    co = c_out // groups
    if kind == "channel":
        return w.reshape(groups, co, ci * math.prod(w.shape[2:]))
    ka, kb = math.prod(w.shape[2:2 + split]), math.prod(w.shape[2 + split:])
    m = w.reshape(groups, co, ci, ka, kb).permute(0, 2, 3, 1, 4)  # (g, Ci, Ka, Co, Kb)
    return m.reshape(groups, ci * ka, co * kb)


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: the largest-magnitude entry of every right vector is positive."""
    idx = vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vh, -1, idx))
    sign[sign == 0] = 1
    return u * sign.transpose(-1, -2), vh * sign


def factorize(weight: torch.Tensor, groups: int = 1, kind: str = "channel", split: int = 1
              ) -> SVDFactors:
    """The full SVD of :func:`matrices` (float64), with deterministic signs.

    Args:
        weight: ``(C_out, C_in/g, *k)``; any float dtype (the maths is float64).
        groups: the conv's groups (default 1).
        kind: ``"channel"`` (default) or ``"spatial"``.
        split: spatial only, default 1 (see :func:`matrices`).
    """
    m = matrices(weight, groups, kind, split)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, vh = _fix_signs(u, vh)
    return SVDFactors(kind, u, s, vh, tuple(weight.shape), groups, split)


def singular_values(weight: torch.Tensor, groups: int = 1, kind: str = "channel",
                    split: int = 1) -> torch.Tensor:
    """Only the ``(g, r)`` singular values (float64); cheaper than :func:`factorize`."""
    return torch.linalg.svdvals(matrices(weight, groups, kind, split))


def _rank(f: SVDFactors, rank: int) -> int:
    r = int(rank)
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return min(r, f.max_rank)


def factor_weights(f: SVDFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of the two convs computing the rank-R truncation (R capped at the full rank),
    in forward order and float64.

    channel: first ``(g*R, Ci, *k)`` (the k x k conv), second ``(C_out, R, 1, ..)`` (1x1).
    spatial: first ``(g*R, Ci, k_1..k_s, 1, ..)``, second ``(C_out, R, 1, .., k_{s+1}..k_n)``.
    Output channel ``j*R + r`` of the first conv is term ``r`` of group ``j``.
    """
    r = _rank(f, rank)
    c_out, ci, *k = f.weight_shape
    g, n = f.groups, len(k)
    co = c_out // g
    sq = f.s[:, :r].sqrt()
    left = f.u[..., :r] * sq[:, None, :]      # (g, m, R)
    right = f.vh[:, :r, :] * sq[:, :, None]   # (g, R, p)
    if f.kind == "channel":
        first = right.reshape(g * r, ci, *k)
        second = left.reshape(c_out, r, *(1,) * n)
        return first.contiguous(), second.contiguous()
    s = f.split
    k1 = tuple(k[a] if a < s else 1 for a in range(n))
    k2 = tuple(k[a] if a >= s else 1 for a in range(n))
    first = left.reshape(g, ci, -1, r).permute(0, 3, 1, 2).reshape(g * r, ci, *k1)
    second = right.reshape(g, r, co, -1).permute(0, 2, 1, 3).reshape(c_out, r, *k2)
    return first.contiguous(), second.contiguous()


def compose(kind: str, first: torch.Tensor, second: torch.Tensor, groups: int,
            kernel_size: tuple[int, ...], split: int = 1) -> torch.Tensor:
    """The dense kernel ``(C_out, Ci, *k)`` of two factor convs (differentiable, any dtype).

    channel: ``W[o, i, k] = sum_r second[o, r] first[r, i, k]``;
    spatial: ``W[o, i, a, b] = sum_r second[o, r, b] first[r, i, a]`` (a: the first ``split``
    axes' taps, b: the rest), per group.
    """
    g = groups
    c_out, r = second.shape[:2]
    ci = first.shape[1]
    co = c_out // g
    if kind == "channel":
        w = torch.einsum("gor,grp->gop", second.reshape(g, co, r), first.reshape(g, r, -1))
        return w.reshape(c_out, ci, *kernel_size)
    a = first.reshape(g, r, ci, -1)                      # (g, R, Ci, Ka)
    b = second.reshape(g, co, r, -1)                     # (g, Co, R, Kb)
    w = torch.einsum("gorb,gria->goiab", b, a)
    return w.reshape(c_out, ci, *kernel_size)


def rebuild(f: SVDFactors, rank: int) -> torch.Tensor:
    """The rank-R kernel in the original weight layout (float64)."""
    first, second = factor_weights(f, rank)
    return compose(f.kind, first, second, f.groups, tuple(f.weight_shape[2:]), f.split)
