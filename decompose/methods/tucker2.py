"""Tucker-2 (Kim et al. 2016), registered as ``"tucker2"``.

A conv becomes three standard convs, all with ``groups = g``: ``conv_in`` 1x1 ``C_in -> g*R_in``,
``conv_core`` k x k ``g*R_in -> g*R_out`` with the original stride, padding, dilation and padding
mode, and ``conv_out`` 1x1 ``g*R_out -> C_out`` with the bias. The factors come from the HOSVD
of each group's ``(C_out/g, C_in/g, K)`` kernel on its two channel modes, optionally refined by
HOOI (:mod:`decompose.kernels.tucker`). The bias-free 1x1 ``conv_in`` commutes with every
padding mode, so the chain is exact at the full ranks for every geometry.

Ranks are pairs ``(R_in, R_out)`` (in forward order, the same in every group; reports write
``R_inxR_out``):

* ``rank=T`` means ``(min(T, R_in_max), min(T, R_out_max))``; ``rank="full"`` the exact pair
  ``(R_in_max, R_out_max) = (min(C_in/g, C_out/g*K), min(C_out/g, C_in/g*K))``, which is
  ``(C_in/g, C_out/g)`` for every kernel with more than one tap;
* budgets get a menu of pairs: every pair cheaper than the original in multiply-adds or in
  parameters is scored from one HOSVD (``err^2 = ||W||^2 - ||core[:R_out, :R_in]||^2``), the
  pairs on the cost/error Pareto front (by MACs, and by parameters) are kept, thinned to about
  ``menu_size`` each (evenly in cost and in error), then the full pair is appended;
* ``energy=E``: the cheapest pair on that menu whose kept energy ``||core||^2 / ||W||^2``
  (``= 1 - error^2``: the fraction of the kernel's squared norm the projection keeps) reaches
  E; when only the full pair does and it is not cheaper, the layer stays original.

Left alone: 1x1 kernels (three 1x1 convs are a low-rank 1x1 that channel-svd builds cheaper and
optimally) and depthwise convs with one output per group.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..kernels import tucker as K
from ._lowrank import factor_geometry, original_costs, pareto_indices, thin
from .base import Candidate, Method, Rank, bias_params, pixels
from .convs import conv_dim, is_conv, new_conv
from .module import LowRankConv
from .registry import register

PARTS = ("conv_in", "conv_core", "conv_out")


def costs(conv: nn.Module, call: Any, r_in: torch.Tensor | int, r_out: torch.Tensor | int
          ) -> tuple[Any, Any]:
    """(MACs, params) of the chain at ranks ``(r_in, r_out)`` (ints or broadcasting tensors),
    from the traced shapes: ``conv_in`` runs at the input size, the others at the output's."""
    g, ci, k = conv.groups, conv.in_channels // conv.groups, math.prod(conv.kernel_size)
    px_in, px_out = pixels(call.in_shape), pixels(call.out_shape)
    c_out = conv.out_channels
    macs = g * r_in * ci * px_in + g * r_out * r_in * k * px_out + c_out * r_out * px_out
    params = g * r_in * ci + g * r_out * r_in * k + c_out * r_out + bias_params(conv)
    return macs, params


