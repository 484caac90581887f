"""Tucker-2, spatial SVD and channel SVD: the maths against independent references (numpy's
SVD, tensorly's partial Tucker, F.conv on the rebuilt kernel), exactness at full rank on every
geometry the methods accept, Eckart-Young optimality, energies, costs and skip reasons.
(tests/test_methods.py holds the contract every registered method passes.)"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decompose
from decompose import methods
from decompose.engine.trace import count_macs, trace
from decompose.kernels import svd as ksvd
from decompose.kernels import tucker as ktucker
from decompose.methods.tucker2 import Tucker2

EXACT = 1e-5     # float32 chain vs the original conv at full rank
TIGHT = 1e-10    # float64 maths
FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: (weight shape, groups) for the kernel maths
SHAPES = [((8, 6, 3, 3), 1), ((8, 3, 3, 5), 2), ((6, 4, 5), 1), ((4, 4, 3, 3, 3), 1),
          ((12, 16, 1, 1), 1), ((6, 1, 3, 3), 3), ((9, 2, 2, 4), 3)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def seeded(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def call_of(conv: nn.Module, shape: tuple[int, ...]):
    return trace(nn.Sequential(conv), shape)["0"]


def randomize(conv: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return conv.eval()


# ------------------------------------------------------------------ numpy references (SVDs)

def np_channel_matrix(w: np.ndarray, g: int) -> np.ndarray:
    c_out, ci = w.shape[:2]
    return w.reshape(g, c_out // g, ci * int(np.prod(w.shape[2:])))


def np_spatial_matrix(w: np.ndarray, g: int) -> np.ndarray:
    """M[(i, a), (o, b)] = W[o, i, a, b]: a the first spatial axis, b the others."""
    c_out, ci, ka = w.shape[:3]
    kb = int(np.prod(w.shape[3:]))
    blocks = w.reshape(g, c_out // g, ci, ka, kb)
    return np.stack([np.transpose(b, (1, 2, 0, 3)).reshape(ci * ka, -1) for b in blocks])


def np_truncate(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[..., :r] * s[:, None, :r]) @ vh[:, :r]


@pytest.mark.parametrize("shape,groups", SHAPES)
def test_channel_svd_matches_numpy(shape, groups):
    w = seeded(shape)
    f = ksvd.factorize(w, groups, "channel")
    m = np_channel_matrix(w.numpy(), groups)
    s_ref = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(f.s.numpy(), s_ref, rtol=1e-10, atol=1e-12)
    assert f.max_rank == min(shape[0] // groups, shape[1] * math.prod(shape[2:]))
    errs = ksvd.error_curve(f.s)
    for r in range(1, f.max_rank + 1):
        want = torch.from_numpy(np_truncate(m, r)).reshape(shape)
        got = ksvd.rebuild(f, r)
        assert rel(got, want) < TIGHT if want.norm() > 0 else got.norm() < TIGHT
        assert float(errs[r - 1]) == pytest.approx(rel(want, w), abs=TIGHT)
    assert rel(ksvd.rebuild(f, f.max_rank), w) < TIGHT and float(errs[-1]) == 0.0


@pytest.mark.parametrize("shape,groups", [s for s in SHAPES if len(s[0]) >= 4])
def test_spatial_svd_matches_numpy(shape, groups):
    w = seeded(shape, 1)
    f = ksvd.factorize(w, groups, "spatial")
    m = np_spatial_matrix(w.numpy(), groups)
    np.testing.assert_allclose(f.s.numpy(), np.linalg.svd(m, compute_uv=False), rtol=1e-10,
                               atol=1e-12)
    ci, ka, kb = shape[1], shape[2], math.prod(shape[3:])
    assert f.max_rank == min(ci * ka, shape[0] // groups * kb)
    errs = ksvd.error_curve(f.s)
    for r in range(1, f.max_rank + 1):
        approx = np_truncate(m, r)  # back to the kernel layout by the inverse reshape
        back = np.stack([a.reshape(ci, ka, shape[0] // groups, kb).transpose(2, 0, 1, 3)
                         for a in approx]).reshape(shape)
        assert rel(ksvd.rebuild(f, r), torch.from_numpy(back)) < TIGHT
        assert float(errs[r - 1]) == pytest.approx(rel(torch.from_numpy(back), w), abs=TIGHT)
    assert rel(ksvd.rebuild(f, f.max_rank), w) < TIGHT


def test_signs_are_deterministic():
    w = seeded((8, 6, 3, 3))
    for kind in ksvd.KINDS:
        a, b = ksvd.factorize(w, 2, kind), ksvd.factorize(w.clone(), 2, kind)
        assert torch.equal(a.u, b.u) and torch.equal(a.vh, b.vh)
        top = torch.gather(a.vh, -1, a.vh.abs().argmax(-1, keepdim=True))
        assert (top > 0).all()
    f = ktucker.hosvd(w, 2)
    for u in (f.u_in, f.u_out):
        assert (torch.gather(u, -2, u.abs().argmax(-2, keepdim=True)) > 0).all()
    f32 = ksvd.factorize(w.float(), 2, "channel")
    assert f32.s.dtype == torch.float64  # float64 maths whatever the weight's dtype


# ------------------------------------------------------------------ Tucker-2

@pytest.mark.parametrize("shape,groups", SHAPES)
def test_tucker_error_table_is_every_truncation(shape, groups):
    """err^2 = ||W||^2 - ||core[:R_out, :R_in]||^2 for every pair, checked by rebuilding."""
    w = seeded(shape, 2)
    f = ktucker.hosvd(w, groups)
    assert f.ranks == ktucker.full_ranks(shape, groups)
    table = ktucker.error_table(f)
    assert table.shape == f.ranks
    for r_in in range(1, f.ranks[0] + 1):
        for r_out in range(1, f.ranks[1] + 1):
            t = ktucker.truncate(f, (r_in, r_out))
            assert float(table[r_in - 1, r_out - 1]) == pytest.approx(
                rel(ktucker.rebuild(t), w), abs=TIGHT)
    assert float(table[-1, -1]) == 0.0 and rel(ktucker.rebuild(f), w) < TIGHT
    assert (table[1:] <= table[:-1] + 1e-12).all() and (table[:, 1:] <= table[:, :-1] + 1e-12).all()


@pytest.mark.parametrize("ranks", [(2, 3), (4, 2), (1, 1)])
def test_tucker_matches_tensorly_partial_tucker(ranks):
    """The same problem solved by tensorly (HOOI from the SVD start): our HOOI reaches its
    error, and our HOSVD is never better than either."""
    from tensorly.decomposition import partial_tucker
    w = seeded((8, 6, 3, 3), 3)
    r_in, r_out = ranks
    (core, factors), _ = partial_tucker(w.reshape(8, 6, 9).numpy(), rank=[r_out, r_in],
                                        modes=[0, 1], n_iter_max=100, tol=1e-13, init="svd")
    ref = np.einsum("pqk,op,iq->oik", core, factors[0], factors[1])
    e_tl = float(np.linalg.norm(w.reshape(8, 6, 9).numpy() - ref) / np.linalg.norm(w.numpy()))
    hosvd = ktucker.truncate(ktucker.hosvd(w), ranks)
    hooi = ktucker.hooi(w, ranks, iterations=100, tol=1e-14)
    assert ktucker.error(hooi) == pytest.approx(e_tl, abs=1e-7)
    assert rel(ktucker.rebuild(hooi), w) == pytest.approx(ktucker.error(hooi), abs=1e-9)
    assert ktucker.error(hosvd) >= e_tl - 1e-9


def test_hooi_never_raises_the_error_and_stops():
    w = seeded((16, 12, 3, 3), 4)
    h = ktucker.hooi(w, (4, 5), iterations=50, tol=1e-10)
    hist = h.history
    assert len(hist) >= 2 and all(b <= a + 1e-12 for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]
    assert len(hist) < 51 or hist[-2] - hist[-1] < 1e-10
    # at a stationary point gradient descent on the factors gains (almost) nothing
    start = ktucker.error(h)
    w_in, core, w_out = (t.clone().requires_grad_() for t in ktucker.factor_weights(h))
    opt = torch.optim.LBFGS([w_in, core, w_out], max_iter=20, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = (ktucker.compose(w_in, core, w_out, 1, (3, 3)) - w).pow(2).sum() / w.pow(2).sum()
        out.backward()
        return out

    opt.step(loss)
    with torch.no_grad():
        fitted = rel(ktucker.compose(w_in, core, w_out, 1, (3, 3)), w)
    assert fitted > start - 1e-3
    assert ktucker.hooi(w, (12, 16)).history == (0.0,)  # the full pair: the exact HOSVD


# ------------------------------------------------------------------ Eckart-Young

def _fit(kind: str, w: torch.Tensor, r: int, seed: int) -> float:
    """Relative error L-BFGS reaches for two factor convs of the method's form (any pair with
    R channels between them, composed by ``kernels.svd.compose``) from a random start."""
    g = torch.Generator().manual_seed(seed)
    c_out, ci, kh, kw = w.shape
    shapes = ([(r, ci, kh, kw), (c_out, r, 1, 1)] if kind == "channel"
              else [(r, ci, kh, 1), (c_out, r, 1, kw)])
    a, b = (torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes)
    opt = torch.optim.LBFGS([a, b], max_iter=40, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        out = (ksvd.compose(kind, a, b, 1, (kh, kw)) - w).pow(2).sum() / w.pow(2).sum()
        out.backward()
        return out

    opt.step(loss)
    with torch.no_grad():
        return rel(ksvd.compose(kind, a, b, 1, (kh, kw)), w)


def _als(m: np.ndarray, r: int, seed: int, steps: int = 300) -> float:
    """Relative error of alternating least squares ``m ~ P Q`` (rank r) from a random start."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((r, m.shape[1]))
    for _ in range(steps):
        p = np.linalg.lstsq(q.T, m.T, rcond=None)[0].T
        q = np.linalg.lstsq(p, m, rcond=None)[0]
    return float(np.linalg.norm(m - p @ q) / np.linalg.norm(m))


