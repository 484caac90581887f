"""Least squares on conv patches: the statistics every calibration refit is solved from.

A layer that computes a conv with geometry ``G`` produces, at every output pixel, ``y = W u + b``
where ``u`` is the input patch under ``G`` (:func:`patches`). Fitting ``W`` (or factors that
compose it) to targets ``y`` needs only, per conv group, the moments ``A = sum [u; 1][u; 1]^T``
and ``B = sum [u; 1] y^T`` (:class:`Moments`), whose size does not depend on how many pixels or
images went into them. Solves are ridge least squares in float64 (:func:`ridge_solve`), the ridge
pulling towards the current weights, scaled by ``trace(H) / dim(H)``.

Layouts (g = conv groups, Cg = C_in/g, Og = C_out/g, K = taps): ``A`` (g, Cg*K+1, Cg*K+1),
``B`` (g, Cg*K+1, Og); patch features ordered (channel, tap), the constant 1 last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patches(x: torch.Tensor, conv: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Input patches of ``conv`` (any ConvNd) as (pixels, groups, C_in/g * K), taps innermost.

    ``conv(x)`` equals ``patches(x, conv) @ conv.weight.reshape(g, C_out/g, -1).mT`` per group,
    plus the bias, for every padding mode, stride and dilation. ``rows``: indices into the
    (image, output position) rows to extract, in :func:`pixels` order; only those are copied.
    A transposed conv's patches pair with its weight in the adjoint layout
    (:func:`decompose.kernels.transposed.patches`).
    """
    if getattr(conv, "transposed", False):
        from .transposed import patches as transposed_patches
        return transposed_patches(x, conv, rows)
    d = x.dim() - 2
    pad = list(conv._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i in range(d):
        k, s, dil = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    c = x.shape[1]
    # (N, C, o_1..o_d, k_1..k_d) -> (N, o_1..o_d, C, k_1..k_d), still a view
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    if rows is not None:
        x = x[torch.unravel_index(rows, x.shape[: 1 + d])]
    taps = math.prod(conv.kernel_size)
    return x.reshape(-1, conv.groups, c // conv.groups * taps)


def pixels(y: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv output (N, C, *spatial) as (pixels, groups, C/groups), matching :func:`patches`."""
    c = y.shape[1]
    return y.movedim(1, -1).reshape(-1, groups, c // groups)


class Moments:
    """Running ``A = sum [u;1][u;1]^T``, ``B = sum [u;1] y^T`` and ``sum y^2`` per group, float64.

    Memory is ``g * (dim+1) * (dim+1+out)`` numbers whatever the number of rows added.
    """

    def __init__(self, groups: int, dim: int, out: int, device: torch.device | None = None) -> None:
        kw = dict(dtype=torch.float64, device=device)
        self.A = torch.zeros(groups, dim + 1, dim + 1, **kw)
        self.B = torch.zeros(groups, dim + 1, out, **kw)
        self.yy = torch.zeros(groups, out, **kw)
        self.rows = 0

    def add(self, u: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``u`` (rows, g, dim) with targets ``y`` (rows, g, out)."""
        u = u.detach().float().transpose(0, 1)  # (g, rows, dim)
        y = y.detach().float().transpose(0, 1)
        d = u.shape[2]
        self.A[:, :d, :d] += (u.mT @ u).double()
        self.A[:, :d, d] += u.sum(1).double()
        self.A[:, d, :d] = self.A[:, :d, d]
        self.A[:, d, d] += u.shape[1]
        self.B[:, :d] += (u.mT @ y).double()
        self.B[:, d] += y.sum(1).double()
        self.yy += y.square().sum(1).double()
        self.rows += u.shape[1]


def ridge_solve(H: torch.Tensor, R: torch.Tensor, X0: torch.Tensor, ridge: float) -> torch.Tensor:
    """Batched ``argmin_X tr(X^T H X) - 2 tr(X^T R) + lam ||X - X0||^2``, ``lam = ridge*tr(H)/n``.

    ``H`` (..., n, n) symmetric PSD, ``R`` and ``X0`` (..., n, m); float64 throughout. Falls back
    to a least-squares solve where Cholesky fails (a singular ``H`` with ``ridge = 0``).
    """
    n = H.shape[-1]
    lam = ridge * torch.diagonal(H, dim1=-2, dim2=-1).sum(-1) / n
    lam = torch.where(lam > 0, lam, torch.full_like(lam, 1e-12))
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    Hr = H + lam[..., None, None] * eye
    Rr = R + lam[..., None, None] * X0
    L, info = torch.linalg.cholesky_ex(Hr)
    if bool((info == 0).all()):
        return torch.cholesky_solve(Rr, L)
    return torch.linalg.lstsq(Hr, Rr, driver="gelsd" if Hr.device.type == "cpu" else None).solution


def objective(W: torch.Tensor, m: Moments) -> torch.Tensor:
    """``sum ||y - W [u; 1]||^2`` per group for ``W`` (g, Og, dim+1) (bias last)."""
    quad = ((W @ m.A) * W).sum((-1, -2))
    lin = (W * m.B.mT).sum((-1, -2))
    return quad - 2 * lin + m.yy.sum(-1)


def split_moments(m: Moments, cg: int, k: int):
    """(A4 (g,Cg,K,Cg,K), a1 (g,Cg,K) = sum u, n, B4 (g,Cg,K,Og), b1 (g,Og) = sum y)."""
    g = m.A.shape[0]
    a = m.A[:, :-1, :-1].reshape(g, cg, k, cg, k)
    a1 = m.A[:, :-1, -1].reshape(g, cg, k)
    n = m.A[:, -1, -1]
    b = m.B[:, :-1].reshape(g, cg, k, -1)
    return a, a1, n, b, m.B[:, -1]


def with_bias(W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Append the bias column (zeros when there is none) to (g, Og, dim)."""
    b = bias if bias is not None else torch.zeros(W.shape[:2], dtype=W.dtype, device=W.device)
    return torch.cat([W, b[..., None]], dim=-1)


def bias_block(H, R, X0, fit_bias: bool, hb, rb, x0b, hbb):
    """Assemble [[H, hb], [hb^T, hbb]] etc. when the bias is fitted; else the blocks alone."""
    if not fit_bias:
        return H, R, X0
    H = torch.cat([torch.cat([H, hb[..., None]], -1),
                   torch.cat([hb, hbb[..., None]], -1)[..., None, :]], -2)
    return H, torch.cat([R, rb[..., None, :]], -2), torch.cat([X0, x0b[..., None, :]], -2)


def full_solve(m: Moments, W: torch.Tensor, bias, ridge: float):
    """Unconstrained least-squares kernel (g, Og, Cg*K) (and bias), ridge towards ``W``."""
    g, og, dim = W.shape
    fit_bias = bias is not None
    H = m.A if fit_bias else m.A[:, :-1, :-1]
    R = m.B if fit_bias else m.B[:, :-1]
    X0 = with_bias(W, bias).mT if fit_bias else W.mT
    X = ridge_solve(H, R, X0, ridge)
    return X[:, :dim].mT, (X[:, -1] if fit_bias else None)
