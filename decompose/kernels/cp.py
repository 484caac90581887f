"""Kernel maths of CP (CANDECOMP/PARAFAC) factorizations of a conv kernel. Pure functions on
tensors: a weight in, factors and errors out (no modules).

A conv weight ``W`` has shape ``(C_out, C_in/g, *k)`` with ``n = len(k)`` spatial axes and ``g``
groups; per group ``Co = C_out/g``, ``Ci = C_in/g``. The spatial axes are partitioned into
*spatial modes* (``modes``, a tuple of tuples of axes, in order): each group's block is seen as
the ``(2 + len(modes))``-way tensor ``X[o, i, s_1, ..., s_m]``, where ``s_j`` runs (row-major)
over the kernel taps of the axes in mode ``j``:

* ``modes = ((0, 1),)`` (one mode holding every axis): the 3-way ``(Co, Ci, K)`` tensor of
  Lebedev et al. 2015, i.e. 1x1 ``Ci -> R``, a depthwise ``k_h x k_w`` conv on ``R`` channels,
  1x1 ``R -> Co``;
* ``modes = ((0,), (1,))``: the 4-way ``(Co, Ci, k_h, k_w)`` tensor, i.e. 1x1, depthwise
  ``k_h x 1``, depthwise ``1 x k_w``, 1x1.

A rank-``R`` CP of ``X`` is ``X ~ sum_r A_0[o, r] A_1[i, r] A_2[s_1, r] ... A_{m+1}[s_m, r]``;
:class:`CPFactors` keeps the factors of every group stacked, ``(g, I_j, R)``.

Fitting is tensorly's ALS (``tensorly.decomposition.parafac``: SVD initialisation, its
least-squares sweeps, Bro's line search, its stopping rule ``|e_t - e_{t-1}| < tol`` on the
relative error ``e``), one group at a time, in float64, seeded (``random_state``) and bounded
(``n_iter_max``). Two things are set only for the duration of a call and restored after it: the
tensorly backend (``pytorch``, thread-locally) and its tensor-algebra backend, whose MTTKRP is
replaced by :func:`mttkrp` (same result, without tensorly's explicit Khatri-Rao product, which
for a 512x512x3x3 kernel at rank 1000 is a 2.4 GB matrix). Nothing in tensorly's global state
changes at import.

CP has no closed form and ALS finds a local optimum: the error of the returned factors is
computed here exactly (:func:`relative_error`), never taken from the solver. Every CP of ``X`` at
rank ``R >= exact_rank`` reproduces it exactly (:func:`exact`), and that rank is reached by
construction, not by ALS.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

Modes = tuple[tuple[int, ...], ...]

#: Defaults of :func:`fit` (documented there).
N_ITER_MAX = 100
TOL = 1e-6


# ------------------------------------------------------------------------------------ layout


def one_mode(n: int) -> Modes:
    """Every spatial axis in one mode: the 3-way ``(Co, Ci, K)`` tensor (``cp``)."""
    return (tuple(range(n)),)


def axis_modes(kernel_size: Sequence[int]) -> Modes:
    """One mode per spatial axis whose kernel size is above 1, in axis order (``cp4``); the
    size-1 axes join the first mode (they add no tap). A kernel of all 1s gives one mode."""
    big = [a for a, k in enumerate(kernel_size) if int(k) > 1]
    if not big:
        return one_mode(len(kernel_size))
    ones = tuple(a for a, k in enumerate(kernel_size) if int(k) == 1)
    first = tuple(sorted((big[0], *ones)))
    return (first, *((a,) for a in big[1:]))


def check_modes(modes: Modes, n: int) -> Modes:
    """``modes`` as a tuple of tuples, checked to partition the ``n`` spatial axes."""
    modes = tuple(tuple(int(a) for a in m) for m in modes)
    flat = [a for m in modes for a in m]
    if sorted(flat) != list(range(n)) or any(not m for m in modes):
        raise ValueError(f"modes {modes} must partition the spatial axes 0..{n - 1}")
    return modes


def mode_sizes(kernel_size: Sequence[int], modes: Modes) -> tuple[int, ...]:
    """Taps of every spatial mode (the product of its axes' kernel sizes)."""
    return tuple(math.prod(int(kernel_size[a]) for a in m) for m in modes)


def to_tensor(weight: torch.Tensor, groups: int = 1, modes: Modes | None = None) -> torch.Tensor:
    """The ``(g, Co, Ci, *mode_sizes)`` tensor of ``weight`` (float64, a copy)."""
    k = tuple(weight.shape[2:])
    modes = check_modes(modes if modes is not None else one_mode(len(k)), len(k))
    c_out, ci = weight.shape[:2]
    w = weight.detach().to(torch.float64).reshape(groups, c_out // groups, ci, *k)
    order = [a for m in modes for a in m]
    w = w.permute(0, 1, 2, *(3 + a for a in order))
    return w.reshape(groups, c_out // groups, ci, *mode_sizes(k, modes)).contiguous()


def from_tensor(x: torch.Tensor, weight_shape: Sequence[int], modes: Modes) -> torch.Tensor:
    """Inverse of :func:`to_tensor`: ``(g, Co, Ci, *mode_sizes)`` back to the weight layout."""
    k = tuple(int(s) for s in weight_shape[2:])
    order = [a for m in modes for a in m]
    g = x.shape[0]
    w = x.reshape(g, x.shape[1], x.shape[2], *(k[a] for a in order))
    inverse = [order.index(a) for a in range(len(k))]
    w = w.permute(0, 1, 2, *(3 + j for j in inverse))
    return w.reshape(*weight_shape)


def exact_rank(weight_shape: Sequence[int], groups: int = 1, modes: Modes | None = None) -> int:
    """The rank at which a CP of every group's tensor is exact by construction: the product of
    all its dimensions but the largest (a rank the tensor's true CP rank never exceeds)."""
    k = tuple(int(s) for s in weight_shape[2:])
    modes = check_modes(modes if modes is not None else one_mode(len(k)), len(k))
    dims = [int(weight_shape[0]) // groups, int(weight_shape[1]), *mode_sizes(k, modes)]
    return math.prod(dims) // max(dims)


def tensor_dims(weight_shape: Sequence[int], groups: int = 1, modes: Modes | None = None
                ) -> tuple[int, ...]:
    """The dimensions ``(Co, Ci, *mode_sizes)`` of one group's tensor."""
    k = tuple(int(s) for s in weight_shape[2:])
    modes = check_modes(modes if modes is not None else one_mode(len(k)), len(k))
    return (int(weight_shape[0]) // groups, int(weight_shape[1]), *mode_sizes(k, modes))


def sweep_cost(dims: Sequence[int], rank: int) -> int:
    """Multiply-adds of one ALS sweep of :func:`fit` on one tensor of shape ``dims`` at rank
    ``R`` (a model for budgeting work, not a measurement): per mode an MTTKRP (``size * R``),
    the Gram products of the other factors (``R^2`` times their sizes) and the solve
    (``R^3 / 3 + R^2 * I_mode``); plus half a rebuild (``size * R / 2``) for the line search,
    which tries a step every other sweep."""
    dims = [int(d) for d in dims]
    size, n, r = math.prod(dims), len(dims), int(rank)
    total = n * size * r + size * r // 2
    for j in range(n):
        total += r * r * (sum(dims) - dims[j]) + r**3 // 3 + r * r * dims[j]
    return total


# ------------------------------------------------------------------------------------ factors


@dataclass
class CPFactors:
    """A CP factorization of a conv kernel, every group's factors stacked.

    ``factors[j]``: ``(g, I_j, R)`` float64 for the modes ``(Co, Ci, *spatial modes)``, so
    ``factors[0]`` holds the output channels, ``factors[1]`` the input channels and
    ``factors[2 + j]`` spatial mode ``j`` (``modes[j]``'s taps, row-major).
    """

    factors: list[torch.Tensor]
    weight_shape: tuple[int, ...]
    groups: int
    modes: Modes
    info: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return int(self.factors[0].shape[-1])


def rebuild(f: CPFactors) -> torch.Tensor:
    """The kernel ``W_hat`` (original layout, float64) the factors stand for."""
    return from_tensor(_full(f.factors), f.weight_shape, f.modes)


def relative_error(weight: torch.Tensor, f: CPFactors) -> float:
    """``||W - W_hat||_F / ||W||_F`` in float64 (0 for an all-zero ``W`` rebuilt exactly)."""
    w = weight.detach().to(torch.float64)
    diff = float((w - rebuild(f).to(w.device)).norm())
    norm = float(w.norm())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _full(factors: list[torch.Tensor]) -> torch.Tensor:
    """``sum_r prod_j A_j[b, i_j, r]`` -> ``(g, I_0, ..., I_{N-1})``."""
    g, r = factors[0].shape[0], factors[0].shape[-1]
    kr = factors[1]
    for a in factors[2:]:
        kr = (kr[:, :, None, :] * a[:, None, :, :]).reshape(g, -1, r)
    out = factors[0] @ kr.transpose(1, 2)
    return out.reshape(g, *(a.shape[1] for a in factors))


def normalized(f: CPFactors) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(weights (g, R), unit-norm factors)`` with ``[[f]] = [[weights; unit factors]]``."""
    norms = [a.norm(dim=1) for a in f.factors]
    lam = torch.ones_like(norms[0])
    for n in norms:
        lam = lam * n
    return lam, [a / n.clamp_min(1e-300)[:, None, :] for a, n in zip(f.factors, norms)]


def balanced(f: CPFactors) -> CPFactors:
    """The same CP with every component's columns at equal norm ``w_r^(1/N)`` in every mode
    (``w_r`` the product of its column norms; signs stay in the columns) and components sorted
    by decreasing ``w_r``: no factor carries very large or very small numbers, which float32
    convs prefer."""
    lam, unit = normalized(f)
    order = lam.argsort(dim=1, descending=True)
    scale = torch.gather(lam, 1, order).pow(1.0 / len(unit))
    out = [torch.gather(u, 2, order[:, None, :].expand_as(u)) * scale[:, None, :] for u in unit]
    return CPFactors(out, f.weight_shape, f.groups, f.modes, dict(f.info))


def truncate(f: CPFactors, rank: int) -> CPFactors:
    """The ``rank`` components of largest weight ``prod_j ||A_j[:, r]||`` of every group (a warm
    start for a lower rank; not itself a fit)."""
    lam, unit = normalized(f)
    idx = lam.argsort(dim=1, descending=True)[:, :rank]
    out = []
    for j, u in enumerate(unit):
        sel = torch.gather(u, 2, idx[:, None, :].expand(-1, u.shape[1], -1))
        out.append(sel * torch.gather(lam, 1, idx)[:, None, :] if j == 0 else sel)
    return CPFactors(out, f.weight_shape, f.groups, f.modes)


def exact(weight: torch.Tensor, groups: int = 1, modes: Modes | None = None) -> CPFactors:
    """A CP that reproduces ``weight`` exactly, at :func:`exact_rank`: one component per index
    of every mode but the largest (unit vectors there), whose factor in the largest mode is
    the tensor's fiber at that index."""
    k = tuple(weight.shape[2:])
    modes = check_modes(modes if modes is not None else one_mode(len(k)), len(k))
    x = to_tensor(weight, groups, modes)
    g, dims = x.shape[0], list(x.shape[1:])
    big = max(range(len(dims)), key=lambda j: (dims[j], -j))
    rest = [j for j in range(len(dims)) if j != big]
    r = math.prod(dims[j] for j in rest)
    factors: list[torch.Tensor] = [None] * len(dims)  # type: ignore[list-item]
    # component index = row-major over the other modes' indices
    fiber = x.movedim(1 + big, -1).reshape(g, r, dims[big])
    factors[big] = fiber.transpose(1, 2).contiguous()
    idx = torch.arange(r).reshape(*(dims[j] for j in rest))
    for pos, j in enumerate(rest):
        which = idx.movedim(pos, 0).reshape(dims[j], -1)  # which components have index i in j
        e = torch.zeros(dims[j], r, dtype=x.dtype, device=x.device)
        for i in range(dims[j]):
            e[i, which[i]] = 1.0
        factors[j] = e.expand(g, -1, -1).clone()
    return CPFactors(factors, tuple(weight.shape), groups, modes, {"exact": True})


# ------------------------------------------------------------------------------------ fitting


def mttkrp(tensor: torch.Tensor, cp_tensor, mode: int) -> torch.Tensor:
    """tensorly's ``unfolding_dot_khatri_rao`` (the matricized tensor times the Khatri-Rao
    product of every factor but ``mode``'s), computed by contracting the largest other mode
    with one matrix product and the rest with broadcasting: the same numbers up to rounding,
    in memory of the order of the tensor's size times ``R / I_largest`` instead of the
    Khatri-Rao product's ``R * prod(I) / I_mode``. Returns ``(I_mode, R)``."""
    weights, factors = cp_tensor
    n = tensor.dim()
    others = sorted((j for j in range(n) if j != mode), key=lambda j: -tensor.shape[j])
    first = others[0]
    r = factors[first].shape[1]
    y = tensor.movedim(first, -1)
    keep = [j for j in range(n) if j != first]  # the order of y's leading dims
    y = (y.reshape(-1, tensor.shape[first]) @ factors[first].conj())
    y = y.reshape(*(tensor.shape[j] for j in keep), r)
    for j in others[1:]:
        pos = keep.index(j)
        shape = [1] * len(keep) + [r]
        shape[pos] = tensor.shape[j]
        y = (y * factors[j].conj().reshape(shape)).sum(pos)
        keep.pop(pos)
    if weights is not None:
        y = y * weights.reshape(1, -1)
    return y


_TL_LOCK = threading.Lock()


@contextlib.contextmanager
def _tensorly_torch() -> Iterator[None]:
    """tensorly on the pytorch backend with :func:`mttkrp`, for this thread, restored after.

    A fresh instance of tensorly's core tensor-algebra backend gets :func:`mttkrp` as an
    instance attribute (tensorly's own classes are untouched); both backends are set
    thread-locally (``local_threadsafe=True``) and tensorly's ``backend_context`` restores the
    previous ones on exit. A lock keeps two threads of this module from interleaving them."""
    import tensorly as tl
    from tensorly import tenalg
    from tensorly.tenalg.core_tenalg import CoreTenalgBackend

    algebra = CoreTenalgBackend()
    algebra.unfolding_dot_khatri_rao = mttkrp  # instance attribute: only this object
    with _TL_LOCK, tl.backend_context("pytorch", local_threadsafe=True), \
            tenalg.backend_context(algebra, local_threadsafe=True):
        yield


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (None: unchanged), restored after."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit(weight: torch.Tensor, rank: int, groups: int = 1, modes: Modes | None = None, *,
        init: str | CPFactors = "svd", n_iter_max: int = N_ITER_MAX, tol: float = TOL,
        seed: int = 0, linesearch: bool = True, l2_reg: float = 0.0, threads: int | None = 1,
        on_iteration: Callable[[], None] | None = None) -> CPFactors:
    """A rank-``rank`` CP of every group's kernel tensor by tensorly's ALS.

    Args:
        weight: the conv weight ``(C_out, C_in/g, *k)``, any float dtype (fitted in float64).
        rank: components per group, an int >= 1.
        groups: the conv's groups (default 1); each group is fitted on its own.
        modes: the spatial modes (:func:`one_mode` (default) or :func:`axis_modes`).
        init: ``"svd"`` (default: tensorly's SVD initialisation, the leading singular vectors
            of every unfolding, with seeded uniform columns where ``rank`` exceeds a mode's
            size) or a :class:`CPFactors` of the same rank to start from (a warm start).
        n_iter_max: at most this many ALS sweeps per group (default 100, an int >= 0; 0 returns
            the initialisation).
        tol: stop a group's sweeps once its relative error changed by less than ``tol`` in one
            sweep (default 1e-6; 0 runs all ``n_iter_max`` unless a sweep changes nothing).
        seed: the ``random_state`` of the initialisation (default 0); with a fixed seed and
            thread count the result is reproducible.
        linesearch: tensorly's line search (Bro's extrapolation every other sweep after the
            sixth; default True: at equal sweeps it lowers the error, e.g. 0.289 -> 0.272 after
            100 sweeps on a ResNet-56 64x64x3x3 kernel at rank 134).
        l2_reg: tensorly's ridge on every least-squares step, on the group's tensor scaled to
            unit norm (default 0.0, a float >= 0; e.g. 1e-3 keeps components from growing
            large and cancelling, the degeneracy plain ALS drifts into at high ranks).
        threads: torch threads during the fit (default 1: the sweeps are many small matrix
            products, which extra threads slow down on a busy machine; None leaves the
            setting alone).
        on_iteration: called after every sweep (progress bars).

    Returns the factors with ``info``: ``sweeps`` (per group), ``converged`` (per group: stopped
    by ``tol`` before ``n_iter_max``), ``solver_errors`` (per group, the relative error tensorly
    passed to its callback after each sweep; a line-search sweep passes the previous one's).
    Errors to report come from :func:`relative_error`, not from these.
    """
    from tensorly.decomposition import parafac

    k = tuple(weight.shape[2:])
    modes = check_modes(modes if modes is not None else one_mode(len(k)), len(k))
    rank = int(rank)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if isinstance(init, CPFactors) and init.rank != rank:
        raise ValueError(f"a warm start of rank {init.rank} cannot start a rank-{rank} fit")
    x = to_tensor(weight, groups, modes).cpu()
    out: list[list[torch.Tensor]] = [[] for _ in range(x.dim() - 1)]
    info: dict = {"sweeps": [], "converged": [], "solver_errors": []}
    with torch_threads(threads), _tensorly_torch(), warnings.catch_warnings():
        # tensorly warns when the SVD init asks for more vectors than a mode has (then it fills
        # the rest with seeded random columns, as documented above)
        warnings.filterwarnings("ignore", message=".*n_eigenvecs.*")
        for gi in range(x.shape[0]):
            xg = x[gi]
            scale = float(xg.norm())
            if scale == 0:  # nothing to fit: zero factors are exact
                for j, s in enumerate(xg.shape):
                    out[j].append(torch.zeros(s, rank, dtype=torch.float64))
                info["sweeps"].append(0)
                info["converged"].append(True)
                info["solver_errors"].append([])
                continue
            xg = xg / scale  # tol and the errors are then scale-free
            if isinstance(init, CPFactors):
                start = [a[gi].cpu().clone() for a in init.factors]
                start[0] = start[0] / scale
                start_cp = (torch.ones(rank, dtype=torch.float64), start)
            else:
                start_cp = init
            errors: list[float] = []

            def callback(_cp, err, errors=errors) -> bool:
                errors.append(float(err))
                if len(errors) > 1 and on_iteration is not None:
                    on_iteration()
                return False

            if n_iter_max == 0:
                from tensorly.decomposition._cp import initialize_cp
                cp = initialize_cp(xg, rank, init=start_cp, random_state=seed)
                errors.append(math.nan)
            else:
                # tensorly computes the error (which the callback reads) only when tol is set
                cp = parafac(xg, rank, n_iter_max=int(n_iter_max), init=start_cp,
                             tol=max(float(tol), 1e-300),
                             random_state=int(seed), linesearch=bool(linesearch),
                             l2_reg=float(l2_reg), callback=callback)
            w, fac = cp
            fac = [torch.as_tensor(a, dtype=torch.float64).clone() for a in fac]
            if w is not None:
                fac[0] = fac[0] * torch.as_tensor(w, dtype=torch.float64).reshape(1, -1)
            fac[0] = fac[0] * scale
            for j, a in enumerate(fac):
                out[j].append(a)
            sweeps = len(errors) - 1
            info["sweeps"].append(sweeps)
            info["converged"].append(0 < sweeps < n_iter_max)
            info["solver_errors"].append(errors[1:])
    device = weight.device
    factors = [torch.stack(a).to(device) for a in out]
    return CPFactors(factors, tuple(weight.shape), groups, modes, info)


def fit_ladder(weight: torch.Tensor, ranks: Sequence[int], groups: int = 1,
               modes: Modes | None = None, *, n_iter_max: int = N_ITER_MAX,
               n_iter_warm: int | None = None, tol: float = TOL, seed: int = 0,
               linesearch: bool = True, l2_reg: float = 0.0, threads: int | None = 1,
               on_iteration: Callable[[], None] | None = None) -> dict[int, CPFactors]:
    """Fits at several ranks, largest first, each warm-started from the one above.

    The largest rank starts from tensorly's SVD initialisation and gets ``n_iter_max`` sweeps;
    every smaller rank starts from the previous fit truncated to its ``rank`` largest
    components (:func:`truncate`) and gets ``n_iter_warm`` sweeps (default: ``n_iter_max``).
    Other arguments as :func:`fit`. Returns ``{rank: factors}``."""
    out: dict[int, CPFactors] = {}
    prev: CPFactors | None = None
    for r in sorted({int(r) for r in ranks}, reverse=True):
        if prev is None:
            f = fit(weight, r, groups, modes, n_iter_max=n_iter_max, tol=tol, seed=seed,
                    linesearch=linesearch, l2_reg=l2_reg, threads=threads,
                    on_iteration=on_iteration)
        else:
            f = fit(weight, r, groups, modes, init=truncate(prev, r),
                    n_iter_max=n_iter_warm if n_iter_warm is not None else n_iter_max, tol=tol,
                    seed=seed, linesearch=linesearch, l2_reg=l2_reg, threads=threads,
                    on_iteration=on_iteration)
        out[r] = f
        prev = f
    return out


__all__ = ["CPFactors", "Modes", "axis_modes", "balanced", "check_modes", "exact", "exact_rank",
           "fit", "fit_ladder", "from_tensor", "sweep_cost", "tensor_dims", "mttkrp", "normalized", "one_mode", "rebuild",
           "relative_error", "to_tensor", "torch_threads", "truncate"]
