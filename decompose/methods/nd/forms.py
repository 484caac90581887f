"""Exact, faster forms of a decoupled layer (docs/layouts.md has the measurements behind them).

A decoupled layer (:func:`decompose.methods.nd.layers.decouple_conv`) is ``conv_dw`` (k x k, groups=C,
channel multiplier T) and ``conv_pw`` (1x1). Its multiply-adds fall with T, but its speed need not:
on x86 CPUs PyTorch hands the convs to oneDNN, whose fast depthwise kernels only take a
depthwise conv with channel multiplier 1 (one output per input channel). With T >= 2, ``groups=C``
and ``C*T`` outputs is run as a generic grouped conv, many times slower than its arithmetic. The
forms here compute *the same function* (up to float rounding) in other ways:

``"plain"``
    the Sequential as given (a copy).
``"dense"``
    one conv with the rebuilt rank-T kernel ``W_T``: exactly the same function, at the speed of
    the original dense conv. Chosen when no decoupled form beats it ("keep dense, with the
    low-rank kernel": accuracy of rank T, speed of the original).
``"dw1"``
    the depthwise conv rewritten with channel multiplier 1. dw-pw: the input channels are
    repeated T times (:class:`RepeatChannels`, channel ``c*T + t`` = input ``c``) and a
    depthwise conv with ``groups = C_in*T`` and the *same* weights follows; the pointwise conv
    is unchanged. pw-dw: the depthwise conv gets ``groups = C_out*T`` (same weights, one output
    per channel) and :class:`SumChannelGroups` adds each run of T channels. Equal to
    ``"plain"`` at T = 1.
Memory format is not a form: it belongs to the activations, so it is chosen for a whole model
(``model.to(memory_format=torch.channels_last)`` and the input converted once). A depthwise
weight ``(C, 1, k, k)`` and a 1x1 weight are laid out the same either way, so a decoupled layer
simply computes in the layout of its input; :class:`RepeatChannels` and
:class:`SumChannelGroups` keep a channels_last input channels_last.

Every form is built from ``torch.nn`` conv layers inside an ``nn.Sequential``; ``"dw1"`` adds one
of two tiny modules defined here, :class:`RepeatChannels` or :class:`SumChannelGroups` (plain
tensor ops, TorchScript- and ONNX-exportable, no parameters), which a safe loader must allowlist.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from ...kernels.transposed import adjoint
from ..convs import CONV_TYPES, conv_dim
from ..module import LowRankConv
from .layers import decoupled_form, decoupled_order, decoupled_rank, is_decoupled, wrap

FORMS = ("plain", "dense", "dw1")
CHOICES = ("auto",) + FORMS


def _channels_last_input(x: torch.Tensor) -> bool:
    """True for a tensor laid out channels_last(_3d) and not also plain contiguous."""
    if x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


class RepeatChannels(nn.Module):
    """Repeat every channel ``repeats`` times in place: output channel ``c*repeats + t`` is input
    channel ``c`` (``torch.repeat_interleave`` on dim 1). No parameters. The memory format of a
    channels_last input is kept."""

    def __init__(self, repeats: int) -> None:
        super().__init__()
        self.repeats = int(repeats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _channels_last_input(x):  # repeat along the innermost (channel) dim of the memory
            y = torch.repeat_interleave(x.movedim(1, -1), self.repeats, dim=-1)
            return y.movedim(-1, 1)
        return torch.repeat_interleave(x, self.repeats, dim=1)

    def extra_repr(self) -> str:
        return f"repeats={self.repeats}"


class SumChannelGroups(nn.Module):
    """Sum every run of ``size`` consecutive channels: output channel ``o`` is the sum of input
    channels ``o*size .. o*size + size-1``. No parameters."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _channels_last_input(x):  # sum along the innermost (channel) dim of the memory
            return x.movedim(1, -1).unflatten(-1, (-1, self.size)).sum(-1).movedim(-1, 1)
        return x.unflatten(1, (-1, self.size)).sum(2)

    def extra_repr(self) -> str:
        return f"size={self.size}"


#: The only non-torch classes a fast form may contain (for a weights-only loader's allowlist).
CUSTOM_MODULES: tuple[type[nn.Module], ...] = (RepeatChannels, SumChannelGroups)


