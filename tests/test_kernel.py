"""Kernel maths: exactness, error formula, monotonicity and optimality of the per-channel SVD."""

from __future__ import annotations

import pytest
import torch

from decompose.kernels.nd import (
    depthwise_pointwise_weights,
    energy_curve,
    error_curve,
    factorize,
    rank_for_energy,
    rebuild,
    singular_values,
)

ORDERS = ["dw-pw", "pw-dw"]
SHAPES = [((6, 4, 3, 3), 1), ((6, 2, 3, 3), 2), ((8, 3, 5), 1), ((4, 4, 3, 3, 3), 1),
          ((9, 3, 2, 4), 3)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape,groups", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_full_rank_rebuild_is_exact(order, shape, groups, dtype, tol):
    w = torch.randn(shape, dtype=dtype)
    f = factorize(w, groups, order)
    assert rel(rebuild(f, f.max_rank), w) < tol
    assert error_curve(f.s)[-1] < 10 * tol


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape,groups", SHAPES)
def test_reported_error_equals_rebuilt_error_and_is_monotone(order, shape, groups):
    w = torch.randn(shape, dtype=torch.float64)
    f = factorize(w, groups, order)
    errs = error_curve(f.s)
    for t in range(1, f.max_rank + 1):
        assert abs(rel(rebuild(f, t), w) - float(errs[t - 1])) < 1e-10
    assert all(errs[i + 1] <= errs[i] + 1e-12 for i in range(len(errs) - 1))
    en = energy_curve(f.s)
    assert torch.allclose(en, 1 - errs**2, atol=1e-10)


def test_max_rank_is_min_of_channels_and_taps():
    w = torch.randn(5, 12, 3, 3)
    assert factorize(w, 1, "dw-pw").max_rank == 5  # min(C_out, K)
    assert factorize(w, 1, "pw-dw").max_rank == 9  # min(C_in, K)
    assert singular_values(w, 1, "dw-pw").shape == (12, 5)


def test_rank_for_energy():
    s = torch.tensor([[2.0, 1.0, 0.0]])  # energies 0.8, 1.0, 1.0
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 0.8) == 1
    assert rank_for_energy(s, 0.81) == 2
    assert rank_for_energy(s, 1.0) == 2


def test_signs_are_deterministic():
    w = torch.randn(6, 4, 3, 3)
    a = factorize(w, 1, "dw-pw")
    b = factorize(w.clone(), 1, "dw-pw")
    assert torch.equal(a.vh, b.vh)
    idx = a.vh.abs().argmax(-1, keepdim=True)
    assert (torch.gather(a.vh, -1, idx) > 0).all()


def _random_blocks_error(w, groups, order, t, gen):
    """Error of a random sum of T separable blocks of the same order (best pointwise fit)."""
    from decompose.kernels.nd import slices
    m = slices(w, groups, order)  # (n, a, K)
    v = torch.randn(m.shape[0], m.shape[2], t, dtype=w.dtype, generator=gen)  # random filters
    # best coefficients for these filters: least squares M ~ C V^T
    c = m @ v @ torch.linalg.pinv(v.transpose(1, 2) @ v)
    approx = c @ v.transpose(1, 2)
    return float((m - approx).norm() / m.norm())


@pytest.mark.parametrize("order", ORDERS)
def test_svd_beats_random_separable_blocks(order):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64, generator=gen)
    f = factorize(w, 2, order)
    for t in (1, 2, 3):
        best = float(error_curve(f.s)[t - 1])
        for _ in range(50):
            assert best <= _random_blocks_error(w, 2, order, t, gen) + 1e-12


@pytest.mark.parametrize("order", ORDERS)
def test_svd_beats_gradient_descent_on_factors(order):
    """A few hundred Adam steps on free factors of T separable blocks never beat the SVD."""
    from decompose.kernels.nd import slices
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64, generator=gen)
    m = slices(w, 1, order)
    for t in (1, 2):
        best = float(error_curve(factorize(w, 1, order).s)[t - 1])
        a = torch.randn(m.shape[0], m.shape[1], t, dtype=w.dtype, generator=gen, requires_grad=True)
        b = torch.randn(m.shape[0], t, m.shape[2], dtype=w.dtype, generator=gen, requires_grad=True)
        opt = torch.optim.Adam([a, b], lr=0.05)
        for _ in range(400):
            opt.zero_grad()
            loss = ((m - a @ b) ** 2).sum()
            loss.backward()
            opt.step()
        gd = float(((m - a @ b).norm() / m.norm()).detach())
        assert best <= gd + 1e-9
        assert gd < best * 1.5  # the descent did converge near the optimum: a real comparison


@pytest.mark.parametrize("order", ORDERS)
def test_weights_layout_matches_rebuild(order):
    """The two convs' weights multiply back to the rank-T kernel."""
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    f = factorize(w, 3, order)
    first, second = depthwise_pointwise_weights(f, 2)
    if order == "dw-pw":
        assert first.shape == (6 * 2, 1, 3, 3) and second.shape == (6, 2 * 2)
    else:
        assert first.shape == (6 * 2, 2) and second.shape == (6, 2, 3, 3)
