"""ND with both orders in one layer (``nd-mixed``): the alternating projections and the layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import decompose
from decompose.kernels.nd import error_curve, mixed, project, singular_values
from decompose.methods import get


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("groups", [1, 2])
def test_projection_is_the_truncated_svd(groups):
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)  # C_in = 6 * groups
    for order in ("dw-pw", "pw-dw"):
        for t in (1, 2, 3):
            got = project(w, groups, order, t)
            want = error_curve(singular_values(w, groups, order))[t - 1]
            assert _rel(got, w) == pytest.approx(float(want), abs=1e-10)


def test_never_worse_than_either_order_alone_and_recovers_an_exact_mixture():
    torch.manual_seed(0)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    e_dw = error_curve(singular_values(w, 1, "dw-pw"))
    e_pw = error_curve(singular_values(w, 1, "pw-dw"))
    for a, b in [(1, 1), (2, 2), (1, 3)]:
        _, _, err, _ = mixed(w, 1, a, b)
        assert err <= min(float(e_dw[a - 1]), float(e_pw[b - 1])) + 1e-12
        assert err < min(float(e_dw[a + b - 1]), float(e_pw[a + b - 1]))  # better at T terms
    # a kernel that *is* 2 dw-pw terms + 2 pw-dw terms is found (to the iteration budget)
    small = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    exact = project(torch.randn_like(small), 1, "dw-pw", 2) + project(
        torch.randn_like(small), 1, "pw-dw", 2)
    _, _, err, _ = mixed(exact, 1, 2, 2, iterations=200, tol=1e-12)
    assert err < 0.02


def test_layer_sums_two_branches_and_composes_exactly():
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 16, 3, padding=1).eval()
    model = nn.Sequential(conv)
    rep = decompose.decompose_(model, method="nd-mixed", rank=4, input_shape=(16, 9, 9))
    (lp,) = rep.decomposed
    layer = model[0]
    assert lp.rank == layer.rank and sum(layer.rank) == 4 and min(layer.rank) >= 1
    assert set(dict(layer.terms.named_children())) == {"dw_pw", "pw_dw"}
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        y = layer(x)
        dense = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    assert _rel(dense, y) < 1e-5
    assert get("nd-mixed").composable(layer)
