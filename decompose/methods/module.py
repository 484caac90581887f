"""The layer every method builds: a chain of standard convs that stands in for one conv.

:class:`LowRankConv` is an ``nn.Sequential`` of ``torch.nn`` convs (plus, for some exact faster
forms, a parameter-free helper of the method's), so ``torch.save``, the weights-only loader
(with the class allowlisted), TorchScript, ONNX and ``torch.export`` all work on it. It is also a
drop-in for the conv it replaced: it carries that conv's geometry (``in_channels``,
``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``groups``,
``padding_mode``), and ``weight`` / ``bias`` are the *effective* kernel and bias, the dense conv
that computes exactly what the chain computes (composed by the method, differentiably). Code
around a model that reads ``conv.stride[0]`` or ``conv.weight.dtype`` keeps working.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .convs import GEOMETRY


class LowRankConv(nn.Sequential):
    """A conv computed as a chain of smaller convs (the parts of one factorization).

    Args:
        parts: the chain, in forward order, by name (e.g. ``conv_dw``, ``conv_pw``).
        like: the conv it replaces; its geometry is copied (not its weights).
        method: the registry name of the method that built it (``"nd"``, ``"cp"``, ...).
        variant: the method's variant (ND: ``"dw-pw"`` or ``"pw-dw"``; ``""`` when it has none).
        rank: the method's rank (an int, or a tuple for methods with several).
        form: the method's name for how the chain is laid out (``"plain"`` unless a faster
            exact form was chosen).
    """

    #: TorchScript compiles properties unless told not to; these are for Python callers.
    __jit_unused_properties__ = ["weight", "bias", "prefix"]

    def __init__(self, parts: OrderedDict[str, nn.Module], *, like: Any, method: str,
                 variant: str = "", rank: Any = 1, form: str = "plain") -> None:
        super().__init__(parts)
        for name in GEOMETRY:
            value = getattr(like, name, None)
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        if self.transposed is None:
            self.transposed = False
        pad = getattr(like, "_reversed_padding_repeated_twice", None)
        self._reversed_padding_repeated_twice = list(pad) if pad is not None else None
        self.method = str(method)
        self.variant = str(variant)
        self.rank = tuple(rank) if isinstance(rank, (list, tuple)) else int(rank)
        self.form = str(form)

    # ---------------------------------------------------------------- the effective conv
    def compose(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` of the dense conv equal to this chain; differentiable."""
        from .registry import get
        return get(self.method).compose(self)

    def _cached(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if torch.compiler.is_compiling() or torch.is_grad_enabled() and any(
                p.requires_grad for p in self.parameters()):
            return self.compose()
        key = tuple((id(p), p._version) for p in self.parameters())
        hit = self.__dict__.get("_composed")
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, self.compose())
            self.__dict__["_composed"] = hit
        return hit[1]

    @property
    def weight(self) -> torch.Tensor:
        """The effective kernel ``(C_out, C_in/groups, *kernel_size)``, as the conv's weight."""
        return self._cached()[0]

    @property
    def bias(self) -> torch.Tensor | None:
        """The effective bias (None when the conv had none)."""
        return self._cached()[1]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_composed", None)  # a cache: never pickled
        return state

    @property
    def prefix(self) -> nn.Module | None:
        """The padding module applied before the factors (a 'same'-padding conv subclass's), or
        None."""
        return self._modules.get("pad")

    def extra_repr(self) -> str:
        v = f", variant={self.variant}" if self.variant else ""
        return f"method={self.method}{v}, rank={self.rank}, form={self.form}"


def with_prefix(layer: LowRankConv, prefix: nn.Module | None) -> LowRankConv:
    """``layer`` with ``prefix`` (a padding module) as its first part, named ``pad``, or without
    any when ``prefix`` is None: a new LowRankConv sharing the parts."""
    parts = OrderedDict() if prefix is None else OrderedDict(pad=prefix)
    parts.update((k, v) for k, v in layer._modules.items() if k != "pad")
    out = LowRankConv(parts, like=layer, method=layer.method, variant=layer.variant,
                      rank=layer.rank, form=layer.form)
    out.train(layer.training)
    return out


def is_lowrank(m: nn.Module) -> bool:
    """True for a layer built by a decompose method (any method, any form)."""
    return isinstance(m, LowRankConv)
