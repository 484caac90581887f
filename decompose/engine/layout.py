"""Memory layout of a whole model: channels_last(_3d) weights make PyTorch run its convs in that
layout even on NCHW input, which is what makes depthwise convs fast on CPU (docs/layouts.md)."""

from __future__ import annotations

import torch
from torch import nn

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _is_cl(t: torch.Tensor) -> bool:
    """``t`` has exactly the channels_last(_3d) strides, and they differ from contiguous ones
    (a depthwise ``(C, 1, k, k)`` weight counts: its strides tell, not ``is_contiguous``)."""
    fmt = _FORMATS.get(t.dim())
    if fmt is None:
        return False
    want = torch.empty(t.shape, device="meta").contiguous(memory_format=fmt).stride()
    return t.stride() == want and want != torch.empty(t.shape, device="meta").stride()


def is_channels_last(model: nn.Module) -> bool:
    """True when some 4-D (5-D) parameter of ``model`` is laid out channels_last(_3d)."""
    return any(_is_cl(p) for p in model.parameters())


def to_channels_last_(model: nn.Module) -> int:
    """Lay every 4-D parameter and buffer out channels_last and every 5-D one channels_last_3d,
    in place; returns how many tensors changed. PyTorch runs a conv in channels_last when its
    weight is (even on an NCHW input), and a saved model keeps the strides, so this decides
    the layout a whole network computes in (docs/layouts.md). Values are unchanged."""
    changed = 0
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for t in store.values():
                if t is None or t.dim() not in _FORMATS or _is_cl(t):
                    continue
                new = t.data.contiguous(memory_format=_FORMATS[t.dim()])
                if new.stride() != t.stride():
                    t.data = new
                    changed += 1
    return changed
