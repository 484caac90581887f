"""CP (``cp``, ``cp4``): the kernel maths against tensorly's own reconstruction, convergence and
reproducibility of the ALS, the exact construction, and the built chains against ``F.conv`` on
the rebuilt kernel for 1-D/2-D/3-D convs, groups, stride, dilation, every padding mode and
``padding="same"``. The method contract (tests/test_methods.py) runs on both methods too."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from decompose import methods
from decompose.engine.trace import count_macs, trace
from decompose.kernels import cp as kcp
from decompose.methods import cp as mcp

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _conv(cls, *args, seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    conv = cls(*args, **kw).eval()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p))
    return conv


def _reference(x: torch.Tensor, conv: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``conv``'s geometry applied to kernel ``w`` with F.pad + F.convNd (padding done by hand,
    'same' split as PyTorch documents: the extra pixel of an odd total on the right)."""
    n = len(conv.kernel_size)
    if conv.padding == "same":
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
    elif conv.padding == "valid":
        pads = [(0, 0)] * n
    else:
        pads = [(p, p) for p in conv.padding]
    flat = [v for pair in reversed(pads) for v in pair]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, flat, mode=mode) if any(flat) else x
    return CONV_FN[n](x, w, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def _call(conv: nn.Module, shape: tuple[int, ...]):
    return trace(nn.Sequential(conv), shape)["0"]


# ----------------------------------------------------------------------------- kernel maths


@pytest.mark.parametrize("modes", [((0, 1),), ((0,), (1,)), ((1,), (0,))])
@pytest.mark.parametrize("groups", [1, 2])
def test_rebuild_matches_tensorly_cp_to_tensor(modes, groups):
    import tensorly as tl
    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 5, dtype=torch.float64)
    f = kcp.fit(w, 4, groups, modes, n_iter_max=5)
    assert f.rank == 4 and [a.shape[0] for a in f.factors] == [groups] * (2 + len(modes))
    x = kcp.to_tensor(w, groups, modes)
    assert torch.equal(kcp.from_tensor(x, w.shape, modes), w)
    full = kcp.rebuild(f)
    for g in range(groups):  # tensorly's own reconstruction of each group's factors
        ref = tl.cp_to_tensor((None, [a[g].numpy() for a in f.factors]))
        got = kcp.to_tensor(full, groups, modes)[g]
        assert torch.allclose(got, torch.as_tensor(ref), atol=1e-12)
    want = float((w - full).norm() / w.norm())
    assert kcp.relative_error(w, f) == pytest.approx(want, rel=1e-12)


def test_mttkrp_equals_tensorlys_khatri_rao_product():
    import tensorly as tl
    from tensorly.tenalg.core_tenalg.mttkrp import unfolding_dot_khatri_rao
    torch.manual_seed(1)
    for shape in [(5, 4, 9), (5, 4, 3, 2), (3, 6, 2, 2, 2)]:
        x = torch.randn(*shape, dtype=torch.float64)
        factors = [torch.randn(s, 7, dtype=torch.float64) for s in shape]
        for weights in (None, torch.rand(7, dtype=torch.float64)):
            with tl.backend_context("pytorch"):
                for mode in range(len(shape)):
                    want = unfolding_dot_khatri_rao(x, (weights, factors), mode)
                    got = kcp.mttkrp(x, (weights, factors), mode)
                    assert torch.allclose(got, want, atol=1e-12)


def test_fit_recovers_an_exact_cp_tensor_at_its_rank():
    """A kernel that *is* a rank-4 CP is found again at rank 4 (3-way and 4-way)."""
    g = torch.Generator().manual_seed(3)
    for dims in [(10, 8, 9), (10, 8, 3, 3)]:
        factors = [torch.randn(1, d, 4, generator=g, dtype=torch.float64) for d in dims]
        x = kcp._full(factors)[0]
        modes = ((0, 1),) if len(dims) == 3 else ((0,), (1,))
        w = kcp.from_tensor(x[None], (10, 8, 3, 3), modes)
        f = kcp.fit(w, 4, 1, modes, n_iter_max=500, tol=1e-12)
        assert kcp.relative_error(w, f) < 1e-6, dims
        assert f.info["converged"] == [True]


