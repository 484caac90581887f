"""Data-aware rank allocation: how much each layer's *output* suffers at each rank.

The budgets (``target_macs``, ``target_params``, ``target_latency``) spread ranks to minimise a
sum over layers of squared errors. By default that error is the relative kernel error
``||W - W_T|| / ||W||``, which needs no data but weighs every direction of the kernel alike.
What the next layer sees is the output ``conv(x, W_T)``, and real inputs are far from white:
a kernel direction the inputs never excite costs nothing. With calibration images,
:func:`output_error_curves` measures instead, for every conv and every option the planner would
offer it (each method, variant and rank: the candidates of :mod:`decompose.methods`),

    e = || conv(x, W - W_hat) || / || conv(x, W) ||      (bias excluded)

over all images and output positions, with ``x`` the input the conv receives in the original
network, and the budget minimises ``sum e(T)^2`` (``DecomposeConfig(allocation="output")``,
``--allocate output``). Every conv type the engine accepts is handled the same way: the
residual kernel runs through the conv's own operation (:func:`decompose.methods.convs.run_conv`:
stride, dilation, groups, padding modes; a transposed conv's output_padding). Memory is bounded by one batch: sums of squares are accumulated in forward
hooks, nothing is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import methods as registry
from ..config import DecomposeConfig
from ..engine.trace import Call
from ..errors import DecomposeError
from ..methods.base import Candidate
from ..methods.convs import conv_prefix, is_factorizable, run_conv, transposed
from .plan import _key, decomposed_parts, layer_candidates, layer_skip, method_skip, selected

#: name -> candidate label -> rank key -> relative output error
ErrorCurves = dict[str, dict[str, dict[str, float]]]


class _Accumulator:
    """Sums of squared output errors of every option of one conv. The options are made on the
    conv's first call, from the shapes it sees (so no extra forward pass is needed)."""

    def __init__(self, conv: nn.Module, make: Callable[[Call], list[Candidate]]) -> None:
        self.conv, self.make = conv, make
        self.res: dict[str, torch.Tensor] | None = None

    def _start(self, x: torch.Tensor, y: torch.Tensor) -> None:
        conv = self.conv
        cands = self.make(Call((1, *x.shape[1:]), (1, *y.shape[1:])))
        self.keys: dict[str, list[str]] = {}
        self.res: dict[str, torch.Tensor] = {}
        self.exact: dict[str, list[str]] = {}
        w = conv.weight.detach()
        for c in cands:
            method = registry.get(c.method)
            todo = [i for i in range(len(c)) if not c.exact(i)]
            self.exact[c.label] = [_key(c.ranks[i]) for i in range(len(c)) if c.exact(i)]
            self.keys[c.label] = [_key(c.ranks[i]) for i in todo]
            self.res[c.label] = (torch.stack([
                (w.double() - method.approx_kernel(conv, c, i).double()).to(w.dtype)
                for i in todo]) if todo else w.new_zeros((0, *w.shape)))
        self.err = {k: torch.zeros(len(r), dtype=torch.float64) for k, r in self.res.items()}
        self.ref = 0.0

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        x = inputs[0].detach()
        _, prefix = conv_prefix(self.conv)
        if prefix is not None:  # a 'same'-padding conv pads before its conv
            x = prefix(x)
        with torch.no_grad():
            y = run_conv(self.conv, x, self.conv.weight, None)
            if self.res is None:
                self._start(x, y)
            self.ref += float(y.double().pow(2).sum())
            for k, res in self.res.items():
                if not len(res):
                    continue
                if self.conv.groups == 1:  # all options in one conv: residuals stacked on C_out
                    n = res.shape[0]
                    if transposed(self.conv):  # (n, C_in, C_out, *k) -> (C_in, n*C_out, *k)
                        c_out = res.shape[2]
                        stacked = res.transpose(0, 1).reshape(res.shape[1], n * c_out,
                                                               *res.shape[3:])
                    else:
                        c_out = res.shape[1]
                        stacked = res.reshape(n * c_out, *res.shape[2:])
                    z = run_conv(self.conv, x, stacked, None)
                    sq = z.double().pow(2).unflatten(1, (n, c_out)).transpose(0, 1)
                    self.err[k] += sq.reshape(n, -1).sum(1)
                else:
                    for i, r in enumerate(res):
                        self.err[k][i] += float(run_conv(self.conv, x, r, None).double()
                                                .pow(2).sum())

    def curves(self) -> dict[str, dict[str, float]]:
        if self.res is None:
            return {}
        out = {}
        for k, e in self.err.items():
            rel = (e / self.ref).sqrt() if self.ref > 0 else torch.zeros_like(e)
            out[k] = {**dict(zip(self.keys[k], rel.tolist())),
                      **{r: 0.0 for r in self.exact[k]}}
        return out


def output_error_curves(model: nn.Module, batches: Iterable[Any], *,
                        config: DecomposeConfig | None = None, samples: int = 128
                        ) -> ErrorCurves:
    """Relative output error of every factorizable conv of ``model`` at every option.

    Args:
        model: the original model (not changed; run in eval mode, no gradients).
        batches: input batches (tensors, or ``(inputs, labels)`` pairs; labels ignored), e.g.
            :func:`decompose.data.calibration_batches`.
        config: its methods, orders, ``include``/``exclude`` and ``seed`` decide which convs
            and options are measured. Default: Network Decoupling, both orders, every conv.
        samples: images used (the first ones). Default 128.

    Returns ``{conv name: {candidate label: {rank: e}}}`` (exact options have ``e = 0``), for
    :func:`decompose.plan` / :func:`decompose.decompose_` (``error_curves=``).
    """
    if samples < 1:
        raise DecomposeError(f"samples must be at least 1, got {samples}")
    config = config or DecomposeConfig()
    methods = [registry.get(n) for n in config.methods]
    accs: dict[str, _Accumulator] = {}
    hooks = []
    parts = decomposed_parts(model)
    for name, m in model.named_modules():
        if not is_factorizable(m) or name in parts or layer_skip(m) is not None:
            continue
        usable, why = method_skip(m, methods)
        if why is not None or selected(name, m, config, None) is not None:
            continue
        accs[name] = _Accumulator(m, partial(layer_candidates, name, m, config=config,
                                             methods=usable, budgeted=True))
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
    return {name: a.curves() for name, a in accs.items() if a.res is not None}


__all__ = ["ErrorCurves", "output_error_curves"]
