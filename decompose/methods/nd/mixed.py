"""Network Decoupling with both orders in one layer, registered as ``"nd-mixed"``.

A layer keeps ``T1`` depthwise-first terms and ``T2`` pointwise-first terms, summed: two
branches, ``dw_pw`` (``conv_dw`` with channel multiplier T1, then ``conv_pw``) and ``pw_dw``
(``conv_pw`` to ``C_out*T2`` channels, then ``conv_dw``), whose outputs add up. The pair is
found by block coordinate descent with exact blocks (:func:`decompose.kernels.nd.mixed`): no
closed form, but every step is optimal for its block, so the error is never above the better
single order at the same terms... at the same *number* of terms; the cost of a dw-pw and a
pw-dw term differ, and the planner compares options by cost. The rank is the pair
``(T1, T2)``; ``--rank T`` takes the best split of ``T`` with both parts >= 1 (T >= 2).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from ...kernels.nd import factorize, mixed, project
from ..base import Candidate, Method, bias_params, pixels
from ..convs import is_conv, taps
from ..module import LowRankConv
from ..registry import register
from . import costs, structural_skip
from .forms import compose_pair
from .layers import decouple_conv

NAME = "nd-mixed"


class SumOfBranches(nn.Module):
    """The sum of its children's outputs on the same input (no parameters of its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in self.children():
            y = branch(x)
            out = y if out is None else out + y
        return out


