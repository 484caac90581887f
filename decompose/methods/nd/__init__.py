"""Network Decoupling (Guo et al., BMVC 2018), registered as ``"nd"``.

Every regular conv is split, with one SVD per channel, into ``T`` depthwise-separable terms: a
depthwise k x k conv with channel multiplier ``T`` and a 1 x 1 conv, in either order (variants
``"dw-pw"`` and ``"pw-dw"``). Keeping the first ``T`` terms is the best approximation of that
form (Eckart-Young), its error is known from the singular values before anything is built, and
``T = min(C_out/g, K)`` (dw-pw) or ``min(C_in/g, K)`` (pw-dw) is exact. The maths is in
:mod:`decompose.kernels.nd`, the module in :mod:`.layers`, exact faster forms in :mod:`.forms`
and the closed-form calibration solve in :mod:`.refit`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...kernels import lstsq
from ...kernels.nd import (
    ORDER_NAMES,
    energy_curve,
    error_curve,
    factorize,
    rebuild,
    singular_values,
)
from ...kernels.transposed import own_layout
from ..base import Candidate, Method, bias_params, pixels
from ..convs import taps, transposed, transposed_input_size
from ..module import LowRankConv
from ..registry import register
from . import forms, refit
from .forms import compose
from .layers import decouple_conv, is_decoupled, kernel


def costs(conv: nn.Module, call: Any, order: str) -> tuple[int, int]:
    """(MACs, params) per unit of rank T for one order, from the traced shapes."""
    c_in, c_out, g, k = conv.in_channels, conv.out_channels, conv.groups, taps(conv)
    out_px = pixels(call.out_shape)
    in_px = (pixels(call.in_shape) if len(call.in_shape) == len(call.out_shape) else
             math.prod(transposed_input_size(conv, call.out_shape[2:])))
    if transposed(conv):  # a transposed conv costs C_in * C_out/g * K per *input* position
        if order == "dw-pw":
            # depthwise transposed C_in -> C_in*T from the input, then 1x1 at the output size
            return (c_in * k * in_px + c_out * (c_in // g) * out_px,
                    c_in * k + c_out * (c_in // g))
        # 1x1 C_in -> C_out*T at the input size, then depthwise transposed C_out*T -> C_out
        return c_out * (c_in // g) * in_px + c_out * k * in_px, c_out * (c_in // g) + c_out * k
    if order == "dw-pw":
        # depthwise C_in -> C_in*T at the output size, then 1x1 C_in*T -> C_out (groups g)
        return c_in * k * out_px + c_out * (c_in // g) * out_px, c_in * k + c_out * (c_in // g)
    # 1x1 C_in -> C_out*T (groups g) at the input size, then k x k C_out*T -> C_out
    return c_out * (c_in // g) * in_px + c_out * k * out_px, c_out * (c_in // g) + c_out * k


def structural_skip(conv: nn.Module) -> str | None:
    """Why decoupling can never gain on this conv, or None."""
    if taps(conv) == 1:
        return "1x1 kernel: nothing to decouple"
    if conv.in_channels // conv.groups == 1 and conv.groups > 1:
        return "already depthwise"
    return None


@register
class NetworkDecoupling(Method):
    name = "nd"
    summary = "Network Decoupling: T depthwise-separable terms, one SVD per channel"
    variants = ORDER_NAMES
    has_energy = True
    form_names = ("plain", "dw1")
    custom_modules = (forms.RepeatChannels, forms.SumChannelGroups)
    supports_transposed = True

    def skip_reason(self, conv: nn.Module) -> str | None:
        return structural_skip(conv)

    def candidates(self, conv, call, *, ranks=None, variants=None, seed=0) -> list[Candidate]:
        out = []
        for order in variants or self.variants:
            s = singular_values(kernel(conv), conv.groups, order)
            full = int(s.shape[1])
            if ranks is None:
                rs = list(range(1, full + 1))
            else:
                rs = sorted({full if r == "full" else min(int(r), full) for r in ranks})
            err, energy = error_curve(s), energy_curve(s)
            macs, params = costs(conv, call, order)
            b = bias_params(conv)
            out.append(Candidate(
                self.name, order, rs, [float(err[t - 1]) for t in rs], [macs * t for t in rs],
                [params * t + b for t in rs], [float(energy[t - 1]) for t in rs],
                full_rank=full, state={"s": s}))
        return out

    def rank_for_energy(self, cand: Candidate, energy: float) -> int:
        """The fewest terms whose kept energy reaches ``energy`` (a 1e-9 tolerance for 1)."""
        curve = energy_curve(cand.state["s"])
        hits = (curve >= energy - 1e-9).nonzero()
        return int(hits[0]) + 1 if len(hits) else int(curve.numel())

    def factors(self, conv: nn.Module, cand: Candidate):
        f = cand.state.get("factors")
        if f is None:
            f = cand.state["factors"] = factorize(kernel(conv), conv.groups, cand.variant)
        return f

    def approx_kernel(self, conv, cand, i) -> torch.Tensor:
        f = factorize(kernel(conv).detach().double(), conv.groups, cand.variant)
        return own_layout(rebuild(f, cand.ranks[i]), conv.groups, transposed(conv))

    def build(self, conv, cand, i, form="plain") -> LowRankConv:
        seq = decouple_conv(conv, cand.ranks[i], cand.variant, factors=self.factors(conv, cand))
        return seq if form == "plain" else forms.fast_form(seq, form)

    def compose(self, module: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
        return compose(module)

    def forms(self, module: LowRankConv) -> tuple[str, ...]:
        if module.rank == 1 or module.transposed:  # no dw1 / dense form of a transposed layer
            return ("plain",)
        return self.form_names

    def to_form(self, module: LowRankConv, form: str) -> LowRankConv:
        if form == module.form:
            return module
        if module.transposed:
            raise ValueError(f"a decoupled transposed conv has only the plain form, not {form!r}")
        return forms.to_plain(module) if form == "plain" else forms.fast_form(module, form)

    def auto_form(self, module: LowRankConv) -> str | None:
        if module.transposed:
            return "plain"
        f = forms.auto_form(module)
        return None if f == "dense" else f

    def auto_note(self, module: LowRankConv) -> str:
        return (f"estimated speed-up {forms.estimated_speedup(module):.2f} <= "
                f"{forms.AUTO_MARGIN}; the dense conv is as fast")

    def composable(self, module: LowRankConv) -> bool:
        if module.transposed:  # fine-tuning's dense form runs regular convs only
            return False
        plain = forms.to_plain(module)
        pw = plain.conv_pw
        return not (module.variant == "pw-dw" and pw.bias is not None) and all(
            k == 1 for k in pw.kernel_size) and all(s == 1 for s in pw.stride) and all(
            p == 0 for p in forms._tuple(pw.padding))

    def slow_on_cpu(self, module: LowRankConv) -> bool:
        return module.rank >= 2  # oneDNN runs multiplier-T depthwise convs as grouped convs

    def unknowns(self, module: LowRankConv) -> int:
        cg = module.in_channels // module.groups
        k = math.prod(module.kernel_size)
        return max(cg * k, cg * k * (module.rank if module.variant == "dw-pw" else 1))

    def refit(self, module, moments, *, ridge, iterations, add_bias):
        order = module.variant
        first, second, bias = refit.read_factors(module, order)
        if bias is None and add_bias:
            bias = torch.zeros(second.shape[:2] if order == "dw-pw" else first.shape[:2],
                               dtype=torch.float64, device=first.device)
        w = refit.composed_weight(order, first, second)
        before = float(lstsq.objective(lstsq.with_bias(w, bias), moments).sum())
        first, second, bias, after = refit.refit_factors(
            moments, order, first, second, bias, ridge=ridge, iterations=iterations)
        if after <= before:
            refit.write_factors(module, order, first, second, bias)
        return before, min(before, after)


__all__ = ["NetworkDecoupling", "costs", "decouple_conv", "is_decoupled", "structural_skip"]


from . import mixed  # noqa: E402,F401  registers "nd-mixed" (it builds on this method)  isort: skip
