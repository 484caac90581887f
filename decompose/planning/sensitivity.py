"""Data-aware rank allocation: how much each layer's *output* suffers at each rank.

The budgets (``target_macs``, ``target_params``, ``target_latency``) spread ranks to minimise a
sum over layers of squared errors. By default that error is the relative kernel error
``||W - W_T|| / ||W||``, which needs no data but weighs every direction of the kernel alike.
What the next layer sees is the output ``conv(x, W_T)``, and real inputs are far from white:
a kernel direction the inputs never excite costs nothing. With calibration images,
:func:`output_error_curves` measures instead, for every conv, order and rank T,

    e(T) = || conv(x, W - W_T) || / || conv(x, W) ||      (bias excluded)

over all images and output positions, with ``x`` the input the conv receives in the original
network, and the budget minimises ``sum e(T)^2`` (``DecoupleConfig(allocation="output")``,
``--allocate output``). Every conv type the engine accepts is handled the same way: the
residual kernel runs through the conv's own ``_conv_forward`` (stride, dilation, groups,
padding modes). Memory is bounded by one batch: sums of squares are accumulated in forward
hooks, nothing is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import DecoupleConfig
from ..errors import DecomposeError
from ..methods.nd.kernel import ORDER_NAMES, factorize, rebuild
from ..methods.nd.layers import is_conv
from .plan import selected, structural_skip

#: name -> order -> relative output error at T = 1..full rank
ErrorCurves = dict[str, dict[str, list[float]]]


def _residuals(conv: nn.Module, order: str) -> torch.Tensor:
    """``W - W_T`` for T = 1..r-1, stacked on a new leading dim (T = r is exact)."""
    w = conv.weight.detach()
    f = factorize(w.double(), conv.groups, order)
    return torch.stack([(w.double() - rebuild(f, t)).to(w.dtype) for t in range(1, f.max_rank)]) \
        if f.max_rank > 1 else w.new_zeros((0, *w.shape))


class _Accumulator:
    def __init__(self, conv: nn.Module, orders: tuple[str, ...]) -> None:
        self.conv = conv
        self.res = {o: _residuals(conv, o) for o in orders}
        self.err = {o: torch.zeros(len(r), dtype=torch.float64) for o, r in self.res.items()}
        self.ref = 0.0

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0].detach()
        with torch.no_grad():
            y = self.conv._conv_forward(x, self.conv.weight, None)
            self.ref += float(y.double().pow(2).sum())
            for o, res in self.res.items():
                if not len(res):
                    continue
                if self.conv.groups == 1:  # all ranks in one conv: residuals stacked on C_out
                    n, c_out = res.shape[:2]
                    z = self.conv._conv_forward(x, res.reshape(n * c_out, *res.shape[2:]), None)
                    sq = z.double().pow(2).unflatten(1, (n, c_out)).transpose(0, 1)
                    self.err[o] += sq.reshape(n, -1).sum(1)
                else:
                    for i, r in enumerate(res):
                        self.err[o][i] += float(self.conv._conv_forward(x, r, None).double()
                                                .pow(2).sum())

    def curves(self) -> dict[str, list[float]]:
        out = {}
        for o, e in self.err.items():
            rel = (e / self.ref).sqrt() if self.ref > 0 else torch.zeros_like(e)
            out[o] = rel.tolist() + [0.0]
        return out


def output_error_curves(model: nn.Module, batches: Iterable[Any], *,
                        config: DecoupleConfig | None = None, samples: int = 128,
                        orders: tuple[str, ...] = ORDER_NAMES) -> ErrorCurves:
    """Relative output error of every decouplable conv of ``model`` at every order and rank.

    Args:
        model: the original model (not changed; run in eval mode, no gradients).
        batches: input batches (tensors, or ``(inputs, labels)`` pairs; labels ignored), e.g.
            :func:`decompose.data.calibration_batches`.
        config: only convs its ``include``/``exclude`` select are measured. Default: all.
        samples: images used (the first ones). Default 128.
        orders: which orders to measure. Default both.

    Returns ``{conv name: {order: [e(1), ..., e(r)]}}`` with ``e(r) = 0`` (full rank is exact),
    for :func:`decompose.plan` / :func:`decompose.decompose_` (``error_curves=``).
    """
    if samples < 1:
        raise DecomposeError(f"samples must be at least 1, got {samples}")
    config = config or DecoupleConfig()
    accs: dict[str, _Accumulator] = {}
    hooks = []
    for name, m in model.named_modules():
        if is_conv(m) and structural_skip(m) is None and selected(name, m, config, None) is None:
            accs[name] = _Accumulator(m, orders)
            hooks.append(m.register_forward_hook(accs[name]))
    was = model.training
    model.eval()
    seen = 0
    p = next(model.parameters(), None)
    try:
        with torch.no_grad():
            for b in batches:
                x = b[0] if isinstance(b, (tuple, list)) else b
                x = x[: samples - seen]
                if p is not None:
                    x = x.to(device=p.device, dtype=p.dtype)
                model(x)
                seen += len(x)
                if seen >= samples:
                    break
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if seen == 0:
        raise DecomposeError("the calibration data gave no images; point --calibrate at a "
                             "folder (or .npz) holding images")
    return {name: a.curves() for name, a in accs.items()}


__all__ = ["ErrorCurves", "output_error_curves"]