@pytest.mark.parametrize("kind", ksvd.KINDS)
def test_svd_truncation_is_optimal_among_factors_of_its_form(kind):
    """Eckart-Young: random factors, alternating least squares on numpy's reshaping and
    gradient-fitted factor convs all reach at best the truncation's error, never below."""
    w = seeded((6, 4, 3, 3), 5)
    f = ksvd.factorize(w, 1, kind)
    errs = ksvd.error_curve(f.s)
    m = (np_channel_matrix if kind == "channel" else np_spatial_matrix)(w.numpy(), 1)[0]
    g = torch.Generator().manual_seed(0)
    for r in (1, 2, 4):
        best = float(errs[r - 1])
        als = [_als(m, r, seed) for seed in range(4)]
        assert min(als) >= best - 1e-10
        assert min(als) < best + 1e-5  # the search is good enough to find the optimum
        for _ in range(20):  # random factors of rank r, optimally scaled
            a = torch.randn(r, 4, 3, 1 if kind == "spatial" else 3, generator=g,
                            dtype=torch.float64)
            b = torch.randn(6, r, 1, 3 if kind == "spatial" else 1, generator=g,
                            dtype=torch.float64)
            approx = ksvd.compose(kind, a, b, 1, (3, 3))
            scale = float((approx * w).sum() / approx.pow(2).sum())
            assert rel(scale * approx, w) > best
    for r in (1, 3):
        assert _fit(kind, w, r, seed=r) >= float(errs[r - 1]) - 1e-9


