"""Helpers shared by the channel-mixing low-rank methods (Tucker-2, spatial and channel SVD):
the original's cost, the geometry a factor conv takes from the conv it replaces, and the
thinning of a large menu of rank options to the few a budget can use.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import bias_params
from .convs import as_tuple, conv_macs


def original_costs(conv: nn.Module, call) -> tuple[int, int]:
    """(MACs of one call at batch 1, parameters) of the conv itself."""
    return conv_macs(conv, call.out_shape), conv.weight.numel() + bias_params(conv)


def factor_geometry(conv: nn.Module, axes: tuple[int, ...], kernel: tuple[int, ...]) -> dict:
    """Stride, padding, dilation and padding mode of a factor conv that convolves only the
    spatial ``axes`` of ``conv`` with kernel ``kernel`` (1 on every other axis): each covered
    axis keeps ``conv``'s stride, padding and dilation, every other axis gets 1, 0 and 1.

    ``padding="same"`` / ``"valid"`` stay strings (a kernel of 1 gets no padding either way,
    and ``"same"`` splits an odd total as the original does). The padding mode is ``conv``'s
    where the factor pads at all, else ``"zeros"``. Since reflect, replicate, circular and zero
    padding all map each axis's indices independently, padding one axis commutes with a conv
    along another, so a chain of such factors equals the original for every padding mode."""
    n = len(conv.kernel_size)
    stride, dilation = as_tuple(conv.stride, n), as_tuple(conv.dilation, n)
    st = tuple(stride[a] if a in axes else 1 for a in range(n))
    dil = tuple(dilation[a] if a in axes else 1 for a in range(n))
    if isinstance(conv.padding, str):
        pad: object = conv.padding
        pads = conv.padding == "same" and any(dil[a] * (kernel[a] - 1) for a in range(n))
    else:
        padding = as_tuple(conv.padding, n)
        pad = tuple(padding[a] if a in axes else 0 for a in range(n))
        pads = any(pad)
    return dict(stride=st, padding=pad, dilation=dil,
                padding_mode=conv.padding_mode if pads else "zeros")


def pareto_indices(cost: torch.Tensor, err: torch.Tensor) -> list[int]:
    """Indices of the options no other beats on both cost and error, by increasing cost (of
    equal costs the lowest error; of equal errors the cheapest)."""
    cost = torch.as_tensor(cost)
    err = torch.as_tensor(err, dtype=torch.float64)
    if not len(cost):
        return []
    by_err = torch.argsort(err, stable=True)
    order = by_err[torch.argsort(cost[by_err], stable=True)]
    e = err[order]
    before = torch.cat([e.new_full((1,), float("inf")), torch.cummin(e, 0).values[:-1]])
    return order[e < before].tolist()


def thin(front: list[int], cost: torch.Tensor, err: torch.Tensor, size: int,
         full_cost: float) -> list[int]:
    """At most about ``2 * size`` points of a Pareto ``front`` (from :func:`pareto_indices`):
    the cheapest, the most accurate, and every point whose cost is at least ``full_cost /
    size`` above, or whose error is at least ``1 / size`` below, the last one kept."""
    if len(front) <= size:
        return list(front)
    c = torch.as_tensor(cost)[front].tolist()
    e = torch.as_tensor(err)[front].tolist()
    keep = [0]
    for j in range(1, len(front) - 1):
        if c[j] - c[keep[-1]] >= full_cost / size or e[keep[-1]] - e[j] >= 1.0 / size:
            keep.append(j)
    keep.append(len(front) - 1)
    return [front[j] for j in keep]
