"""The method protocol: what a factorization must tell the planner, and build for it.

A method is a small object registered by name (:func:`decompose.methods.register`). For one
conv it answers four questions, and the planner, budgets, calibration, forms, reports, export
and the CLI ask nothing else:

1. :meth:`Method.skip_reason` -- can it factor this conv at all, and if not, why;
2. :meth:`Method.candidates` -- for each of its variants, the ranks it offers, with the
   relative kernel error, multiply-adds and parameters at each (a :class:`Candidate`);
3. :meth:`Method.build` -- the :class:`~decompose.methods.module.LowRankConv` for one
   candidate and rank (only ``torch.nn`` convs inside);
4. :meth:`Method.compose` -- the dense kernel and bias the built chain computes
   (differentiable): the layer's effective ``weight``, the check of exactness, the generic
   calibration refit and the composed-kernel training form all come from it.

Optional hooks have defaults that serve every method: :meth:`Method.forms` /
:meth:`Method.to_form` (exact faster layouts of a built layer), :meth:`Method.auto_form` (the
untimed choice among them), :meth:`Method.refit` (a method's own calibration solve; the default
is the generic joint least-squares fit of :mod:`decompose.recover.calibrate`) and
:meth:`Method.composable` (whether computing the layer as one dense conv is exact).

docs/architecture.md has a worked example of adding a method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .convs import taps

if TYPE_CHECKING:  # the module imports the registry, which imports this file
    from .module import LowRankConv

#: A method's rank: an int, or a tuple for methods with several (e.g. Tucker-2's two).
Rank = Any


@dataclass
class Candidate:
    """One variant of one method on one conv: the ranks it offers and what each costs and keeps.

    Lists are parallel and indexed by *option* ``i`` (``ranks[i]`` and its ``errors[i]``,
    ``macs[i]``, ``params[i]``), in increasing cost. ``errors`` are relative kernel errors
    ``||W - W_hat||_F / ||W||_F``; ``energies`` the kept fraction of squared singular values
    where the method has one (else None); ``macs`` the multiply-adds of one call at batch 1,
    ``params`` the parameters of the built layer (bias included). ``full_rank`` is the rank
    that reproduces the kernel (None when the method has none), offered or not. ``output_errors`` are measured
    relative output errors per option (``allocation="output"``). ``state`` is the method's own
    (singular vectors, fitted factors, ...), reused by :meth:`Method.build`.
    """

    method: str
    variant: str
    ranks: list[Rank]
    errors: list[float]
    macs: list[int]
    params: list[int]
    energies: list[float] | None = None
    full_rank: Rank | None = None
    output_errors: list[float] | None = None
    state: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``method`` or ``method/variant``: the key of this candidate in curves and timings."""
        return f"{self.method}/{self.variant}" if self.variant else self.method

    def __len__(self) -> int:
        return len(self.ranks)

    def alloc_error(self, i: int) -> float:
        """The error a budget minimises at option ``i``: measured output error when known,
        else the relative kernel error."""
        return (self.output_errors if self.output_errors is not None else self.errors)[i]

    def index(self, rank: Rank) -> int:
        """The option of ``rank`` (a rank the candidate was asked for)."""
        return self.ranks.index(rank)

    @property
    def max_rank(self) -> Rank:
        """The exact rank when the method has one, else the largest rank offered."""
        return self.full_rank if self.full_rank is not None else self.ranks[-1]

    def exact(self, i: int) -> bool:
        """Whether option ``i`` reproduces the kernel."""
        return self.full_rank is not None and self.ranks[i] == self.full_rank