@register
class Tucker2(Method):
    """Tucker-2 as a registered method.

    Args:
        hooi_iterations: HOOI sweeps refining every offered pair below the full ranks (default
            0: the truncated HOSVD, whose errors for every pair come from one decomposition;
            ``N > 0`` runs up to N sweeps per pair, stopping when a sweep gains less than
            1e-8; the reported errors are then the refined ones). Register an instance to
            change it: ``methods.register(Tucker2(hooi_iterations=10))``.
        menu_size: about how many Pareto-optimal pairs per cost (MACs, parameters) a budget
            is offered (default 32, at least 2).
    """

    name = "tucker2"
    summary = "Tucker-2 (Kim et al. 2016): 1x1 to R_in, k x k to R_out, 1x1 out; HOSVD"
    has_energy = True

    def __init__(self, hooi_iterations: int = 0, menu_size: int = 32) -> None:
        if int(hooi_iterations) < 0 or int(menu_size) < 2:
            raise ValueError("tucker2 needs hooi_iterations >= 0 and menu_size >= 2, got "
                             f"{hooi_iterations} and {menu_size}")
        self.hooi_iterations = int(hooi_iterations)
        self.menu_size = int(menu_size)

    def skip_reason(self, conv: nn.Module) -> str | None:
        if math.prod(conv.kernel_size) == 1:
            return ("1x1 kernel: Tucker-2 would be three 1x1 convs, a low-rank 1x1 that "
                    "channel-svd builds cheaper")
        if conv.in_channels // conv.groups == 1 and conv.out_channels // conv.groups == 1:
            return "depthwise conv: one filter per group, no channel mode to compress"
        return None

    # ---------------------------------------------------------------- ranks
    def fixed_rank(self, rank: Rank, full: tuple[int, int]) -> tuple[int, int]:
        """``"full"``, an int T (both ranks T) or a pair, capped at the full ranks."""
        if rank == "full":
            return full
        pair = tuple(rank) if isinstance(rank, (tuple, list)) else (rank, rank)
        if len(pair) != 2 or any(isinstance(r, bool) or int(r) < 1 for r in pair):
            raise ValueError(f"tucker2: a rank is an integer >= 1, a pair of them or 'full', "
                             f"got {rank!r}")
        return min(int(pair[0]), full[0]), min(int(pair[1]), full[1])

    def menu(self, conv: nn.Module, call: Any, table: torch.Tensor) -> list[tuple[int, int]]:
        """The budget's pairs (see the module docstring), by increasing MACs."""
        full = (int(table.shape[0]), int(table.shape[1]))
        r_in = torch.arange(1, full[0] + 1, dtype=torch.int64)[:, None]
        r_out = torch.arange(1, full[1] + 1, dtype=torch.int64)[None, :]
        macs, params = costs(conv, call, r_in, r_out)
        macs0, params0 = original_costs(conv, call)
        ok = ((macs < macs0) | (params < params0)).flatten().nonzero().flatten()
        err = table.flatten()[ok]
        keep: set[int] = set()
        for cost, cost0 in ((macs.flatten()[ok], macs0), (params.flatten()[ok], params0)):
            front = pareto_indices(cost, err)
            keep.update(thin(front, cost, err, self.menu_size, cost0))
        flat = sorted((int(ok[j]) for j in keep),
                      key=lambda j: (int(macs.flatten()[j]), int(params.flatten()[j])))
        pairs = [(j // full[1] + 1, j % full[1] + 1) for j in flat]
        return pairs + ([full] if full not in pairs else [])

    # ---------------------------------------------------------------- the protocol
    def candidates(self, conv, call, *, ranks=None, variants=None, seed=0) -> list[Candidate]:
        f = K.hosvd(conv.weight, conv.groups)
        table = K.error_table(f)
        full = f.ranks
        if ranks is None:
            pairs = self.menu(conv, call, table)
        else:
            pairs = sorted({self.fixed_rank(r, full) for r in ranks})
        errors = [float(table[a - 1, b - 1]) for a, b in pairs]
        refined: dict[tuple[int, int], K.TuckerFactors] = {}
        if self.hooi_iterations:
            for j, p in enumerate(pairs):
                if p != full:
                    refined[p] = K.hooi(conv.weight, p, conv.groups, start=f,
                                        iterations=self.hooi_iterations)
                    errors[j] = K.error(refined[p])
        c = [costs(conv, call, a, b) for a, b in pairs]
        return [Candidate(self.name, "", pairs, errors, [int(m) for m, _ in c],
                          [int(p) for _, p in c], [1.0 - e * e for e in errors],
                          full_rank=full, state={"hosvd": f, "hooi": refined})]

    def factors(self, conv: nn.Module, cand: Candidate, i: int) -> K.TuckerFactors:
        """The factors of option ``i`` (refined by HOOI when the candidate was)."""
        rank = tuple(cand.ranks[i])
        hit = cand.state["hooi"].get(rank)
        if hit is not None:
            return hit
        f = cand.state.get("hosvd")
        if f is None:
            f = cand.state["hosvd"] = K.hosvd(conv.weight, conv.groups)
        return K.truncate(f, rank)

    def approx_kernel(self, conv, cand, i) -> torch.Tensor:
        return K.rebuild(self.factors(conv, cand, i))

    def build(self, conv, cand, i, form="plain") -> LowRankConv:
        if not is_conv(conv):
            raise TypeError(f"expected Conv1d/2d/3d, got {type(conv).__name__}")
        f = self.factors(conv, cand, i)
        r_in, r_out = f.ranks
        w_in, w_core, w_out = K.factor_weights(f)
        g, n = conv.groups, conv_dim(conv)
        ones = (1,) * n
        bias = conv.bias.detach() if conv.bias is not None else None
        parts = OrderedDict([
            ("conv_in", new_conv(conv, conv.in_channels, g * r_in, ones, groups=g, weight=w_in)),
            ("conv_core", new_conv(conv, g * r_in, g * r_out, conv.kernel_size, groups=g,
                                   weight=w_core, **factor_geometry(conv, tuple(range(n)),
                                                                    conv.kernel_size))),
            ("conv_out", new_conv(conv, g * r_out, conv.out_channels, ones, groups=g,
                                  bias=bias is not None, weight=w_out, bias_value=bias)),
        ])
        out = LowRankConv(parts, like=conv, method=self.name, rank=(r_in, r_out))
        out.train(conv.training)
        return out

    def compose(self, module: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = K.compose(module.conv_in.weight, module.conv_core.weight, module.conv_out.weight,
                      module.groups, tuple(module.kernel_size))
        return w, module.conv_out.bias


__all__ = ["PARTS", "Tucker2", "costs"]
