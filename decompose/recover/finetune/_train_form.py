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

from ... import methods as registry
from ...methods.module import LowRankConv, is_lowrank

FORMS = ("auto", "plain", "dense")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def composed_kernel(seq: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W, bias)`` of the dense conv equal to the factorized layer ``seq``; differentiable."""
    return registry.get(seq.method).compose(seq)


def _composable(seq: LowRankConv) -> bool:
    """Exact as one conv with the layer's geometry (the method says; only the plain form)."""
    return seq.form == "plain" and registry.get(seq.method).composable(seq)


class _DenseForward:
    """The replacement ``forward``: one conv with the composed kernel and the layer's geometry."""

    def __init__(self, seq: LowRankConv) -> None:
        self.seq = seq

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.seq
        if seq.prefix is not None:  # a 'same'-padding conv pads before its conv
            x = seq.prefix(x)
        w, b = composed_kernel(seq)
        conv = _CONV[w.dim() - 2]
        if seq.padding_mode != "zeros":
            x = F.pad(x, seq._reversed_padding_repeated_twice, mode=seq.padding_mode)
            return conv(x, w, b, seq.stride, 0, seq.dilation, seq.groups)
        return conv(x, w, b, seq.stride, seq.padding, seq.dilation, seq.groups)


def wanted(seq: LowRankConv, form: str, device: torch.device) -> bool:
    """Whether ``form`` computes this layer densely: ``"dense"`` always (when exact),
    ``"auto"`` on CPU where the method says its chain trains slowly there (Network Decoupling
    at T >= 2: grouped convs), ``"plain"`` never."""
    if form == "plain" or not _composable(seq):
        return False
    return form == "dense" or (device.type == "cpu" and
                               registry.get(seq.method).slow_on_cpu(seq))


@contextmanager
def dense_training(model: nn.Module, form: str, device: torch.device) -> Iterator[int]:
    """Inside the block, the factorized layers ``form`` picks run as composed dense convs;
    yields how many. Parameters and state_dict keys do not change."""
    swapped = [m for m in model.modules() if is_lowrank(m) and wanted(m, form, device)]
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
