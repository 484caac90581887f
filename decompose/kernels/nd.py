"""Kernel maths of Network Decoupling: one SVD per channel, both orders. Pure functions on tensors.

A convolution weight ``W`` has shape ``(C_out, C_in/g, *k)``; ``K = prod(k)`` taps.

* ``"dw-pw"`` (depthwise then pointwise): for every input channel ``c`` the ``C_out/g x K`` slice
  of its group is split by SVD; term ``t`` is a depthwise filter ``V_c[:, t]`` followed by the
  pointwise column ``U_c[:, t] * S_c[t]``. Full rank ``min(C_out/g, K)``.
* ``"pw-dw"`` (pointwise then depthwise): for every output channel ``o`` the ``C_in/g x K`` slice
  ``W[o]`` is split; term ``t`` is a pointwise row ``U_o[:, t]`` followed by the depthwise filter
  ``S_o[t] * V_o[:, t]``. Full rank ``min(C_in/g, K)``.

Keeping the first ``T`` terms of every slice is, by Eckart-Young, the best approximation of ``W``
in the Frobenius norm among all sums of ``T`` depthwise-separable blocks of that order, and its
error is known from the singular values before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ORDER_NAMES = ("dw-pw", "pw-dw")


@dataclass
class Factors:
    """Per-slice SVD of a conv kernel in one order.

    ``u``: (n, m, r) left vectors, ``s``: (n, r) singular values (descending), ``vh``: (n, r, K)
    right vectors, where n is the number of slices (C_in for dw-pw, C_out for pw-dw), m the other
    channel count per group, r = min(m, K).
    """

    order: str
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    weight_shape: tuple[int, ...]
    groups: int

    @property
    def max_rank(self) -> int:
        return int(self.s.shape[1])


def _check_order(order: str) -> None:
    if order not in ORDER_NAMES:
        raise ValueError(f"order must be one of {ORDER_NAMES}, got {order!r}")


def slices(weight: torch.Tensor, groups: int, order: str) -> torch.Tensor:
    """The matrices the SVD runs on: (C_in, C_out/g, K) for dw-pw, (C_out, C_in/g, K) for pw-dw."""
    _check_order(order)
    c_out, c_in_g = weight.shape[:2]
    taps = weight[0, 0].numel()
    if order == "pw-dw":
        return weight.reshape(c_out, c_in_g, taps)
    c_out_g = c_out // groups
    w = weight.reshape(groups, c_out_g, c_in_g, taps).permute(0, 2, 1, 3)
    return w.reshape(groups * c_in_g, c_out_g, taps)


def _fix_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic signs: the largest-magnitude entry of every right vector is positive."""
    idx = vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vh, -1, idx))
    sign[sign == 0] = 1
    return u * sign.transpose(-1, -2), vh * sign


def factorize(weight: torch.Tensor, groups: int = 1, order: str = "dw-pw") -> Factors:
    """SVD of every slice of ``weight`` in the given order (float64 weights stay float64)."""
    m = slices(weight.detach(), groups, order)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, vh = _fix_signs(u, vh)
    return Factors(order, u, s, vh, tuple(weight.shape), groups)


def singular_values(weight: torch.Tensor, groups: int = 1, order: str = "dw-pw") -> torch.Tensor:
    """Only the (n, r) singular values; cheaper than :func:`factorize` when planning."""
    return torch.linalg.svdvals(slices(weight.detach(), groups, order))


def energy_curve(s: torch.Tensor) -> torch.Tensor:
    """Fraction of squared singular values kept at T = 1..r, as float64 (length r)."""
    sq = s.double().pow(2).sum(dim=0)
    total = sq.sum()
    if total == 0:
        return torch.ones_like(sq)
    return (sq.cumsum(0) / total).clamp(max=1.0)


