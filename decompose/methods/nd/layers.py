"""The decoupled layer: a :class:`~decompose.methods.module.LowRankConv` of two standard convs
named like timm's ``SeparableConv2d`` parts, ``conv_dw`` (k x k, groups = channels) and
``conv_pw`` (1 x 1), in either order.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ...kernels.nd import Factors, depthwise_pointwise_weights, factorize
from ...kernels.transposed import regular_layout
from ..convs import conv_dim, is_factorizable, new_conv, transposed
from ..module import LowRankConv, is_lowrank

NAME = "nd"


def is_decoupled(m: nn.Module) -> bool:
    """True for a Network Decoupling layer (:func:`decouple_conv`), in any form."""
    return is_lowrank(m) and m.method == NAME


def decoupled_form(m: nn.Module) -> str:
    """``"plain"`` or ``"dw1"`` for a decoupled module."""
    return m.form


def decoupled_order(m: nn.Module) -> str:
    """'dw-pw' or 'pw-dw' for a decoupled module."""
    return m.variant


def decoupled_rank(m: nn.Module) -> int:
    """The number of depthwise-separable terms T in a decoupled module (either form)."""
    return int(m.rank)


def wrap(parts: OrderedDict, like: nn.Module, order: str, rank: int, form: str) -> LowRankConv:
    """A decoupled LowRankConv around ``parts`` (the geometry is ``like``'s)."""
    return LowRankConv(parts, like=like, method=NAME, variant=order, rank=rank, form=form)


def kernel(conv: nn.Module):
    """The kernel Network Decoupling factors: a regular conv's weight, or a transposed conv's
    in the adjoint layout ``(C_out, C_in/g, *k)`` (:mod:`decompose.kernels.transposed`)."""
    return regular_layout(conv.weight, conv.groups, transposed(conv))


def decouple_conv(conv: nn.Module, rank: int, order: str = "dw-pw",
                  factors: Factors | None = None) -> LowRankConv:
    """Replace one conv by ``T = rank`` depthwise-separable terms (capped at the full rank).

    dw-pw: ``conv_dw`` = ConvNd(C_in, C_in*T, k, stride, padding, dilation, groups=C_in,
    padding_mode) then ``conv_pw`` = ConvNd(C_in*T, C_out, 1, groups=g, bias).
    pw-dw: ``conv_pw`` = ConvNd(C_in, C_out*T, 1, groups=g) then ``conv_dw`` =
    ConvNd(C_out*T, C_out, k, stride, padding, dilation, groups=C_out, bias, padding_mode).
    Padding commutes with a bias-free 1x1 conv for every padding mode, so both are exact at full
    rank. The result carries ``conv``'s geometry (a drop-in: ``.stride``, ``.weight``, ...).

    A transposed conv (``ConvTransposeNd``) is decoupled from its adjoint-layout kernel
    (:func:`kernel`): ``conv_dw`` is then a depthwise ConvTransposeNd carrying the stride,
    padding, output_padding and dilation (weight ``(C_in, T, *k)`` in dw-pw, ``(C_out*T, 1,
    *k)`` in pw-dw), ``conv_pw`` the same 1x1 ConvNd; both orders are exact at full rank.
    """
    if not is_factorizable(conv):
        raise TypeError(f"expected Conv1d/2d/3d or ConvTranspose1d/2d/3d, got "
                        f"{type(conv).__name__}")
    f = factors if factors is not None else factorize(kernel(conv), conv.groups, order)
    t = min(int(rank), f.max_rank)
    first, second = depthwise_pointwise_weights(f, t)
    c_in, c_out, g = conv.in_channels, conv.out_channels, conv.groups
    ones = (1,) * conv_dim(conv)
    bias = conv.bias.detach() if conv.bias is not None else None
    spatial = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                   padding_mode=conv.padding_mode)
    if transposed(conv):
        spatial.update(transposed=True, output_padding=conv.output_padding)
    if f.order == "dw-pw":
        dw = new_conv(conv, c_in, c_in * t, conv.kernel_size, groups=c_in, weight=first,
                      **spatial)
        pw = new_conv(conv, c_in * t, c_out, ones, groups=g, bias=bias is not None,
                      weight=second, bias_value=bias)
        parts = OrderedDict(conv_dw=dw, conv_pw=pw)
    else:
        pw = new_conv(conv, c_in, c_out * t, ones, groups=g, weight=first)
        dw = new_conv(conv, c_out * t, c_out, conv.kernel_size, groups=c_out,
                      bias=bias is not None, weight=second, bias_value=bias, **spatial)
        parts = OrderedDict(conv_pw=pw, conv_dw=dw)
    out = wrap(parts, conv, f.order, t, "plain")
    out.train(conv.training)
    return out


def upgrade_legacy(seq: nn.Module) -> LowRankConv | None:
    """A decoupled layer saved by decompose 0.1 (a bare ``nn.Sequential`` of ``conv_dw`` and
    ``conv_pw``, or the dw1 form's three children) as a LowRankConv with the same parameters;
    None when ``seq`` is not one."""
    if is_lowrank(seq) or not isinstance(seq, nn.Sequential):
        return None
    names = list(seq._modules)
    if not {"conv_dw", "conv_pw"} <= set(names) or len(names) not in (2, 3):
        return None
    if len(names) == 3 and not ({"repeat"} <= set(names) or {"sum"} <= set(names)):
        return None
    dw, pw = seq.conv_dw, seq.conv_pw
    order = "dw-pw" if names.index("conv_dw") < names.index("conv_pw") else "pw-dw"
    form = "dw1" if len(names) == 3 else "plain"
    if form == "dw1":
        t = int(seq.repeat.repeats) if order == "dw-pw" else int(seq.sum.size)
    elif order == "dw-pw":
        t = dw.out_channels // dw.in_channels
    else:
        t = pw.out_channels // dw.out_channels
    geometry = _Geometry(dw, pw, order, t, form)
    out = wrap(OrderedDict(seq._modules), geometry, order, t, form)
    out.train(seq.training)
    return out


class _Geometry:
    """The original conv's geometry, read back from a legacy decoupled layer's parts."""

    def __init__(self, dw: nn.Module, pw: nn.Module, order: str, t: int, form: str) -> None:
        for a in ("kernel_size", "stride", "padding", "dilation", "padding_mode"):
            setattr(self, a, getattr(dw, a))
        self.groups = pw.groups
        self._reversed_padding_repeated_twice = dw._reversed_padding_repeated_twice
        self.transposed, self.output_padding = False, (0,) * len(dw.kernel_size)
        if order == "dw-pw":
            self.in_channels = dw.in_channels if form == "plain" else dw.in_channels // t
            self.out_channels = pw.out_channels
        else:
            self.in_channels = pw.in_channels
            self.out_channels = dw.out_channels if form == "plain" else dw.out_channels // t