def test_more_sweeps_never_raise_the_error_and_converge():
    """The error at the returned iterate is no higher with more sweeps, and the gain from the
    last sweeps is small once ``tol`` stops the fit: what 'converged' means here."""
    torch.manual_seed(4)
    w = torch.randn(12, 10, 3, 3, dtype=torch.float64)
    errs = [kcp.relative_error(w, kcp.fit(w, 15, n_iter_max=n, tol=0, linesearch=False))
            for n in (5, 20, 80)]
    assert errs[0] >= errs[1] >= errs[2]
    f = kcp.fit(w, 15, n_iter_max=2000, tol=1e-7, linesearch=False)
    assert f.info["converged"] == [True]
    e_conv = kcp.relative_error(w, f)
    more = kcp.fit(w, 15, init=f, n_iter_max=200, tol=0, linesearch=False)
    assert e_conv - kcp.relative_error(w, more) < 5e-3
    assert e_conv <= errs[2] + 1e-9
    # the solver's own last error is the error of the returned factors
    assert f.info["solver_errors"][0][-1] == pytest.approx(e_conv, abs=1e-6)


def test_fit_is_reproducible_with_a_seed_and_leaves_tensorly_alone():
    import tensorly as tl
    backend, algebra = tl.get_backend(), tl.tenalg.get_backend()
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    w = torch.randn(6, 4, 3, 3)
    # rank 12 > every channel mode: tensorly's SVD init fills seeded random columns
    a = kcp.fit(w, 12, n_iter_max=10, seed=7)
    b = kcp.fit(w, 12, n_iter_max=10, seed=7)
    c = kcp.fit(w, 12, n_iter_max=10, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors))
    assert not all(torch.equal(x, y) for x, y in zip(a.factors, c.factors))
    assert (tl.get_backend(), tl.tenalg.get_backend()) == (backend, algebra)
    assert torch.get_num_threads() == threads


def test_exact_construction_and_truncation():
    torch.manual_seed(6)
    for shape, groups, modes in [((8, 3, 3, 3), 2, ((0, 1),)), ((5, 6, 3, 2), 1, ((0,), (1,))),
                                 ((4, 2, 3, 3, 3), 2, ((0,), (1,), (2,)))]:
        w = torch.randn(*shape, dtype=torch.float64)
        f = kcp.exact(w, groups, modes)
        dims = kcp.tensor_dims(shape, groups, modes)
        assert f.rank == kcp.exact_rank(shape, groups, modes) == math.prod(dims) // max(dims)
        assert kcp.relative_error(w, f) < 1e-14
        assert kcp.relative_error(w, kcp.balanced(f)) < 1e-14
        t = kcp.truncate(f, 2)
        assert t.rank == 2 and kcp.relative_error(w, t) > 0
    assert kcp.axis_modes((3, 3)) == ((0,), (1,))
    assert kcp.axis_modes((3, 3, 1)) == ((0, 2), (1,))
    assert kcp.axis_modes((1, 5)) == ((0, 1),)


def test_fit_ladder_warm_starts_and_errors_fall_with_rank():
    torch.manual_seed(7)
    w = torch.randn(10, 8, 3, 3)
    fits = kcp.fit_ladder(w, [3, 6, 12], n_iter_max=30, n_iter_warm=10)
    errs = [kcp.relative_error(w, fits[r]) for r in (3, 6, 12)]
    assert errs[0] > errs[1] > errs[2]
    assert [fits[r].info["sweeps"][0] for r in (12, 6, 3)] == [30, 10, 10] or \
        all(fits[r].info["converged"][0] for r in (6, 3))