# ------------------------------------------------------------------ built layers

#: convs the three methods must reproduce exactly at full rank, with an input shape
GEOMETRIES = [
    ("2d-zeros-stride-2-1", nn.Conv2d(6, 8, 3, stride=(2, 1), padding=1), (6, 9, 8)),
    ("2d-reflect-dilation", nn.Conv2d(4, 6, (3, 5), padding=(2, 4), dilation=(1, 2),
                                      padding_mode="reflect"), (4, 10, 12)),
    ("2d-replicate-stride", nn.Conv2d(4, 6, 3, stride=(1, 2), padding=(2, 1),
                                      padding_mode="replicate", bias=False), (4, 7, 9)),
    ("2d-circular-groups", nn.Conv2d(6, 9, 3, padding=1, groups=3, padding_mode="circular"),
     (6, 8, 8)),
    ("2d-same-even", nn.Conv2d(4, 5, (2, 4), padding="same", dilation=(1, 3)), (4, 9, 13)),
    ("2d-same-reflect", nn.Conv2d(4, 5, (4, 3), padding="same", padding_mode="reflect"),
     (4, 9, 9)),
    ("2d-valid-bias", nn.Conv2d(3, 7, (3, 2), padding="valid"), (3, 8, 8)),
    ("2d-depthwise", nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 7, 7)),
    ("1d-replicate-groups", nn.Conv1d(6, 8, 5, stride=2, padding=2, groups=2,
                                      padding_mode="replicate"), (6, 30)),
    ("3d-reflect-stride", nn.Conv3d(3, 4, 3, stride=(2, 1, 2), padding=1,
                                    padding_mode="reflect"), (3, 6, 7, 7)),
    ("3d-circular-same", nn.Conv3d(4, 4, (3, 2, 3), padding="same", padding_mode="circular",
                                   groups=2), (4, 5, 6, 6)),
    ("2d-1x1-stride", nn.Conv2d(12, 10, 1, stride=2), (12, 8, 8)),
]
NAMES = ("tucker2", "spatial-svd", "channel-svd")


