"""Training a decoupled layer at the speed of a dense conv: the same function, computed as one
conv with the rank-T kernel composed from the factors on every call.

On CPUs PyTorch runs a depthwise conv with channel multiplier T >= 2 as a generic grouped conv,
several times slower than its arithmetic, in the forward and even more in the backward pass
(docs/finetune.md has the timing). During fine-tuning each decoupled ``nn.Sequential(conv_dw,
conv_pw)`` (either order) can instead compute ``conv(x, W_T)`` with
``W_T = compose(conv_dw.weight, conv_pw.weight)`` built by a differentiable einsum: the
parameters, their gradients (up to float rounding) and the state_dict are exactly those of the
decoupled layer; only the order of the arithmetic changes. The composed kernel costs
``C_out * C_in/g * K * T`` multiply-adds per step, nothing next to the conv.

The swap is an instance attribute ``forward`` set by :func:`dense_training` and removed when it
exits; :func:`strip` removes it from a copy (before pickling a model mid-training).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ...methods.nd.layers import decoupled_form, decoupled_order, decoupled_rank, is_decoupled

FORMS = ("auto", "plain", "dense")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def composed_kernel(seq: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_T, bias)`` of the dense conv equal to the decoupled layer ``seq``; differentiable."""
    dw, pw = seq.conv_dw, seq.conv_pw
    t = decoupled_rank(seq)
    k = tuple(dw.weight.shape[2:])
    taps = dw.weight[0, 0].numel()
    if decoupled_order(seq) == "dw-pw":  # dw: C_in -> C_in*T (groups C_in); pw: -> C_out (g)
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
    return torch.einsum("ots,otk->osk", p, d).reshape(c_out, -1, *k), dw.bias


def _composable(seq: nn.Module) -> bool:
    """Exact as one conv: conv_pw is 1x1, stride 1, unpadded, and in the pw-dw order has no bias
    (padding of any mode commutes with a bias-free 1x1 conv, not with a biased one)."""
    if decoupled_form(seq) != "plain":  # dw1's repeat/sum modules are not in the composed kernel
        return False
    pw = seq.conv_pw
    pad = pw.padding if isinstance(pw.padding, tuple) else (pw.padding,)
    return (all(s == 1 for s in pw.kernel_size) and all(s == 1 for s in pw.stride)
            and pad != "same" and all(p == 0 for p in pad)
            and not (decoupled_order(seq) == "pw-dw" and pw.bias is not None))


class _DenseForward:
    """The replacement ``forward``: one conv with the composed kernel and conv_dw's geometry."""

    def __init__(self, seq: nn.Module) -> None:
        self.seq = seq

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.seq
        dw = seq.conv_dw
        w, b = composed_kernel(seq)
        groups = seq.conv_pw.groups
        if dw.padding_mode != "zeros":
            x = F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode)
            return _CONV[w.dim() - 2](x, w, b, dw.stride, 0, dw.dilation, groups)
        return _CONV[w.dim() - 2](x, w, b, dw.stride, dw.padding, dw.dilation, groups)


def wanted(seq: nn.Module, form: str, device: torch.device) -> bool:
    """Whether ``form`` computes this decoupled layer densely: ``"dense"`` always (when exact),
    ``"auto"`` on CPU for T >= 2 (where grouped convs are slow), ``"plain"`` never."""
    if form == "plain" or not _composable(seq):
        return False
    return form == "dense" or (device.type == "cpu" and decoupled_rank(seq) >= 2)


@contextmanager
def dense_training(model: nn.Module, form: str, device: torch.device) -> Iterator[int]:
    """Inside the block, the decoupled layers ``form`` picks run as composed dense convs; yields
    how many. Parameters and state_dict keys do not change."""
    swapped = [m for m in model.modules() if is_decoupled(m) and wanted(m, form, device)]
    for m in swapped:
        m.forward = _DenseForward(m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


def strip(model: nn.Module) -> nn.Module:
    """Remove swapped ``forward`` attributes from ``model`` (e.g. a deep copy about to be saved)."""
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), _DenseForward):
            del m.__dict__["forward"]
    return model
