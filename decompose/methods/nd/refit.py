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
from torch import nn

# ---------------------------------------------------------------------------------- features
from ...kernels.lstsq import Moments, bias_block, objective, ridge_solve, split_moments, with_bias
from ..convs import set_weights as set_conv


def dwpw_weight(P: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Composed kernel (g, Og, Cg*K) of a dw-pw layer."""
    g, og, cg, _ = P.shape
    return torch.einsum("goct,gctk->gock", P, D).reshape(g, og, -1)


def dwpw_pointwise_step(m: Moments, P, D, bias, ridge: float):
    """Refit the pointwise weights (and the bias when not None) with the depthwise fixed."""
    g, og, cg, t = P.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = split_moments(m, cg, k)
    tmp = torch.einsum("gctk,gckdl->gctdl", D, a)
    H = torch.einsum("gctdl,gdsl->gctds", tmp, D).reshape(g, cg * t, cg * t)
    R = torch.einsum("gctk,gcko->gcto", D, b).reshape(g, cg * t, og)
    X0 = P.reshape(g, og, cg * t).mT
    hb = torch.einsum("gctk,gck->gct", D, a1).reshape(g, cg * t)
    fit_bias = bias is not None
    H, R, X0 = bias_block(H, R, X0, fit_bias, hb, b1, bias if fit_bias else None, n)
    X = ridge_solve(H, R, X0, ridge)
    P = X[:, : cg * t].mT.reshape(g, og, cg, t)
    return P, (X[:, -1] if fit_bias else None)


def dwpw_depthwise_step(m: Moments, P, D, bias, ridge: float):
    """Refit the depthwise filters with the pointwise weights and bias fixed (one joint solve
    over all channels of a group: the input channels are correlated)."""
    g, og, cg, t = P.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = split_moments(m, cg, k)
    ptp = torch.einsum("goct,gods->gctds", P, P)
    H = torch.einsum("gctds,gckdl->gctkdsl", ptp, a).reshape(g, cg * t * k, cg * t * k)
    R = torch.einsum("goct,gcko->gctk", P, b)
    if bias is not None:
        R = R - torch.einsum("goct,go,gck->gctk", P, bias, a1)
    X = ridge_solve(H, R.reshape(g, -1, 1), D.reshape(g, -1, 1), ridge)
    return X.reshape(g, cg, t, k)


def pwdw_weight(Q: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Composed kernel (g, Og, Cg*K) of a pw-dw layer."""
    g, og = Q.shape[:2]
    return torch.einsum("gotc,gotk->gock", Q, D).reshape(g, og, -1)


def pwdw_depthwise_step(m: Moments, Q, D, bias, ridge: float):
    """Refit the depthwise filters (and bias) of every output channel on its T pointwise maps."""
    g, og, t, cg = Q.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = split_moments(m, cg, k)
    tmp = torch.einsum("gotc,gckdl->gotkdl", Q, a)
    H = torch.einsum("gotkdl,gosd->gotksl", tmp, Q).reshape(g, og, t * k, t * k)
    R = torch.einsum("gotc,gcko->gotk", Q, b).reshape(g, og, t * k, 1)
    X0 = D.reshape(g, og, t * k, 1)
    fit_bias = bias is not None
    if fit_bias:
        hb = torch.einsum("gotc,gck->gotk", Q, a1).reshape(g, og, t * k)
        H, R, X0 = bias_block(H, R, X0, True, hb, b1[..., None], bias[..., None],
                               n[:, None].expand(g, og))
    X = ridge_solve(H, R, X0, ridge)
    D = X[..., : t * k, 0].reshape(g, og, t, k)
    return D, (X[..., -1, 0] if fit_bias else None)


def pwdw_pointwise_step(m: Moments, Q, D, bias, ridge: float):
    """Refit the pointwise weights of every output channel with its depthwise filter fixed."""
    g, og, t, cg = Q.shape
    k = D.shape[-1]
    a, a1, n, b, b1 = split_moments(m, cg, k)
    tmp = torch.einsum("gotk,gckdl->gotcdl", D, a)
    H = torch.einsum("gotcdl,gosl->gotcsd", tmp, D).reshape(g, og, t * cg, t * cg)
    R = torch.einsum("gotk,gcko->gotc", D, b)
    if bias is not None:
        R = R - torch.einsum("gotk,go,gck->gotc", D, bias, a1)
    X = ridge_solve(H, R.reshape(g, og, t * cg, 1), Q.reshape(g, og, t * cg, 1), ridge)
    return X.reshape(g, og, t, cg)


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
        return float(objective(with_bias(composed_weight(order, f, s), b), m).sum())

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
