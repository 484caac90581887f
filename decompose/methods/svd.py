"""Channel SVD and spatial SVD, registered as ``"channel-svd"`` and ``"spatial-svd"``.

Both are one truncated SVD per group (the maths is in :mod:`decompose.kernels.svd`) built as two
standard convs with ``groups = g`` and ``R`` intermediate channels per group:

``channel-svd`` (Zhang et al. 2015, data-free)
    ``conv_basis``: k x k ``C_in -> g*R`` with the original stride, padding, dilation and
    padding mode; ``conv_pw``: 1x1 ``g*R -> C_out`` with the bias. From the SVD of each
    group's kernel reshaped to ``(C_out/g, C_in/g * K)``; exact at ``R = min(C_out/g,
    C_in/g * K)``. Every conv, 1-D to 3-D; 1x1 convs too, where it is a low-rank 1x1 (two 1x1
    convs through ``R`` channels), cheaper than the original once ``R < C_in*C_out /
    (C_in + C_out)`` (per group): the only method here that can compress a wide 1x1 conv.
    Left alone: depthwise convs with one output per group (nothing to share across channels).
``spatial-svd`` (Jaderberg et al. 2014, scheme 2)
    ``conv_v``: ``k_h x 1`` ``C_in -> g*R`` then ``conv_h``: ``1 x k_w`` ``g*R -> C_out`` with the
    bias; each axis's stride, padding and dilation go on the factor that convolves that axis
    (``padding="same"`` and every padding mode are exact, see
    :func:`decompose.methods._lowrank.factor_geometry`). From the SVD of each group's kernel
    reshaped to ``(C_in/g * k_h, C_out/g * k_w)``; exact at ``R = min(C_in/g * k_h, C_out/g *
    k_w)``. Conv3d splits after the depth axis: ``k_d x 1 x 1`` then ``1 x k_h x k_w`` (a
    three-factor chain would need a sequential SVD and is not offered). Left alone: Conv1d
    (one spatial axis: the chain would be channel SVD's with the factors swapped) and 1x1
    kernels (nothing to split; channel-svd gives the same low-rank 1x1). Depthwise convs are
    factored (a ``k x k`` filter into ``k x 1`` and ``1 x k``: separable filters).

Ranks: ``rank=T`` keeps ``R = min(T, full)``; budgets are offered every rank that is cheaper
than the original in multiply-adds or in parameters, then the full rank (so ``rank="full"``
and ``energy=1`` reach it). Errors and kept energies (the fraction of squared singular values,
summed over groups) come from the singular values (Eckart-Young); ``energy=E`` takes the
smallest offered rank keeping E, and a layer where only ranks costing at least the original
keep it stays original. Calibration uses the generic joint refit (L-BFGS on the composed
kernel).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..kernels import svd as K
from ._lowrank import factor_geometry, original_costs
from .base import Candidate, Method, bias_params, pixels
from .convs import conv_dim, is_conv, new_conv
from .module import LowRankConv
from .registry import register


class _SVDMethod(Method):
    """The shared part of channel and spatial SVD: one SVD per group, rank R, two convs."""

    kind = ""
    has_energy = True
    parts: tuple[str, str] = ("", "")

    def split(self, conv: nn.Module) -> int:
        """How many leading spatial axes the first factor convolves (spatial SVD only)."""
        return 1

    def unit_costs(self, conv: nn.Module, call: Any) -> tuple[int, int]:
        """(MACs, params without bias) per unit of rank R, from the traced shapes."""
        raise NotImplementedError

    def first_geometry(self, conv: nn.Module) -> tuple[tuple[int, ...], dict]:
        raise NotImplementedError

    def second_geometry(self, conv: nn.Module) -> tuple[tuple[int, ...], dict]:
        raise NotImplementedError

    # ---------------------------------------------------------------- the protocol
    def candidates(self, conv, call, *, ranks=None, variants=None, seed=0) -> list[Candidate]:
        s = K.singular_values(conv.weight, conv.groups, self.kind, self.split(conv))
        full = int(s.shape[1])
        macs, params = self.unit_costs(conv, call)
        b = bias_params(conv)
        if ranks is None:
            macs0, params0 = original_costs(conv, call)
            cheaper = [r for r in range(1, full + 1) if r * macs < macs0 or r * params + b < params0]
            rs = cheaper + ([full] if full not in cheaper else [])
        else:
            rs = sorted({full if r == "full" else min(int(r), full) for r in ranks})
            if rs and rs[0] < 1:
                raise ValueError(f"{self.name}: ranks must be >= 1, got {ranks}")
        err, energy = K.error_curve(s), K.energy_curve(s)
        return [Candidate(self.name, "", rs, [float(err[r - 1]) for r in rs],
                          [macs * r for r in rs], [params * r + b for r in rs],
                          [float(energy[r - 1]) for r in rs], full_rank=full, state={"s": s})]

    def factors(self, conv: nn.Module, cand: Candidate) -> K.SVDFactors:
        f = cand.state.get("factors")
        if f is None:
            f = cand.state["factors"] = K.factorize(conv.weight, conv.groups, self.kind,
                                                    self.split(conv))
        return f

    def approx_kernel(self, conv, cand, i) -> torch.Tensor:
        return K.rebuild(self.factors(conv, cand), cand.ranks[i])

    def build(self, conv, cand, i, form="plain") -> LowRankConv:
        if not is_conv(conv):
            raise TypeError(f"expected Conv1d/2d/3d, got {type(conv).__name__}")
        r = min(int(cand.ranks[i]), cand.full_rank)
        first_w, second_w = K.factor_weights(self.factors(conv, cand), r)
        g = conv.groups
        k1, geo1 = self.first_geometry(conv)
        k2, geo2 = self.second_geometry(conv)
        bias = conv.bias.detach() if conv.bias is not None else None
        first = new_conv(conv, conv.in_channels, g * r, k1, groups=g, weight=first_w, **geo1)
        second = new_conv(conv, g * r, conv.out_channels, k2, groups=g, bias=bias is not None,
                          weight=second_w, bias_value=bias, **geo2)
        out = LowRankConv(OrderedDict([(self.parts[0], first), (self.parts[1], second)]),
                          like=conv, method=self.name, rank=r)
        out.train(conv.training)
        return out

    def compose(self, module: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
        first, second = (getattr(module, p) for p in self.parts)
        w = K.compose(self.kind, first.weight, second.weight, module.groups,
                      tuple(module.kernel_size), self.split(module))
        return w, second.bias


@register
class SpatialSVD(_SVDMethod):
    name = "spatial-svd"
    summary = "spatial SVD (Jaderberg et al. 2014): k_h x 1 conv to R channels, then 1 x k_w"
    kind = "spatial"
    parts = ("conv_v", "conv_h")

    def skip_reason(self, conv: nn.Module) -> str | None:
        if conv_dim(conv) < 2:
            return ("Conv1d: spatial SVD needs two spatial axes to split (on one axis it is "
                    "channel-svd)")
        if math.prod(conv.kernel_size) == 1:
            return "1x1 kernel: no spatial axes to split (channel-svd gives the low-rank 1x1)"
        return None

    def _kernels(self, conv) -> tuple[tuple[int, ...], tuple[int, ...]]:
        k, s = tuple(conv.kernel_size), self.split(conv)
        return (tuple(k[a] if a < s else 1 for a in range(len(k))),
                tuple(k[a] if a >= s else 1 for a in range(len(k))))

    def unit_costs(self, conv, call) -> tuple[int, int]:
        g, ci, s = conv.groups, conv.in_channels // conv.groups, self.split(conv)
        k1, k2 = (math.prod(k) for k in self._kernels(conv))
        # the first factor reaches the output size on its axes, the others keep the input's
        mid = math.prod(call.out_shape[2:2 + s]) * math.prod(call.in_shape[2 + s:])
        return (g * ci * k1 * mid + conv.out_channels * k2 * pixels(call.out_shape),
                g * ci * k1 + conv.out_channels * k2)

    def first_geometry(self, conv):
        k1, _ = self._kernels(conv)
        return k1, factor_geometry(conv, tuple(range(self.split(conv))), k1)

    def second_geometry(self, conv):
        _, k2 = self._kernels(conv)
        return k2, factor_geometry(conv, tuple(range(self.split(conv), conv_dim(conv))), k2)


@register
class ChannelSVD(_SVDMethod):
    name = "channel-svd"
    summary = "channel SVD (Zhang et al. 2015): k x k conv to R channels, then 1x1"
    kind = "channel"
    parts = ("conv_basis", "conv_pw")

    def skip_reason(self, conv: nn.Module) -> str | None:
        if conv.in_channels // conv.groups == 1 and conv.out_channels // conv.groups == 1:
            return "depthwise conv: one filter per group, nothing to share across channels"
        return None

    def unit_costs(self, conv, call) -> tuple[int, int]:
        g, ci, k = conv.groups, conv.in_channels // conv.groups, math.prod(conv.kernel_size)
        per = g * ci * k + conv.out_channels
        return per * pixels(call.out_shape), per

    def first_geometry(self, conv):
        n = conv_dim(conv)
        return tuple(conv.kernel_size), factor_geometry(conv, tuple(range(n)), conv.kernel_size)

    def second_geometry(self, conv):
        return (1,) * conv_dim(conv), {}


__all__ = ["ChannelSVD", "SpatialSVD"]
