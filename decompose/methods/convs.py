"""What every method needs to know about a convolution: its type, geometry and cost.

Regular convolutions (``nn.Conv1d/2d/3d`` and subclasses) and transposed ones
(``nn.ConvTranspose1d/2d/3d``) are what the methods factor. Their geometry (kernel, stride,
padding and padding mode, dilation, groups, and for a transposed conv ``output_padding``) travels
with a factorized layer (:class:`decompose.methods.module.LowRankConv`) so that it stays a
drop-in for the conv.

A transposed conv's weight is laid out ``(C_in, C_out/g, *k)``, the other way round from a
regular conv's ``(C_out, C_in/g, *k)``; :func:`decompose.kernels.transposed.adjoint` turns one
layout into the other, which is how the methods' maths serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED_TYPES: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d,
                                                3: nn.ConvTranspose3d}
_CONV_FORWARDS = tuple(c.forward for c in (*CONV_TYPES.values(), *TRANSPOSED_TYPES.values()))
_TRANSPOSED_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

#: The attributes of a conv that a factorized layer copies, so code reading them keeps working.
GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "groups", "padding_mode", "transposed", "output_padding")


def is_conv(m: nn.Module) -> bool:
    """A regular (not transposed) Conv1d/2d/3d, subclasses included."""
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def is_transposed(m: nn.Module) -> bool:
    """A ConvTranspose1d/2d/3d, subclasses included (a factorized layer that stands in for one
    is not: it is a :class:`~decompose.methods.module.LowRankConv`)."""
    return isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def is_factorizable(m: nn.Module) -> bool:
    """A conv the planner considers: regular or transposed, 1-D, 2-D or 3-D."""
    return is_conv(m) or is_transposed(m)


def transposed(m: nn.Module) -> bool:
    """Whether ``m`` (a conv or a factorized layer standing in for one) computes a transposed
    convolution."""
    return bool(getattr(m, "transposed", False))


def has_own_forward(m: nn.Module) -> bool:
    """A conv subclass whose class overrides ``forward``: its weight and geometry are not all it
    computes with, so replacing it by factors of its weight would change what it does (unless
    :func:`conv_prefix` knows what it adds)."""
    return is_factorizable(m) and type(m).forward not in _CONV_FORWARDS


class SamePad(nn.Module):
    """TensorFlow's 'SAME' padding, computed from the input size on every call: zeros so that
    the conv after it (stride ``s``, kernel ``k``, dilation ``d``, no padding of its own) outputs
    ``ceil(size / s)`` positions per axis, the odd pixel at the end. What EfficientNet's
    ``Conv2dDynamicSamePadding`` and timm's ``Conv2dSame`` do before their convolution."""

    def __init__(self, kernel_size, stride, dilation) -> None:
        super().__init__()
        n = len(kernel_size)
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.stride = tuple(int(v) for v in as_tuple(stride, n))
        self.dilation = tuple(int(v) for v in as_tuple(dilation, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for i in reversed(range(len(self.kernel_size))):  # F.pad takes the last axis first
            size, k, s, d = x.shape[2 + i], self.kernel_size[i], self.stride[i], self.dilation[i]
            out = -(-size // s)
            p = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [p // 2, p - p // 2]
        return nn.functional.pad(x, pads) if any(pads) else x

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
                nn.ConstantPad3d, nn.Identity)


def conv_prefix(conv: nn.Module) -> tuple[bool, nn.Module | None]:
    """``(understood, prefix)``: whether decompose knows what ``conv`` computes, and the module
    it applies to its input before a plain convolution with its own weight and geometry.

    A conv with torch's own forward: ``(True, None)``. Static 'same' padding (EfficientNet's
    ``Conv2dStaticSamePadding``: a ``static_padding`` pad module, then the conv):
    ``(True, that module)``. Dynamic 'same' padding (EfficientNet's
    ``Conv2dDynamicSamePadding``, timm's ``Conv2dSame``): ``(True, SamePad(...))``. Any other
    subclass with its own forward: ``(False, None)``, and it is left alone."""
    if not has_own_forward(conv):
        return True, None
    if is_transposed(conv):
        return False, None
    name = type(conv).__name__
    pad = getattr(conv, "static_padding", None)
    zero = all(int(p) == 0 for p in as_tuple(conv.padding, conv_dim(conv))) \
        if not isinstance(conv.padding, str) else False
    if name.endswith("StaticSamePadding") and isinstance(pad, _PAD_MODULES) and zero:
        import copy
        return True, copy.deepcopy(pad)
    if name in ("Conv2dDynamicSamePadding", "Conv2dSame") and zero:
        return True, SamePad(conv.kernel_size, conv.stride, conv.dilation)
    return False, None


def conv_dim(conv: nn.Module) -> int:
    return len(conv.kernel_size)


def taps(conv: nn.Module) -> int:
    """K: the number of kernel taps (9 for 3x3)."""
    return math.prod(int(s) for s in conv.kernel_size)


def new_conv(ref: nn.Module, cin: int, cout: int, kernel, *, stride=1, padding=0, dilation=1,
             groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
             weight: torch.Tensor | None = None, bias_value: torch.Tensor | None = None,
             transposed: bool = False, output_padding=0) -> nn.Module:
    """A ConvNd (``transposed``: a ConvTransposeNd, with ``output_padding``) of ``ref``'s
    dimension, dtype and device; weights copied in when given (in the new conv's own layout)."""
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
              padding_mode=padding_mode, device=ref_device(ref), dtype=ref_dtype(ref))
    if transposed:
        conv = TRANSPOSED_TYPES[conv_dim(ref)](cin, cout, kernel, output_padding=output_padding,
                                               **kw)
    else:
        conv = CONV_TYPES[conv_dim(ref)](cin, cout, kernel, **kw)
    with torch.no_grad():
        if weight is not None:
            conv.weight.copy_(weight.reshape(conv.weight.shape))
        if bias_value is not None:
            conv.bias.copy_(bias_value.reshape(conv.bias.shape))
    return conv


def ref_dtype(m: nn.Module) -> torch.dtype:
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.dtype
    p = next(m.parameters(), None)
    return p.dtype if p is not None else torch.float32


def ref_device(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def conv_macs(conv: nn.Module, out_shape: tuple[int, ...],
              in_shape: tuple[int, ...] | None = None) -> int:
    """MACs of one call of a conv (or a factorized layer, by its original geometry) producing
    ``out_shape`` from ``in_shape`` (batch 1 assumed in the count).

    A regular conv does ``C_out * C_in/g * K`` multiply-adds per *output* position. A transposed
    conv does ``C_in * C_out/g * K`` per *input* position (every input element times every tap
    of its filters; the zeros a strided transposed conv would insert cost nothing), the count
    fvcore uses; ``in_shape`` gives the input positions, else they are worked out from
    ``out_shape`` and the geometry."""
    per = conv.out_channels * (conv.in_channels // conv.groups) * taps(conv)
    if not transposed(conv):
        return per * math.prod(out_shape[2:])
    if in_shape is not None and len(in_shape) == len(out_shape):
        return per * math.prod(in_shape[2:])
    return per * math.prod(transposed_input_size(conv, out_shape[2:]))


def transposed_input_size(conv: nn.Module, out_size) -> tuple[int, ...]:
    """The input positions per axis of a transposed conv that produced ``out_size`` (the inverse
    of ``(L_in - 1) s - 2 p + d (k - 1) + output_padding + 1``, for any ``output_padding`` below
    the stride)."""
    n = conv_dim(conv)
    s, p, d = (as_tuple(v, n) for v in (conv.stride, conv.padding, conv.dilation))
    return tuple(max((int(o) - 1 + 2 * p[i] - d[i] * (conv.kernel_size[i] - 1)) // s[i] + 1, 1)
                 for i, o in enumerate(out_size))


def run_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv``'s operation (its geometry and padding mode) on ``x`` with another weight and
    bias: what ``conv(x)`` computes with ``weight`` in place of its own. Transposed convs use
    their ``output_padding``."""
    if not transposed(conv):
        return conv._conv_forward(x, weight, bias)
    fn = _TRANSPOSED_FNS[conv_dim(conv)]
    return fn(x, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups,
              conv.dilation)


def as_tuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def set_weights(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
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

