"""The decoupled layer: a plain ``nn.Sequential`` of two standard convs named like timm's
``SeparableConv2d`` parts, ``conv_dw`` (k x k, groups = channels) and ``conv_pw`` (1 x 1).

Only standard ``torch.nn`` layers are used so that ``torch.save``, the weights-only loader,
TorchScript and ONNX export all work on the result with no class of ours in the file.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .kernel import Factors, depthwise_pointwise_weights, factorize

CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_dim(conv: nn.Module) -> int:
    return len(conv.kernel_size)


def taps(conv: nn.Module) -> int:
    k = 1
    for s in conv.kernel_size:
        k *= int(s)
    return k


def is_conv(m: nn.Module) -> bool:
    """A regular (not transposed) Conv1d/2d/3d, subclasses included."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def is_decoupled(m: nn.Module) -> bool:
    """True for a module built by :func:`decouple_conv` (or the same shape saved and reloaded),
    in its plain form (``conv_dw``, ``conv_pw``) or the ``"dw1"`` form of
    :func:`decompose.methods.nd.forms.fast_form` (three children: ``repeat, conv_dw, conv_pw`` or
    ``conv_pw, conv_dw, sum``)."""
    if not (isinstance(m, nn.Sequential) and hasattr(m, "conv_dw") and hasattr(m, "conv_pw")):
        return False
    if len(m) == 2:
        return True
    return len(m) == 3 and (hasattr(m, "repeat") or hasattr(m, "sum"))


def decoupled_form(m: nn.Module) -> str:
    """``"plain"`` or ``"dw1"`` for a decoupled module (see :func:`is_decoupled`)."""
    return "dw1" if len(m) == 3 else "plain"


def decoupled_order(m: nn.Module) -> str:
    """'dw-pw' or 'pw-dw' for a decoupled module, read from the order of its convs."""
    first = next(n for n in m._modules if n in ("conv_dw", "conv_pw"))
    return "dw-pw" if first == "conv_dw" else "pw-dw"


def decoupled_rank(m: nn.Module) -> int:
    """The number of depthwise-separable terms T in a decoupled module (either form)."""
    if len(m) == 3:  # dw1: the helper module holds T
        return int(m.repeat.repeats) if hasattr(m, "repeat") else int(m.sum.size)
    if decoupled_order(m) == "dw-pw":
        return m.conv_dw.out_channels // m.conv_dw.in_channels
    return m.conv_pw.out_channels // m.conv_dw.out_channels


def _new_conv(ref: nn.Module, cin: int, cout: int, kernel, stride, padding, dilation, groups,
              bias: bool, padding_mode: str) -> nn.Module:
    cls = CONV_TYPES[conv_dim(ref)]
    return cls(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
               groups=groups, bias=bias, padding_mode=padding_mode,
               device=ref.weight.device, dtype=ref.weight.dtype)


def decouple_conv(conv: nn.Module, rank: int, order: str = "dw-pw",
                  factors: Factors | None = None) -> nn.Sequential:
    """Replace one conv by ``T = rank`` depthwise-separable terms (capped at the full rank).

    dw-pw: ``conv_dw`` = ConvNd(C_in, C_in*T, k, stride, padding, dilation, groups=C_in,
    padding_mode) then ``conv_pw`` = ConvNd(C_in*T, C_out, 1, groups=g, bias).
    pw-dw: ``conv_pw`` = ConvNd(C_in, C_out*T, 1, groups=g) then ``conv_dw`` =
    ConvNd(C_out*T, C_out, k, stride, padding, dilation, groups=C_out, bias, padding_mode).
    Padding commutes with a bias-free 1x1 conv for every padding mode, so both are exact at full
    rank.
    """
    if not is_conv(conv):
        raise TypeError(f"expected Conv1d/2d/3d, got {type(conv).__name__}")
    f = factors if factors is not None else factorize(conv.weight, conv.groups, order)
    t = min(int(rank), f.max_rank)
    first, second = depthwise_pointwise_weights(f, t)
    c_in, c_out, g = conv.in_channels, conv.out_channels, conv.groups
    dim = conv_dim(conv)
    ones = (1,) * dim
    has_bias = conv.bias is not None
    spatial = dict(kernel=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, padding_mode=conv.padding_mode)
    point = dict(kernel=ones, stride=ones, padding=0, dilation=ones, padding_mode="zeros")
    if f.order == "dw-pw":
        dw = _new_conv(conv, c_in, c_in * t, groups=c_in, bias=False, **spatial)
        pw = _new_conv(conv, c_in * t, c_out, groups=g, bias=has_bias, **point)
        parts = OrderedDict(conv_dw=dw, conv_pw=pw)
        dw_w, pw_w = first, second
    else:
        pw = _new_conv(conv, c_in, c_out * t, groups=g, bias=False, **point)
        dw = _new_conv(conv, c_out * t, c_out, groups=c_out, bias=has_bias, **spatial)
        parts = OrderedDict(conv_pw=pw, conv_dw=dw)
        pw_w, dw_w = first, second
    with torch.no_grad():
        dw.weight.copy_(dw_w.reshape(dw.weight.shape))
        pw.weight.copy_(pw_w.reshape(pw.weight.shape))
        if has_bias:
            (pw if f.order == "dw-pw" else dw).bias.copy_(conv.bias)
    seq = nn.Sequential(parts)
    seq.train(conv.training)
    return seq