def error_curve(s: torch.Tensor) -> torch.Tensor:
    """Relative kernel error ``||W - W_T||_F / ||W||_F`` at T = 1..r, from singular values alone."""
    sq = s.double().pow(2).sum(dim=0)
    total = sq.sum()
    if total == 0:
        return torch.zeros_like(sq)
    # tail[T-1] = sum of sq[T:], summed from the small end (no cancellation near full rank)
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0)[1:], sq.new_zeros(1)])
    return (tail / total).sqrt()


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest T whose kept energy reaches ``energy`` (with a 1e-9 tolerance for E = 1)."""
    curve = energy_curve(s)
    hits = (curve >= energy - 1e-9).nonzero()
    return int(hits[0]) + 1 if len(hits) else int(curve.numel())


def rebuild(f: Factors, rank: int) -> torch.Tensor:
    """The rank-T kernel ``W_T`` in the original weight layout."""
    t = min(rank, f.max_rank)
    m = (f.u[..., :t] * f.s[:, None, :t]) @ f.vh[:, :t, :]
    c_out, c_in_g = f.weight_shape[:2]
    kernel = f.weight_shape[2:]
    if f.order == "pw-dw":
        return m.reshape(c_out, c_in_g, *kernel)
    g = f.groups
    w = m.reshape(g, c_in_g, c_out // g, -1).permute(0, 2, 1, 3)
    return w.reshape(c_out, c_in_g, *kernel)


def depthwise_pointwise_weights(f: Factors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of the two convs that compute the rank-T approximation.

    dw-pw: depthwise ``(C_in*T, 1, *k)`` (output ``c*T + t``) and pointwise ``(C_out, C_in/g*T)``.
    pw-dw: pointwise ``(C_out*T, C_in/g)`` (output ``o*T + t``) and depthwise ``(C_out, T, *k)``.
    Returned in forward order: (first conv weight, second conv weight), pointwise weights without
    their trailing 1-sized kernel dimensions.
    """
    t = min(rank, f.max_rank)
    c_out, c_in_g = f.weight_shape[:2]
    kernel = f.weight_shape[2:]
    g = f.groups
    u, s, vh = f.u[..., :t], f.s[:, :t], f.vh[:, :t, :]
    if f.order == "dw-pw":
        c_in = c_in_g * g
        dw = vh.reshape(c_in * t, 1, *kernel)
        pw = (u * s[:, None, :]).reshape(g, c_in_g, c_out // g, t).permute(0, 2, 1, 3)
        return dw.contiguous(), pw.reshape(c_out, c_in_g * t).contiguous()
    pw = u.permute(0, 2, 1).reshape(c_out * t, c_in_g)
    dw = (vh * s[..., None]).reshape(c_out, t, *kernel)
    return pw.contiguous(), dw.contiguous()


# ------------------------------------------------------------------------ mixed orders


def unslice(m: torch.Tensor, weight_shape: tuple[int, ...], groups: int, order: str
            ) -> torch.Tensor:
    """The inverse of :func:`slices`: per-slice matrices back to the weight layout."""
    c_out, c_in_g = weight_shape[:2]
    if order == "pw-dw":
        return m.reshape(weight_shape)
    w = m.reshape(groups, c_in_g, c_out // groups, -1).permute(0, 2, 1, 3)
    return w.reshape(weight_shape)


def project(weight: torch.Tensor, groups: int, order: str, rank: int) -> torch.Tensor:
    """The best approximation of ``weight`` by ``rank`` terms of one order (Eckart-Young per
    slice), as a dense kernel. Computed from each slice's small Gram matrix (an eigh of K x K,
    or of the other side when it is smaller), several times faster than batched SVDs."""
    m = slices(weight, groups, order)
    n, rows, taps = m.shape
    if rank >= min(rows, taps):
        return weight.clone()
    if rank <= 0:
        return torch.zeros_like(weight)
    if taps <= rows:
        v = torch.linalg.eigh(m.transpose(1, 2) @ m)[1][..., -rank:]
        out = (m @ v) @ v.transpose(1, 2)
    else:
        u = torch.linalg.eigh(m @ m.transpose(1, 2))[1][..., -rank:]
        out = u @ (u.transpose(1, 2) @ m)
    return unslice(out, tuple(weight.shape), groups, order)


def mixed(weight: torch.Tensor, groups: int, t_dw: int, t_pw: int, *, iterations: int = 60,
          tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """``t_dw`` depthwise-first terms plus ``t_pw`` pointwise-first terms: the kernels
    ``(W1, W2)`` minimising ``||W - W1 - W2||_F`` with W1 of dw-pw rank <= t_dw and W2 of
    pw-dw rank <= t_pw per slice.

    Block coordinate descent with exact blocks: ``W1 <- project(W - W2, "dw-pw", t_dw)``, then
    ``W2 <- project(W - W1, "pw-dw", t_pw)``; each step is the optimum of its block, so the
    error never rises. After the second sweep each step is also tried from the extrapolated
    ``W2 + sqrt(k) (W2 - W2_prev)`` and kept only when it is lower (the plain iteration has a
    long linear tail). Started from ``W2 = 0`` and from ``W2 = project(W, "pw-dw", t_pw)``;
    the better end is returned. Stops when a sweep gains less than ``tol`` (relative error) or
    after ``iterations`` sweeps.

    Args:
        weight: the kernel (float64 recommended).
        groups: the conv's groups.
        t_dw, t_pw: terms of each order (>= 0).
        iterations: sweeps at most (default 60).
        tol: stop when the relative error falls by less than this in a sweep (default 1e-6).

    Returns ``(W1, W2, relative error, sweeps run)``.
    """
    w = weight.detach().double()
    norm = float(w.norm()) or 1.0

    def sweep(w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        w1 = project(w - w2, groups, "dw-pw", t_dw)
        w2 = project(w - w1, groups, "pw-dw", t_pw)
        return w1, w2, float((w - w1 - w2).norm()) / norm

    best = None
    starts = [torch.zeros_like(w)]
    if t_dw and t_pw:
        starts.append(project(w, groups, "pw-dw", t_pw))
    for w2 in starts:
        w1, w2_new, err = sweep(w2)
        prev, w2 = w2, w2_new
        sweeps = 1
        for k in range(2, iterations + 1):
            sweeps = k
            n1, n2, e = sweep(w2)
            if k > 2:
                a1, a2, ea = sweep(w2 + k ** 0.5 * (w2 - prev))
                if ea < e:
                    n1, n2, e = a1, a2, ea
            prev, w1, w2 = w2, n1, n2
            done = err - e < tol
            err = min(err, e)
            if done:
                break
        if best is None or err < best[2]:
            best = (w1, w2, err, sweeps)
    return best