def _check(seq: nn.Module) -> tuple[str, int, nn.Module, nn.Module]:
    if not is_decoupled(seq):
        raise TypeError("fast_form needs a decoupled layer (an nn.Sequential of conv_dw and "
                        f"conv_pw from decouple_conv), got {type(seq).__name__}")
    if decoupled_form(seq) != "plain":
        raise TypeError("expected the plain form of a decoupled layer; convert it with to_plain")
    order = decoupled_order(seq)
    dw, pw = seq.conv_dw, seq.conv_pw
    if any(k != 1 for k in pw.kernel_size) or any(s != 1 for s in pw.stride) \
            or any(p != 0 for p in _tuple(pw.padding)):
        raise ValueError("conv_pw must be 1x1 with stride 1 and no padding, as decouple_conv "
                         "builds it")
    if order == "pw-dw" and pw.bias is not None:
        raise ValueError("a pw-dw layer whose conv_pw has a bias has no exact dense form "
                         "(the bias would be padded); decouple_conv never builds one")
    return order, decoupled_rank(seq), dw, pw


def to_plain(seq: nn.Module) -> nn.Module:
    """The plain form (``conv_dw`` with channel multiplier T, ``conv_pw``) of a decoupled layer in
    any form: ``seq`` itself when it is plain, else a new, exactly equal module. Calibration and
    fine-tuning work on this form."""
    if not is_decoupled(seq):
        raise TypeError(f"to_plain needs a decoupled layer, got {type(seq).__name__}")
    if decoupled_form(seq) == "plain":
        return seq
    order, t = decoupled_order(seq), decoupled_rank(seq)
    dw, pw = seq.conv_dw, seq.conv_pw
    if order == "dw-pw":  # repeat + multiplier-1 dw == multiplier-T dw with the same weights
        c_in = dw.in_channels // t
        new_dw = _like(dw, c_in, c_in * t, c_in, dw.weight.detach(),
                       dw.bias.detach() if dw.bias is not None else None)
        parts = OrderedDict(conv_dw=new_dw, conv_pw=copy.deepcopy(pw))
    else:  # dw with groups C_out*T then a sum of runs of T == dw with groups C_out
        c_out = dw.out_channels // t
        bias = dw.bias.detach().reshape(c_out, t).sum(1) if dw.bias is not None else None
        new_dw = _like(dw, c_out * t, c_out, c_out, dw.weight.detach(), bias)
        parts = OrderedDict(conv_pw=copy.deepcopy(pw), conv_dw=new_dw)
    out = wrap(parts, seq, order, t, "plain")
    out.train(seq.training)
    return out


def _tuple(p) -> tuple:
    return tuple(p) if isinstance(p, (tuple, list)) else (p,)