class Method:
    """Base class of a registered factorization; subclasses override what they need.

    Class attributes:
        name: the registry key (what ``--method`` takes).
        summary: one line for ``--help`` and docs.
        variants: the variants it can offer (``("",)`` for none).
        has_energy: whether its candidates carry ``energies`` (the ``energy`` rank rule).
        form_names: its forms, the plain one first.
        custom_modules: non-``torch.nn`` classes its layers may contain (for the safe loader).
        in_auto: whether ``--method auto`` considers it.
        supports_transposed: whether it factors transposed convs (``ConvTranspose1d/2d/3d``);
            the planner skips them, with the reason, for a method that does not
            (:func:`decompose.methods.skip_reason`).
    """

    name: str = ""
    summary: str = ""
    variants: tuple[str, ...] = ("",)
    has_energy: bool = False
    form_names: tuple[str, ...] = ("plain",)
    custom_modules: tuple[type[nn.Module], ...] = ()
    in_auto: bool = True
    supports_transposed: bool = False

    # ---------------------------------------------------------------- required
    def skip_reason(self, conv: nn.Module) -> str | None:
        """Why this method cannot (or need not) factor ``conv``; None when it can."""
        return None

    def candidates(self, conv: nn.Module, call: Any, *, ranks: list[Rank] | None = None,
                   variants: tuple[str, ...] | None = None, seed: int = 0) -> list[Candidate]:
        """The method's candidates for ``conv`` as called in ``call`` (its traced in/out shapes).

        ``ranks``: only these ranks (capped at the exact rank where there is one; ``"full"``
        means the exact rank); None: the method's whole menu for budgets. ``variants``: only
        these (None: all). ``seed`` makes iterative methods reproducible."""
        raise NotImplementedError

    def build(self, conv: nn.Module, cand: Candidate, i: int, form: str = "plain"
              ) -> LowRankConv:
        """The layer of option ``i`` of ``cand``, in ``form``, in ``conv``'s dtype and device."""
        raise NotImplementedError

    def compose(self, module: LowRankConv) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` of the dense conv equal to ``module``; differentiable."""
        raise NotImplementedError

    # ---------------------------------------------------------------- optional
    def approx_kernel(self, conv: nn.Module, cand: Candidate, i: int) -> torch.Tensor:
        """The dense kernel option ``i`` of ``cand`` computes (no gradients). Default: build it
        and compose."""
        with torch.no_grad():
            return self.build(conv, cand, i).compose()[0].detach()

    def rank_for_energy(self, cand: Candidate, energy: float) -> Rank:
        """The smallest rank of ``cand`` keeping ``energy`` (methods with ``has_energy``)."""
        for r, e in zip(cand.ranks, cand.energies or []):
            if e >= energy - 1e-9:
                return r
        return cand.ranks[-1]

    def forms(self, module: LowRankConv) -> tuple[str, ...]:
        """The distinct exact forms of ``module`` worth timing (the plain one first)."""
        return self.form_names[:1]

    def to_form(self, module: LowRankConv, form: str) -> LowRankConv:
        """An exactly equal layer in ``form`` (a new module; ``module`` itself when already in it)."""
        if form != module.form:
            raise ValueError(f"method {self.name} has no form {form!r}; it has "
                             f"{', '.join(self.form_names)}")
        return module

    def auto_form(self, module: LowRankConv) -> str | None:
        """The untimed form choice; None means the dense conv is expected to be as fast (keep
        the original). Default: the plain form."""
        return self.form_names[0]

    def auto_note(self, module: LowRankConv) -> str:
        """Why :meth:`auto_form` keeps the original (for the report)."""
        return "the method expects the dense conv to be as fast"

    def refit(self, module: LowRankConv, moments: Any, *, ridge: float, iterations: int,
              add_bias: bool) -> tuple[float, float] | None:
        """A method's own joint calibration solve from patch moments, in place; returns the
        objective before and after. None: use the generic refit."""
        return None

    def composable(self, module: LowRankConv) -> bool:
        """Whether ``conv(x, *compose(module))`` with the layer's geometry equals ``module(x)``
        for every input (padding of the parts may differ from the whole's)."""
        return True

    def slow_on_cpu(self, module: LowRankConv) -> bool:
        """Whether the chain trains much slower on a CPU than its composed dense conv (then
        fine-tuning's ``train_form="auto"`` computes it densely). Default False."""
        return False

    def unknowns(self, module: LowRankConv) -> int:
        """How many numbers the largest single least-squares solve of a joint refit has."""
        return (module.in_channels // module.groups) * taps(module) + 1

    def describe_rank(self, rank: Rank) -> str:
        return "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def pixels(shape: tuple[int, ...]) -> int:
    """Spatial positions of an activation shape (N, C, *spatial)."""
    return math.prod(shape[2:])


def bias_params(conv: nn.Module) -> int:
    return conv.out_channels if conv.bias is not None else 0