# ----------------------------------------------------------------------------- the methods

LAYERS = [  # (id, conv class, args, kwargs, input shape)
    ("1d-reflect-stride", nn.Conv1d, (4, 6, 5), dict(stride=2, padding=2, padding_mode="reflect"),
     (4, 23)),
    ("2d-zeros", nn.Conv2d, (6, 8, 3), dict(padding=1), (6, 9, 9)),
    ("2d-reflect-dilation", nn.Conv2d, (6, 8, 3), dict(padding=2, dilation=2,
                                                          padding_mode="reflect"), (6, 11, 10)),
    ("2d-replicate-rect-stride", nn.Conv2d, (5, 6, (3, 5)), dict(stride=(2, 1), padding=(1, 2),
                                                                  padding_mode="replicate"),
     (5, 11, 12)),
    ("2d-circular-groups", nn.Conv2d, (8, 12, 3), dict(padding=1, groups=2,
                                                       padding_mode="circular"), (8, 9, 9)),
    ("2d-same-even-dilated", nn.Conv2d, (5, 7, (4, 3)), dict(padding="same", dilation=(1, 3),
                                                             padding_mode="reflect"), (5, 12, 13)),
    ("2d-same-zeros-even", nn.Conv2d, (4, 6, 2), dict(padding="same"), (4, 7, 8)),
    ("2d-valid-nobias", nn.Conv2d, (4, 6, 3), dict(padding="valid", bias=False), (4, 8, 8)),
    ("3d-groups-stride", nn.Conv3d, (4, 6, 3), dict(stride=(1, 2, 1), padding=1, groups=2),
     (4, 5, 7, 6)),
    ("3d-k1-axis", nn.Conv3d, (4, 6, (3, 3, 1)), dict(stride=(1, 1, 2), padding=(1, 0, 2),
                                                       padding_mode="circular"), (4, 6, 7, 5)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("name", ["cp", "cp4"])
@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_chain_is_the_conv_of_its_rebuilt_kernel(name, case):
    """The built layer equals F.conv with the rebuilt CP kernel (an independent computation)
    for every geometry, and the reported error, MACs and parameters are the layer's."""
    _, cls, args, kw, shape = case
    conv = _conv(cls, *args, **kw)
    method = methods.get(name)
    why = method.skip_reason(conv)
    if why is not None:  # cp4 on a conv with one spatial axis: that chain is cp's
        assert name == "cp4" and len(kcp.axis_modes(conv.kernel_size)) == 1 and "cp" in why
        return
    torch.manual_seed(1)
    x = torch.randn(2, *shape)
    (cand,) = method.candidates(conv, _call(conv, shape), ranks=[3])
    layer = method.build(conv, cand, 0)
    kernel = kcp.rebuild(cand.state["fits"][3]).float()
    with torch.no_grad():
        got, want = layer(x), _reference(x, conv, kernel)
        exact = _reference(x, conv, conv.weight)
    assert got.shape == want.shape == exact.shape == conv(x).shape
    assert _rel(got, want) < 1e-5
    assert _rel(layer.weight.detach(), kernel) < 1e-5
    assert _rel(kernel, conv.weight) == pytest.approx(cand.errors[0], abs=1e-6)
    assert count_macs(nn.Sequential(layer), shape) == cand.macs[0]
    assert sum(p.numel() for p in layer.parameters()) == cand.params[0]
    n_dw = len(layer) - 2
    assert n_dw == (1 if name == "cp" else len(kcp.axis_modes(conv.kernel_size)))


@pytest.mark.parametrize("name", ["cp", "cp4"])
def test_full_rank_is_the_exact_construction(name):
    conv = _conv(nn.Conv2d, 6, 4, 3, padding=1, padding_mode="reflect")
    method = methods.get(name)
    call = _call(conv, (6, 8, 8))
    (cand,) = method.candidates(conv, call, ranks=["full", 10**6])
    modes = mcp.spatial_modes(conv, name)
    assert cand.ranks == [kcp.exact_rank(conv.weight.shape, 1, modes)] == [cand.full_rank]
    assert cand.exact(0) and cand.errors[0] < 1e-6
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        assert _rel(method.build(conv, cand, 0)(x), conv(x)) < 1e-5


def test_skip_reasons():
    cp, cp4 = methods.get("cp"), methods.get("cp4")
    assert "1x1" in cp.skip_reason(nn.Conv2d(4, 4, 1))
    assert "depthwise" in cp.skip_reason(nn.Conv2d(4, 4, 3, groups=4))
    assert cp.skip_reason(nn.Conv1d(4, 4, 3)) is None
    assert "cp" in cp4.skip_reason(nn.Conv1d(4, 4, 3))
    assert "cp" in cp4.skip_reason(nn.Conv2d(4, 4, (1, 3)))
    assert cp4.skip_reason(nn.Conv2d(4, 4, 3)) is None
    assert cp4.skip_reason(nn.Conv3d(4, 4, (3, 1, 3))) is None


@pytest.mark.parametrize("name", ["cp", "cp4"])
def test_budget_menu_is_cheaper_increasing_and_cached(name):
    conv = _conv(nn.Conv2d, 16, 16, 3, padding=1, stride=2)
    method = methods.get(name)
    call = _call(conv, (16, 12, 12))
    mcp.clear_cache()
    (cand,) = method.candidates(conv, call)
    dense = conv.weight.numel() * math.prod(call.out_shape[2:])
    assert cand.ranks == sorted(set(cand.ranks)) and len(cand.ranks) >= 5
    assert all(m < dense for m in cand.macs) and all(p < conv.weight.numel() + 16
                                                     for p in cand.params)
    assert cand.macs == sorted(cand.macs)
    assert cand.errors[0] > cand.errors[-1]
    (again,) = method.candidates(conv, call)  # the cache: the same factors, not a refit
    assert all(again.state["fits"][r] is cand.state["fits"][r] for r in cand.ranks)
    (other,) = method.candidates(conv, call, seed=1)
    assert other.state["fits"][cand.ranks[-1]] is not cand.state["fits"][cand.ranks[-1]]


def test_work_cap_bounds_the_sweeps_of_large_kernels():
    small = mcp.menu_sweeps((64, 64, 9), 1, [17, 47, 95, 191])
    assert small == (mcp.MENU_SWEEPS, mcp.WARM_SWEEPS)
    big = mcp.menu_sweeps((512, 512, 9), 1, [142, 571, 1142, 1621])
    assert big[0] < mcp.MENU_SWEEPS and big[1] < mcp.WARM_SWEEPS
    assert big[0] >= mcp.MIN_SWEEPS[0] and big[1] >= mcp.MIN_SWEEPS[1]
    assert mcp.fixed_sweeps((64, 64, 9), 1, 100) == mcp.FIXED_SWEEPS
    assert mcp.fixed_sweeps((512, 512, 9), 1, 1000) < mcp.FIXED_SWEEPS


def test_compose_is_differentiable_in_every_factor():
    conv = _conv(nn.Conv2d, 4, 6, 3, padding=1)
    method = methods.get("cp4")
    (cand,) = method.candidates(conv, _call(conv, (4, 6, 6)), ranks=[2])
    layer = method.build(conv, cand, 0)
    w, b = layer.compose()
    (w.square().sum() + b.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_dtype_and_float64_layers():
    conv = _conv(nn.Conv2d, 4, 6, 3, padding=1).double()
    method = methods.get("cp")
    (cand,) = method.candidates(conv, _call(conv, (4, 6, 6)), ranks=["full"])
    layer = method.build(conv, cand, 0)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert _rel(layer(x), conv(x)) < 1e-12