def _geometry(i):
    _, conv, shape = GEOMETRIES[i]
    return randomize(copy.deepcopy(conv), i), shape


def _dense(conv: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """The original conv's geometry on kernel ``w``, by F.conv (padding modes by F.pad)."""
    n = w.dim() - 2
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        pad = 0
    else:
        pad = conv.padding
    return FNS[n](x, w, b, conv.stride, pad, conv.dilation, conv.groups)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("i", range(len(GEOMETRIES)), ids=[g[0] for g in GEOMETRIES])
def test_exact_at_full_rank_and_equal_to_the_rebuilt_kernel(name, i):
    conv, shape = _geometry(i)
    method = methods.get(name)
    if method.skip_reason(conv) is not None:
        return  # tested below
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(i))
    call = call_of(conv, shape)
    with torch.no_grad():
        want = conv(x)
        full = method.candidates(conv, call, ranks=["full"])[0]
        layer = method.build(conv, full, 0)
        assert full.errors[0] < 1e-12 and full.energies[0] == pytest.approx(1.0)
        assert rel(layer(x), want) < EXACT, f"{name} full rank {full.full_rank}"
        assert rel(layer.weight, conv.weight) < EXACT
        # below full rank the chain computes exactly the conv with its rebuilt kernel
        small = method.candidates(conv, call, ranks=[1])[0]
        low = method.build(conv, small, 0)
        kernel = method.approx_kernel(conv, small, 0)
        assert rel(kernel, conv.weight) == pytest.approx(small.errors[0], abs=1e-6)
        got = low(x)
        assert rel(got, _dense(conv, x.double(), kernel, None if conv.bias is None
                               else conv.bias.double())) < EXACT
        assert count_macs(nn.Sequential(low), shape) == small.macs[0]
        assert sum(p.numel() for p in low.parameters()) == small.params[0]


def test_skip_reasons():
    cases = {
        "spatial-svd": [nn.Conv1d(4, 4, 3), nn.Conv2d(4, 4, 1)],
        "tucker2": [nn.Conv2d(4, 4, 1), nn.Conv3d(4, 4, 1), nn.Conv2d(4, 4, 3, groups=4)],
        "channel-svd": [nn.Conv2d(4, 4, 3, groups=4)],
    }
    for name, convs in cases.items():
        for conv in convs:
            why = methods.get(name).skip_reason(conv)
            assert isinstance(why, str) and why, (name, conv)
    # what they do take
    assert methods.get("channel-svd").skip_reason(nn.Conv2d(16, 12, 1)) is None
    assert methods.get("channel-svd").skip_reason(nn.Conv1d(4, 8, 3)) is None
    assert methods.get("spatial-svd").skip_reason(nn.Conv2d(4, 4, 3, groups=4)) is None
    assert methods.get("spatial-svd").skip_reason(nn.Conv3d(4, 4, 3)) is None
    assert methods.get("tucker2").skip_reason(nn.Conv1d(4, 8, 3)) is None


