"""Transposed convolutions as the adjoints of regular ones. Pure functions on tensors.

A transposed conv (``ConvTranspose1d/2d/3d``) with weight ``W`` of shape ``(C_in, C_out/g, *k)``
computes, for every output channel ``o`` of group ``j``,

    y[o] = sum over the input channels c of group j of  convT(x[c], W[c, o])

where ``convT(x, w)`` scatters every input element times the filter ``w`` into the output
(stride, padding, output_padding, dilation). It is linear in ``W`` and in ``x``, and the
channels enter exactly as in a regular conv whose kernel is the *adjoint layout*

    A[o, c, :] = W[c, o, :]        (per group: (C_out, C_in/g, *k))

So every channel factorization of a regular conv applies unchanged to ``A``: Network
Decoupling's per-channel SVDs of ``A`` give a depthwise *transposed* conv (carrying the stride,
padding, output_padding and dilation) and a 1x1 conv, in either order, with the same errors and
ranks (the taps are not reordered, only the channel axes swapped). :func:`adjoint` swaps the
layouts (it is its own inverse given the groups).

For least squares (calibration), :func:`patches` writes a transposed conv as a regular one on
its zero-stuffed input: with ``x_up`` the input with ``s - 1`` zeros inserted between
neighbours, padded by ``d (k - 1) - p`` before and ``d (k - 1) - p + output_padding`` after (a
negative pad crops), ``y = conv(x_up, flip(A))`` at stride 1 and dilation ``d``. Flipping the
taps of the patches instead of the kernel gives rows ``u`` with ``y = A u`` per group, in the
same (channel, tap) layout as a regular conv's patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def adjoint(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``(C_a, C_b/g, *k)`` -> ``(C_b, C_a/g, *k)``: a transposed conv's weight in the layout of
    the regular conv with the same channel mixing, or back (applying it twice is the identity)."""
    a, bg = weight.shape[:2]
    k = weight.shape[2:]
    ag = a // groups
    return weight.reshape(groups, ag, bg, *k).transpose(1, 2).reshape(groups * bg, ag, *k)


def regular_layout(weight: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """The kernel in the regular ``(C_out, C_in/g, *k)`` layout (the adjoint layout of a
    transposed conv's weight; a regular conv's weight as it is)."""
    return adjoint(weight, groups) if transposed else weight


def own_layout(kernel: torch.Tensor, groups: int, transposed: bool) -> torch.Tensor:
    """The inverse of :func:`regular_layout`: a regular-layout kernel in the conv's own layout."""
    return adjoint(kernel, groups) if transposed else kernel


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def zero_stuffed(x: torch.Tensor, stride, padding, output_padding, dilation, kernel_size
                 ) -> torch.Tensor:
    """``x`` (N, C, *L) with ``s - 1`` zeros between neighbours on every axis, padded (or
    cropped) so that a stride-1 conv of dilation ``d`` and kernel ``k`` over it computes the
    transposed conv of that geometry."""
    d = x.dim() - 2
    s, p, op, dil = (_tuple(v, d) for v in (stride, padding, output_padding, dilation))
    if any(v != 1 for v in s):
        size = [(x.shape[2 + i] - 1) * s[i] + 1 for i in range(d)]
        up = x.new_zeros(*x.shape[:2], *size)
        up[(slice(None), slice(None), *(slice(None, None, v) for v in s))] = x
        x = up
    pad: list[int] = []
    for i in reversed(range(d)):  # F.pad takes the last axis first
        edge = dil[i] * (kernel_size[i] - 1) - p[i]
        pad += [edge, edge + op[i]]
    return F.pad(x, pad) if any(pad) else x


def patches(x: torch.Tensor, conv, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Input patches of a transposed ``conv`` as (pixels, groups, C_in/g * K), taps innermost:
    ``conv(x)`` equals ``patches(x, conv) @ adjoint(conv.weight, g).reshape(g, C_out/g, -1).mT``
    per group, plus the bias. ``rows`` as in :func:`decompose.kernels.lstsq.patches`."""
    d = x.dim() - 2
    k = tuple(int(v) for v in conv.kernel_size)
    dil = _tuple(conv.dilation, d)
    x = zero_stuffed(x, conv.stride, conv.padding, conv.output_padding, dil, k)
    for i in range(d):
        x = x.unfold(2 + i, dil[i] * (k[i] - 1) + 1, 1)
        if dil[i] > 1:
            x = x[..., ::dil[i]]
    x = x.flip(tuple(range(2 + d, 2 + 2 * d)))  # the adjoint runs the taps backwards
    c = x.shape[1]
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    if rows is not None:
        x = x[torch.unravel_index(rows, x.shape[: 1 + d])]
    return x.reshape(-1, conv.groups, c // conv.groups * math.prod(k))


__all__ = ["adjoint", "own_layout", "patches", "regular_layout", "zero_stuffed"]