@register
class NDMixed(Method):
    name = NAME
    summary = "Network Decoupling with T1 depthwise-first and T2 pointwise-first terms summed"
    variants = ("",)
    custom_modules = (SumOfBranches,)

    #: sweeps of the alternating projections per (T1, T2) (docs/methods.md has the trade-off)
    iterations = 30

    def skip_reason(self, conv: nn.Module) -> str | None:
        return structural_skip(conv)

    def _full(self, conv: nn.Module) -> tuple[int, int]:
        k = taps(conv)
        return min(conv.out_channels // conv.groups, k), min(conv.in_channels // conv.groups, k)

    def _pairs(self, conv: nn.Module, call, ranks) -> list[tuple[int, int]]:
        r_dw, r_pw = self._full(conv)
        if ranks is not None:
            out = []
            for r in ranks:
                if r == "full":
                    out.append((r_dw, 0))
                elif isinstance(r, tuple):
                    out.append((min(r[0], r_dw), min(r[1], r_pw)))
                else:
                    out.append(("split", int(r)))
            return out
        before = conv.out_channels * (conv.in_channels // conv.groups) * taps(conv) * \
            pixels(call.out_shape)
        per_dw, per_pw = costs(conv, call, "dw-pw")[0], costs(conv, call, "pw-dw")[0]
        pairs = []
        for total in range(2, r_dw + r_pw + 1):
            for a in sorted({total // 2, (total + 1) // 2}):
                b = total - a
                if 1 <= a <= r_dw and 1 <= b <= r_pw and a * per_dw + b * per_pw < before:
                    pairs.append((a, b))
        return pairs

    def _fit(self, w: torch.Tensor, groups: int, a: int, b: int):
        w1, w2, err, _ = mixed(w, groups, a, b, iterations=self.iterations)
        return w1, w2, err

    def candidates(self, conv, call, *, ranks=None, variants=None, seed=0) -> list[Candidate]:
        w = conv.weight.detach().double()
        g = conv.groups
        fits: dict[tuple[int, int], tuple] = {}
        for p in self._pairs(conv, call, ranks):
            if p[0] == "split":  # --rank T: the best split with both parts >= 1
                total = max(p[1], 2)
                r_dw, r_pw = self._full(conv)
                best = None
                for a in range(1, total):
                    b = total - a
                    if a <= r_dw and 1 <= b <= r_pw:
                        fit = self._fit(w, g, a, b)
                        if best is None or fit[2] < best[1][2]:
                            best = ((a, b), fit)
                if best is None:  # too small to split: all terms in one order
                    a = min(total, r_dw)
                    best = ((a, 0), (project(w, g, "dw-pw", a), torch.zeros_like(w), 0.0))
                    best = (best[0], (*best[1][:2], float((w - best[1][0]).norm() / w.norm())))
                fits[best[0]] = best[1]
            elif p not in fits:
                a, b = p
                if b == 0 or a == 0:
                    w1 = project(w, g, "dw-pw", a) if a else torch.zeros_like(w)
                    w2 = project(w, g, "pw-dw", b) if b else torch.zeros_like(w)
                    fits[p] = (w1, w2, float((w - w1 - w2).norm() / w.norm()))
                else:
                    fits[p] = self._fit(w, g, a, b)
        pairs = sorted(fits, key=lambda p: self._macs(conv, call, p))
        b_params = bias_params(conv)
        per = {o: costs(conv, call, o) for o in ("dw-pw", "pw-dw")}
        return [Candidate(
            self.name, "", pairs, [fits[p][2] for p in pairs],
            [self._macs(conv, call, p) for p in pairs],
            [p[0] * per["dw-pw"][1] + p[1] * per["pw-dw"][1] + b_params for p in pairs],
            full_rank=(self._full(conv)[0], 0), state={"fits": fits})]

    def _macs(self, conv, call, pair) -> int:
        return pair[0] * costs(conv, call, "dw-pw")[0] + pair[1] * costs(conv, call, "pw-dw")[0]

    def build(self, conv, cand, i, form="plain") -> LowRankConv:
        a, b = cand.ranks[i]
        w1, w2, _ = cand.state["fits"][(a, b)]
        branches = OrderedDict()
        if a:
            ref = _like(conv, w1.to(conv.weight.dtype), conv.bias)
            branches["dw_pw"] = _sequential(decouple_conv(ref, a, "dw-pw",
                                                          factors=factorize(w1, conv.groups,
                                                                            "dw-pw")))
        if b:
            ref = _like(conv, w2.to(conv.weight.dtype), None if a else conv.bias)
            branches["pw_dw"] = _sequential(decouple_conv(ref, b, "pw-dw",
                                                          factors=factorize(w2, conv.groups,
                                                                            "pw-dw")))
        out = LowRankConv(OrderedDict(terms=SumOfBranches()), like=conv, method=self.name,
                          rank=(a, b))
        for k, v in branches.items():
            out.terms.add_module(k, v)
        out.train(conv.training)
        return out

    def compose(self, module: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = bias = None
        for name, seq in module.terms.named_children():
            order = "dw-pw" if name == "dw_pw" else "pw-dw"
            t = module.rank[0] if order == "dw-pw" else module.rank[1]
            w, b = compose_pair(seq.conv_dw, seq.conv_pw, order, t)
            weight = w if weight is None else weight + w
            if b is not None:
                bias = b if bias is None else bias + b
        return weight, bias

    def composable(self, module: LowRankConv) -> bool:
        pw_dw = getattr(module.terms, "pw_dw", None)
        return pw_dw is None or pw_dw.conv_pw.bias is None

    def unknowns(self, module: LowRankConv) -> int:
        cg = module.in_channels // module.groups
        return cg * math.prod(module.kernel_size) * max(1, module.rank[0])


def _like(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A conv with ``conv``'s geometry and the given weight and bias (what decouple_conv reads)."""
    if not is_conv(conv):
        raise TypeError(f"expected Conv1d/2d/3d, got {type(conv).__name__}")
    ref = type(conv).__new__(type(conv))
    ref.__dict__.update({k: v for k, v in conv.__dict__.items()
                         if k not in ("_parameters", "_buffers", "_modules")})
    ref._parameters, ref._buffers, ref._modules = OrderedDict(), OrderedDict(), OrderedDict()
    ref.weight = nn.Parameter(weight, requires_grad=False)
    ref.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return ref


def _sequential(layer: LowRankConv) -> nn.Sequential:
    """A decoupled layer's two convs as a bare Sequential (a branch, not a layer of its own)."""
    return nn.Sequential(OrderedDict(layer.named_children()))