def test_spatial_svd_splits_strides_and_3d_depth_first():
    conv = randomize(nn.Conv3d(3, 4, (3, 5, 5), stride=(2, 1, 2), padding=(1, 2, 2)))
    method = methods.get("spatial-svd")
    cand = method.candidates(conv, call_of(conv, (3, 8, 9, 9)), ranks=[2])[0]
    layer = method.build(conv, cand, 0)
    assert layer.conv_v.kernel_size == (3, 1, 1) and layer.conv_v.stride == (2, 1, 1)
    assert layer.conv_v.padding == (1, 0, 0)
    assert layer.conv_h.kernel_size == (1, 5, 5) and layer.conv_h.stride == (1, 1, 2)
    assert layer.conv_h.padding == (0, 2, 2) and layer.conv_h.bias is not None
    assert layer.conv_v.bias is None


def test_channel_svd_compresses_a_wide_1x1():
    conv = randomize(nn.Conv2d(64, 64, 1))
    method = methods.get("channel-svd")
    cand = method.candidates(conv, call_of(conv, (64, 8, 8)))[0]
    assert cand.full_rank == 64 and cand.ranks[-1] == 64
    cheaper = cand.ranks[:-1]
    assert cheaper == list(range(1, 32))  # R * (64 + 64) < 64 * 64
    assert all(m < 64 * 64 * 64 for m in cand.macs[:-1])


# ------------------------------------------------------------------ candidates and planning

def test_tucker2_rank_rules_and_menu():
    conv = randomize(nn.Conv2d(16, 24, 3, padding=1))
    method = methods.get("tucker2")
    call = call_of(conv, (16, 8, 8))
    full = (16, 24)
    assert method.candidates(conv, call, ranks=[4])[0].ranks == [(4, 4)]
    assert method.candidates(conv, call, ranks=[20])[0].ranks == [(16, 20)]
    assert method.candidates(conv, call, ranks=[100])[0].ranks == [full]
    assert method.candidates(conv, call, ranks=["full"])[0].ranks == [full]
    assert method.candidates(conv, call, ranks=[(3, 5)])[0].ranks == [(3, 5)]
    with pytest.raises(ValueError):
        method.candidates(conv, call, ranks=[0])
    menu = method.candidates(conv, call)[0]
    macs0, params0 = 24 * 16 * 9 * 64, 24 * 16 * 9 + 24
    assert menu.ranks[-1] == full and menu.full_rank == full
    assert all(m < macs0 or p < params0 for m, p in zip(menu.macs[:-1], menu.params[:-1]))
    assert menu.macs[:-1] == sorted(menu.macs[:-1])
    assert len(menu) <= 4 * method.menu_size + 1
    table = ktucker.error_table(ktucker.hosvd(conv.weight))
    for r, e, en in zip(menu.ranks, menu.errors, menu.energies):
        assert e == pytest.approx(float(table[r[0] - 1, r[1] - 1]), abs=1e-12)
        assert en == pytest.approx(1 - e * e, abs=1e-12)
    # the cheapest pair and the most accurate pair cheaper than the original are offered
    from decompose.methods.tucker2 import costs
    ri, ro = torch.meshgrid(torch.arange(1, 17), torch.arange(1, 25), indexing="ij")
    macs, params = costs(conv, call, ri, ro)
    assert menu.ranks[0] == (1, 1)
    assert min(menu.errors[:-1]) == pytest.approx(float(table[macs < macs0].min()), abs=1e-12)
    assert min(menu.errors[:-1]) <= float(table[params < params0].min()) + 1e-12


def test_tucker2_hooi_option_refines_every_offer():
    conv = randomize(nn.Conv2d(8, 8, 3, padding=1))
    call = call_of(conv, (8, 6, 6))
    plain = methods.get("tucker2").candidates(conv, call, ranks=[3])[0]
    refined_method = Tucker2(hooi_iterations=20)
    refined = refined_method.candidates(conv, call, ranks=[3])[0]
    assert refined.errors[0] <= plain.errors[0]
    layer = refined_method.build(conv, refined, 0)
    assert rel(layer.weight.detach(), conv.weight) == pytest.approx(refined.errors[0], abs=1e-5)
    with pytest.raises(ValueError):
        Tucker2(hooi_iterations=-1)


