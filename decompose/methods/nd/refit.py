"""Least-squares refit of one decoupled layer from second-moment statistics. Pure tensor maths.

A decoupled layer computes, at every output pixel, ``y = W_eff u + b`` where ``u`` is the patch of
its input under the original conv's geometry (padding, stride, dilation; padding commutes with a
bias-free 1x1 conv, so this holds in both orders) and ``W_eff`` the composed kernel:

* dw-pw: ``W_eff[o, c, k] = sum_t P[o, c, t] D[c, t, k]`` (depthwise ``D``, pointwise ``P``);
* pw-dw: ``W_eff[o, c, k] = sum_t Q[o, t, c] D[o, t, k]`` (pointwise ``Q``, depthwise ``D``).

Fitting the layer to targets ``y`` on inputs ``u`` therefore needs only, per conv group, the
moments ``A = sum [u; 1][u; 1]^T`` and ``B = sum [u; 1] y^T`` (:class:`Moments`), whose size does
not depend on how many pixels or images went into them. Every step below minimises
``sum ||y - W_eff u - b||^2 + lam ||theta - theta_0||^2`` over one factor ``theta`` with the
other fixed: a ridge least-squares problem solved in float64 by Cholesky. The ridge pulls towards
the current weights (not towards zero), so a layer that is already optimal stays unchanged, and
``lam = ridge * trace(H) / dim(H)`` scales with the problem.

Layouts (g = conv groups, Cg = C_in/g, Og = C_out/g, K = taps, T = rank):
``A`` (g, Cg*K+1, Cg*K+1), ``B`` (g, Cg*K+1, Og); patch features ordered (channel, tap), the
constant 1 last. dw-pw factors: ``P`` (g, Og, Cg, T), ``D`` (g, Cg, T, K), bias (g, Og).
pw-dw factors: ``Q`` (g, Og, T, Cg), ``D`` (g, Og, T, K), bias (g, Og).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------- features


def patches(x: torch.Tensor, conv: nn.Module, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Input patches of ``conv`` (any ConvNd) as (pixels, groups, C_in/g * K), taps innermost.

    ``conv(x)`` equals ``patches(x, conv) @ conv.weight.reshape(g, C_out/g, -1).mT`` per group,
    plus the bias, for every padding mode, stride and dilation. ``rows``: indices into the
    (image, output position) rows to extract, in :func:`pixels` order; only those are copied.
    """
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


# ------------------------------------------------------------------------------------ solver


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
    quad = torch.einsum("goi,gij,goj->g", W, m.A, W)
    lin = torch.einsum("goi,gio->g", W, m.B)
    return quad - 2 * lin + m.yy.sum(-1)


def _split(m: Moments, cg: int, k: int):
    """(A4 (g,Cg,K,Cg,K), a1 (g,Cg,K) = sum u, n, B4 (g,Cg,K,Og), b1 (g,Og) = sum y)."""
    g = m.A.shape[0]
    a = m.A[:, :-1, :-1].reshape(g, cg, k, cg, k)
    a1 = m.A[:, :-1, -1].reshape(g, cg, k)
    n = m.A[:, -1, -1]
    b = m.B[:, :-1].reshape(g, cg, k, -1)
    return a, a1, n, b, m.B[:, -1]