def _like(ref: nn.Module, cin: int, cout: int, groups: int, weight: torch.Tensor,
          bias: torch.Tensor | None) -> nn.Module:
    """A conv with ``ref``'s geometry (kernel, stride, padding, dilation, padding mode)."""
    cls = CONV_TYPES[conv_dim(ref)]
    conv = cls(cin, cout, ref.kernel_size, stride=ref.stride, padding=ref.padding,
               dilation=ref.dilation, groups=groups, bias=bias is not None,
               padding_mode=ref.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(conv.weight.shape))
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def rebuilt_weight(seq: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense kernel ``W_T`` (and bias) that computes exactly what ``seq`` computes.

    Summed in float64 and cast back to the layer's dtype.
    """
    seq = to_plain(seq)
    order, t, dw, pw = _check(seq)
    dtype = pw.weight.dtype
    k = dw.weight.shape[2:]
    taps = dw.weight[0, 0].numel()
    pw_w = pw.weight.detach().double().flatten(1)  # (out, in/g)
    dw_w = dw.weight.detach().double().reshape(dw.weight.shape[0], -1, taps)
    if order == "dw-pw":
        c_in, g = dw.in_channels, pw.groups
        cg, c_out = c_in // g, pw.out_channels
        d = dw_w.reshape(g, cg, t, taps)
        p = pw_w.reshape(g, c_out // g, cg, t)
        w = torch.einsum("gocs,gcsk->gock", p, d).reshape(c_out, cg, *k)
        bias = pw.bias.detach().double() if pw.bias is not None else None
        if dw.bias is not None:  # a depthwise bias passes through the 1x1 conv: fold it
            b_in = dw.bias.detach().double().reshape(g, cg * t)[
                torch.arange(c_out, device=pw_w.device) // (c_out // g)]
            fold = (pw_w * b_in).sum(1)
            bias = fold if bias is None else bias + fold
    else:
        c_out = dw.out_channels
        d = dw_w.reshape(c_out, t, taps)
        p = pw_w.reshape(c_out, t, -1)
        w = torch.einsum("ots,otk->osk", p, d).reshape(c_out, pw.in_channels // pw.groups, *k)
        bias = dw.bias.detach().double() if dw.bias is not None else None
    return w.to(dtype), (bias.to(dtype) if bias is not None else None)


def _dense(seq: nn.Module) -> nn.Module:
    order, _, dw, pw = _check(seq)
    w, b = rebuilt_weight(seq)
    cin = dw.in_channels if order == "dw-pw" else pw.in_channels
    cout = pw.out_channels if order == "dw-pw" else dw.out_channels
    return _like(dw, cin, cout, pw.groups, w, b)


def _dw1(seq: nn.Module) -> nn.Module:
    order, t, dw, pw = _check(seq)
    if t == 1:
        return copy.deepcopy(seq)
    c = dw.out_channels if order == "dw-pw" else dw.in_channels  # C_in*T or C_out*T
    bias = None
    if dw.bias is not None:
        if order == "dw-pw":
            bias = dw.bias.detach()
        else:  # carried once per group of T: on its first channel
            bias = torch.zeros(c, dtype=dw.bias.dtype, device=dw.bias.device)
            bias[::t] = dw.bias.detach()
    dw1 = _like(dw, c, c, c, dw.weight.detach(), bias)
    pw1 = copy.deepcopy(pw)
    if order == "dw-pw":
        parts = OrderedDict(repeat=RepeatChannels(t), conv_dw=dw1, conv_pw=pw1)
    else:
        parts = OrderedDict(conv_pw=pw1, conv_dw=dw1, sum=SumChannelGroups(t))
    return wrap(parts, seq, order, t, "dw1")


_BUILDERS = {"plain": copy.deepcopy, "dense": _dense, "dw1": _dw1}


#: Cost, in multiply-adds, of one channel of the decoupled layer's intermediate tensor per output
#: pixel (writing it, reading it back, the depthwise conv and, for T >= 2, the repeat or the
#: grouped-conv kernel), fitted to the single-thread measurements in docs/layouts.md (x86 AVX-512,
#: oneDNN, channels_last; the fits ranged over 70-190 at T = 1 and 90-275 at T >= 2).
INTERMEDIATE_COST = {1: 100.0, 2: 200.0}


def estimated_speedup(seq: nn.Module) -> float:
    """Dense time / decoupled time, from a cost model per output pixel (docs/layouts.md).

    dense: ``K * Cin * Cout / g`` multiply-adds. dw-pw: ``T * Cin * (Cout/g + A)``; pw-dw, whose
    1x1 conv runs at the input resolution: ``S * T * Cout * (Cin/g + A)`` with ``S`` the product
    of the strides. ``A`` (:data:`INTERMEDIATE_COST`) stands for moving the ``T * C``-channel
    intermediate through memory, the cost that multiply-add counts leave out. A rough guide for
    one machine (docs/layouts.md says how often it was right); a planner that can time the forms
    should (:func:`candidate_forms`, :func:`decompose.measure.clock.compare_latency`).
    """
    order, t, dw, pw = _check(to_plain(seq))
    taps = dw.weight[0, 0].numel()
    a = INTERMEDIATE_COST[1 if t == 1 else 2]
    g = pw.groups
    if order == "dw-pw":
        c_in, c_out_g = dw.in_channels, pw.out_channels / g
        return taps * c_in * c_out_g / (t * c_in * (c_out_g + a))
    c_in_g, c_out = pw.in_channels / g, dw.out_channels
    stride = 1
    for s in dw.stride:
        stride *= int(s)
    return taps * c_in_g * c_out / (stride * t * c_out * (c_in_g + a))


#: :func:`auto_form` decouples only when :func:`estimated_speedup` exceeds this margin: near 1
#: the model cannot tell the forms apart, and the dense form is the more accurate choice for
#: a planner anyway (the original conv costs the same).
AUTO_MARGIN = 1.2


def auto_form(seq: nn.Module) -> str:
    """The form :func:`fast_form` picks for ``form="auto"`` (rule and data: docs/layouts.md).

    * ``"dense"`` when :func:`estimated_speedup` is at most :data:`AUTO_MARGIN`: no decoupled
      form is expected to beat the dense conv, so keep it dense, with the rank-T kernel;
    * else ``"plain"`` at T = 1 (its depthwise conv already has channel multiplier 1) and for a
      strided dw-pw layer (``"dw1"`` would repeat the input at the input resolution);
    * else ``"dw1"``.
    """
    seq = to_plain(seq)
    order, t, dw, _ = _check(seq)
    if estimated_speedup(seq) <= AUTO_MARGIN:
        return "dense"
    if t == 1 or (order == "dw-pw" and any(int(s) != 1 for s in dw.stride)):
        return "plain"
    return "dw1"


def fast_form(seq: nn.Module, form: str = "auto") -> nn.Module:
    """An exact equivalent of the decoupled layer ``seq`` in the given form (a new module).

    Args:
        seq: an ``nn.Sequential`` from :func:`decompose.methods.nd.layers.decouple_conv` (either order).
        form: ``"auto"`` (default: :func:`auto_form`), ``"plain"``, ``"dense"`` or ``"dw1"``;
            see the module docstring.

    The result is in the same train/eval mode as ``seq``; ``seq`` is not modified. Outputs agree
    with ``seq`` to float rounding (``"dense"`` sums the T terms in another order).
    """
    seq = to_plain(seq)
    if form == "auto":
        form = auto_form(seq)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; choose one of {', '.join(CHOICES)}")
    _check(seq)
    out = _BUILDERS[form](seq)
    out.train(seq.training)
    return out


def candidate_forms(seq: nn.Module) -> dict[str, nn.Module]:
    """Every distinct form of ``seq``, by name, for a planner to time side by side
    (``"dw1"`` is left out at T = 1, where it is ``"plain"``)."""
    seq = to_plain(seq)
    _, t, _, _ = _check(seq)
    return {f: fast_form(seq, f) for f in FORMS if not (t == 1 and f == "dw1")}


def form_name(m: nn.Module) -> str:
    """The form of a module built here: ``"plain"`` for a decoupled Sequential, ``"dense"`` for a
    single conv, ``"dw1"`` for one holding a :class:`RepeatChannels`/:class:`SumChannelGroups`."""
    if isinstance(m, tuple(CONV_TYPES.values())):
        return "dense"
    if any(isinstance(c, CUSTOM_MODULES) for c in m.modules()):
        return "dw1"
    if is_decoupled(m):
        return "plain"
    raise TypeError(f"not a form built by decompose.methods.nd.forms: {type(m).__name__}")


def compose(m: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_T, bias)`` of the dense conv equal to the decoupled layer ``m``; differentiable in
    the plain form (the dw1 form is composed through its plain equivalent). A decoupled
    transposed conv composes to the transposed conv's weight layout ``(C_in, C_out/g, *k)``."""
    if m.form != "plain":
        m = to_plain(m)
    w, b = compose_pair(m.conv_dw, m.conv_pw, m.variant, int(m.rank))
    if getattr(m, "transposed", False):
        w = adjoint(w, m.groups)
    return w, b


def compose_pair(dw: nn.Module, pw: nn.Module, order: str, t: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_T, bias)`` of one depthwise conv and one 1x1 conv of ``t`` terms in ``order``, in
    the regular layout (a depthwise transposed conv's weight reshapes to the same factors)."""
    k = tuple(dw.weight.shape[2:])
    taps = dw.weight[0, 0].numel()
    if order == "dw-pw":  # dw: C_in -> C_in*T (groups C_in); pw: -> C_out (g)
        g, c_in, c_out = pw.groups, dw.in_channels, pw.out_channels
        cg = c_in // g
        d = dw.weight.reshape(g, cg, t, taps)
        p = pw.weight.reshape(g, c_out // g, cg, t)
        w = torch.einsum("gocs,gcsk->gock", p, d).reshape(c_out, cg, *k)
        bias = pw.bias
        if dw.bias is not None:  # a depthwise bias goes through the 1x1 conv
            b_in = dw.bias.reshape(g, 1, cg * t)
            fold = (pw.weight.reshape(g, c_out // g, cg * t) * b_in).sum(-1).reshape(c_out)
            bias = fold if bias is None else bias + fold
        return w, bias
    # pw-dw: pw: C_in -> C_out*T (groups g); dw: C_out*T -> C_out (groups C_out, T inputs each)
    c_out = dw.out_channels
    d = dw.weight.reshape(c_out, t, taps)
    p = pw.weight.reshape(c_out, t, -1)
    w = torch.einsum("ots,otk->osk", p, d).reshape(c_out, -1, *k)
    bias = dw.bias
    if pw.bias is not None:  # exact only with zero padding and no padding near the border
        fold = (dw.weight.reshape(c_out, t, taps).sum(-1) * pw.bias.reshape(c_out, t)).sum(1)
        bias = fold if bias is None else bias + fold
    return w, bias