@pytest.mark.parametrize("name", ["spatial-svd", "channel-svd"])
def test_svd_menu_is_every_cheaper_rank_then_full(name):
    conv = randomize(nn.Conv2d(8, 12, 3, stride=2, padding=1))
    method = methods.get(name)
    call = call_of(conv, (8, 10, 10))
    c = method.candidates(conv, call)[0]
    macs0, params0 = 12 * 8 * 9 * 25, 12 * 8 * 9 + 12
    cheaper = [r for r, m, p in zip(c.ranks, c.macs, c.params) if m < macs0 or p < params0]
    assert c.ranks == cheaper + [c.full_rank] or c.ranks == cheaper
    assert cheaper == list(range(1, len(cheaper) + 1))
    assert c.errors == sorted(c.errors, reverse=True)


@pytest.mark.parametrize("name", NAMES)
def test_energy_rule_takes_the_smallest_rank_keeping_it(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    conv = model[2]
    method = methods.get(name)
    menu = method.candidates(conv, call_of(conv, (16, 8, 8)))[0]
    for energy in (0.3, 0.6, 0.9, 1.0):
        rep = decompose.plan(model, method=name, energy=energy, input_shape=(3, 8, 8),
                             exclude=("0",))
        lp = rep.layers[1]
        keeping = [(r, m) for r, e, m in zip(menu.ranks, menu.energies, menu.macs)
                   if e >= energy - 1e-9]
        rank, macs = keeping[0]
        if macs < lp.macs_before:
            assert lp.skipped is None and lp.rank == rank and lp.energy >= energy - 1e-9
        else:
            assert lp.skipped is not None and "not fewer" in lp.skipped
    # the SVDs' energies are the kept squared singular values, as numpy computes them
    if name != "tucker2":
        m = (np_channel_matrix if name == "channel-svd" else np_spatial_matrix)(
            conv.weight.detach().double().numpy(), 1)
        s2 = np.linalg.svd(m, compute_uv=False)[0] ** 2
        for r, e in zip(menu.ranks, menu.energies):
            assert e == pytest.approx(s2[:r].sum() / s2.sum(), abs=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_budget_plan_meets_the_target_and_dtype_is_kept(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1)).double().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    rep = decompose.decompose_(model, method=name, target_macs=0.4, input_shape=(3, 16, 16),
                               exclude=("0",))
    budgeted = rep.layers[1:]
    assert sum(lp.macs_after for lp in budgeted) <= 0.4 * sum(lp.macs_before for lp in budgeted)
    assert rep.decomposed and all(lp.method == name for lp in rep.decomposed)
    for lp in rep.decomposed:
        layer = model.get_submodule(lp.name)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        assert rel(layer.weight.detach(), original.get_submodule(lp.name).weight) == \
            pytest.approx(lp.kernel_error, abs=1e-9)
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("name", NAMES)
def test_compose_is_differentiable(name):
    conv = randomize(nn.Conv2d(6, 8, 3, padding=1))
    method = methods.get(name)
    cand = method.candidates(conv, call_of(conv, (6, 8, 8)), ranks=[2])[0]
    layer = method.build(conv, cand, 0)
    w, b = layer.compose()
    (w.pow(2).sum() + b.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_a_decomposed_layer_is_not_decomposed_again():
    """The factor convs of these methods are regular convs; planning a model that already
    holds them leaves them alone, with the reason."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    decompose.decompose_(model, method="tucker2", rank=4, input_shape=(3, 8, 8), exclude=("0",))
    rep = decompose.plan(model, method="auto", target_macs=0.6, input_shape=(3, 8, 8))
    parts = {lp.name: lp.skipped for lp in rep.layers if lp.name.startswith("2.")}
    assert set(parts) == {"2.conv_in", "2.conv_core", "2.conv_out"}
    assert all("already decomposed by tucker2" in why for why in parts.values())
    assert [lp.name for lp in rep.decomposed] == ["0"]