def _with_bias(W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Append the bias column (zeros when there is none) to (g, Og, dim)."""
    b = bias if bias is not None else torch.zeros(W.shape[:2], dtype=W.dtype, device=W.device)
    return torch.cat([W, b[..., None]], dim=-1)


def _bias_block(H, R, X0, fit_bias: bool, hb, rb, x0b, hbb):
    """Assemble [[H, hb], [hb^T, hbb]] etc. when the bias is fitted; else the blocks alone."""
    if not fit_bias:
        return H, R, X0
    H = torch.cat([torch.cat([H, hb[..., None]], -1),
                   torch.cat([hb, hbb[..., None]], -1)[..., None, :]], -2)
    return H, torch.cat([R, rb[..., None, :]], -2), torch.cat([X0, x0b[..., None, :]], -2)


# ------------------------------------------------------------------------------- dw-pw steps


def dwpw_weight(P: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Composed kernel (g, Og, Cg*K) of a dw-pw layer."""
    g, og, cg, _ = P.shape
    return torch.einsum("goct,gctk->gock", P, D).reshape(g, og, -1)


def dwpw_pointwise_step(m: Moments, P, D, bias, ridge: float):
    """Refit the pointwise weights (and the bias when not None) with the depthwise fixed."""
    g, og, cg, t = P.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = _split(m, cg, k)
    tmp = torch.einsum("gctk,gckdl->gctdl", D, a)
    H = torch.einsum("gctdl,gdsl->gctds", tmp, D).reshape(g, cg * t, cg * t)
    R = torch.einsum("gctk,gcko->gcto", D, b).reshape(g, cg * t, og)
    X0 = P.reshape(g, og, cg * t).mT
    hb = torch.einsum("gctk,gck->gct", D, a1).reshape(g, cg * t)
    fit_bias = bias is not None
    H, R, X0 = _bias_block(H, R, X0, fit_bias, hb, b1, bias if fit_bias else None, n)
    X = ridge_solve(H, R, X0, ridge)
    P = X[:, : cg * t].mT.reshape(g, og, cg, t)
    return P, (X[:, -1] if fit_bias else None)


def dwpw_depthwise_step(m: Moments, P, D, bias, ridge: float):
    """Refit the depthwise filters with the pointwise weights and bias fixed (one joint solve
    over all channels of a group: the input channels are correlated)."""
    g, og, cg, t = P.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = _split(m, cg, k)
    ptp = torch.einsum("goct,gods->gctds", P, P)
    H = torch.einsum("gctds,gckdl->gctkdsl", ptp, a).reshape(g, cg * t * k, cg * t * k)
    R = torch.einsum("goct,gcko->gctk", P, b)
    if bias is not None:
        R = R - torch.einsum("goct,go,gck->gctk", P, bias, a1)
    X = ridge_solve(H, R.reshape(g, -1, 1), D.reshape(g, -1, 1), ridge)
    return X.reshape(g, cg, t, k)


def full_solve(m: Moments, W: torch.Tensor, bias, ridge: float):
    """Unconstrained least-squares kernel (g, Og, Cg*K) (and bias), ridge towards ``W``."""
    g, og, dim = W.shape
    fit_bias = bias is not None
    H = m.A if fit_bias else m.A[:, :-1, :-1]
    R = m.B if fit_bias else m.B[:, :-1]
    X0 = _with_bias(W, bias).mT if fit_bias else W.mT
    X = ridge_solve(H, R, X0, ridge)
    return X[:, :dim].mT, (X[:, -1] if fit_bias else None)


# ------------------------------------------------------------------------------- pw-dw steps


def pwdw_weight(Q: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Composed kernel (g, Og, Cg*K) of a pw-dw layer."""
    g, og = Q.shape[:2]
    return torch.einsum("gotc,gotk->gock", Q, D).reshape(g, og, -1)


def pwdw_depthwise_step(m: Moments, Q, D, bias, ridge: float):
    """Refit the depthwise filters (and bias) of every output channel on its T pointwise maps."""
    g, og, t, cg = Q.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = _split(m, cg, k)
    tmp = torch.einsum("gotc,gckdl->gotkdl", Q, a)
    H = torch.einsum("gotkdl,gosd->gotksl", tmp, Q).reshape(g, og, t * k, t * k)
    R = torch.einsum("gotc,gcko->gotk", Q, b).reshape(g, og, t * k, 1)
    X0 = D.reshape(g, og, t * k, 1)
    fit_bias = bias is not None
    if fit_bias:
        hb = torch.einsum("gotc,gck->gotk", Q, a1).reshape(g, og, t * k)
        H, R, X0 = _bias_block(H, R, X0, True, hb, b1[..., None], bias[..., None],
                               n[:, None].expand(g, og))
    X = ridge_solve(H, R, X0, ridge)
    D = X[..., : t * k, 0].reshape(g, og, t, k)
    return D, (X[..., -1, 0] if fit_bias else None)


def pwdw_pointwise_step(m: Moments, Q, D, bias, ridge: float):
    """Refit the pointwise weights of every output channel with its depthwise filter fixed."""
    g, og, t, cg = Q.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = _split(m, cg, k)
    tmp = torch.einsum("gotk,gckdl->gotcdl", D, a)
    H = torch.einsum("gotcdl,gosl->gotcsd", tmp, D).reshape(g, og, t * cg, t * cg)
    R = torch.einsum("gotk,gcko->gotc", D, b)
    if bias is not None:
        R = R - torch.einsum("gotk,go,gck->gotc", D, bias, a1)
    X = ridge_solve(H, R.reshape(g, og, t * cg, 1), Q.reshape(g, og, t * cg, 1), ridge)
    return X.reshape(g, og, t, cg)


# ------------------------------------------------------------------------- module <-> factors


def read_factors(seq: nn.Module, order: str):
    """(first, second, bias) of a decoupled module as float64 tensors in the layouts above:
    dw-pw (D, P, bias), pw-dw (Q, D, bias); bias None when the last conv has none."""
    dw, pw = seq.conv_dw, seq.conv_pw
    k = math.prod(dw.kernel_size)
    if order == "dw-pw":
        g = pw.groups
        cg = dw.in_channels // g
        t = dw.out_channels // dw.in_channels
        D = dw.weight.detach().double().reshape(g, cg, t, k)
        P = pw.weight.detach().double().reshape(g, pw.out_channels // g, cg, t)
        last = pw
        first, second = D, P
    else:
        g = pw.groups
        c_out = dw.out_channels
        t = pw.out_channels // c_out
        Q = pw.weight.detach().double().reshape(g, c_out // g, t, pw.in_channels // g)
        D = dw.weight.detach().double().reshape(g, c_out // g, t, k)
        last = dw
        first, second = Q, D
    bias = None if last.bias is None else last.bias.detach().double().reshape(g, -1)
    return first, second, bias


def set_conv(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Copy ``weight`` (any layout with the same number of elements) and, when given, ``bias``
    into ``conv``, creating its bias parameter if it has none."""
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(conv.weight.shape).to(conv.weight.dtype))
        if bias is None:
            return
        b = bias.reshape(-1).to(conv.weight.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(b.clone(), requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(b)


def write_factors(seq: nn.Module, order: str, first, second, bias) -> None:
    """Copy refitted factors back into the module (creating the last conv's bias if needed)."""
    dw, pw = seq.conv_dw, seq.conv_pw
    if order == "dw-pw":
        set_conv(dw, first)
        set_conv(pw, second, bias)
    else:
        set_conv(pw, first)
        set_conv(dw, second, bias)


def composed_weight(order: str, first, second) -> torch.Tensor:
    """(g, Og, Cg*K) kernel the factors compute."""
    return dwpw_weight(second, first) if order == "dw-pw" else pwdw_weight(first, second)


def refit_factors(m: Moments, order: str, first, second, bias, *, ridge: float,
                  iterations: int):
    """Alternating least squares on both convs from patch moments ``m``, starting from the
    given factors and ending with the conv that produces the output.

    dw-pw: pointwise (+bias) solve, then ``iterations`` rounds of depthwise solve + pointwise
    solve. pw-dw: depthwise (+bias) solve, then rounds of pointwise solve + depthwise solve.
    Stops early when a round gains less than 1e-6 (relative). Returns (first, second, bias,
    objective) of the best iterate.
    """
    dwpw = order == "dw-pw"

    def score(f, s, b):
        return float(objective(_with_bias(composed_weight(order, f, s), b), m).sum())

    def last_step(f, s, b):  # the conv that carries the bias
        if dwpw:
            s, b = dwpw_pointwise_step(m, s, f, b, ridge)
        else:
            s, b = pwdw_depthwise_step(m, f, s, b, ridge)
        return f, s, b

    def first_step(f, s, b):
        return dwpw_depthwise_step(m, s, f, b, ridge) if dwpw else pwdw_pointwise_step(m, f, s, b, ridge)

    f, s, b = last_step(first, second, bias)
    best = (f, s, b, score(f, s, b))
    for _ in range(iterations):
        f, s, b = last_step(first_step(f, s, b), s, b)
        sc = score(f, s, b)
        if sc < best[3]:
            gain = best[3] - sc
            best = (f, s, b, sc)
            if gain <= 1e-6 * sc:
                break
        else:
            break
    return best
