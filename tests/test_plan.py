"""Planning and the in-place API: costs, skip reasons, rank rules, budgets, reported numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_cnn
from torch import nn

import decompose
from decompose import DecomposeConfig, DecomposeError
from decompose.engine.trace import count_macs, param_count
from decompose.methods.nd.layers import is_decoupled
from decompose.planning.plan import choose_order

SHAPE = (3, 16, 16)


def kernel_of(seq: nn.Sequential, groups: int) -> torch.Tensor:
    """Rebuild the dense kernel a decoupled module computes, from its own weights."""
    names = list(seq._modules)
    dw, pw = seq.conv_dw, seq.conv_pw
    k = dw.kernel_size
    if names[0] == "conv_dw":  # dw-pw: W[o, c] = sum_t pw[o, c*T + t] * dw[c*T + t]
        c_in = dw.in_channels
        t = dw.out_channels // c_in
        c_out = pw.out_channels
        dww = dw.weight.reshape(c_in, t, -1)
        pww = pw.weight.reshape(c_out, c_in // groups, t)
        c_out_g = c_out // groups
        w = torch.zeros(c_out, c_in // groups, dww.shape[-1], dtype=dww.dtype)
        for o in range(c_out):
            g = o // c_out_g
            for ci in range(c_in // groups):
                w[o, ci] = (pww[o, ci, :, None] * dww[g * (c_in // groups) + ci]).sum(0)
        return w.reshape(c_out, c_in // groups, *k)
    c_out = dw.out_channels
    t = dw.in_channels // c_out
    pww = pw.weight.reshape(c_out, t, -1)   # (o, t, C_in/g)
    dww = dw.weight.reshape(c_out, t, -1)   # (o, t, K)
    return torch.einsum("oti,otk->oik", pww, dww).reshape(c_out, -1, *k)


def test_reported_macs_and_params_match_independent_counts(tiny):
    before_macs = count_macs(tiny, SHAPE)
    before_params = param_count(tiny)
    rep = decompose.decompose_(tiny, rank=2, input_shape=SHAPE)
    t = rep.totals
    assert t["macs_before"] == before_macs
    assert t["macs_after"] == count_macs(tiny, SHAPE)
    assert t["params_before"] == before_params
    assert t["params_after"] == param_count(tiny)
    for lp in rep.decomposed:
        m = tiny.get_submodule(lp.name)
        assert is_decoupled(m)
        assert lp.params_after == param_count(m)


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw", "auto"])
def test_reported_kernel_error_is_the_built_layers_error(order):
    model = tiny_cnn().double()
    ref = copy.deepcopy(model)
    rep = decompose.decompose_(model, rank=2, order=order, input_shape=SHAPE)
    assert rep.decomposed
    for lp in rep.decomposed:
        w = ref.get_submodule(lp.name).weight
        built = kernel_of(model.get_submodule(lp.name), lp.groups)
        err = float((built - w).norm() / w.norm())
        assert abs(err - lp.kernel_error) < 1e-10
        assert abs(lp.energy - (1 - lp.kernel_error ** 2)) < 1e-10


def test_skip_reasons(tiny):
    rep = decompose.plan(tiny, rank=1, input_shape=SHAPE, exclude=("0",))
    why = {lp.name: lp.skipped for lp in rep.layers}
    assert why["0"].startswith("excluded")
    assert why["3"] is None
    assert "1x1" in why["5"]
    assert "depthwise" in why["7"]
    assert why["9"] is None
    rep = decompose.plan(tiny, rank=1, input_shape=SHAPE, include=("9",))
    assert [lp.name for lp in rep.decomposed] == ["9"]


def test_rank_that_does_not_save_macs_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))  # original 3*4*9 = 108 per pixel
    rep = decompose.plan(model, rank=9, order="dw-pw", input_shape=(3, 8, 8))
    # dw-pw full rank 4: 4 * 3 * (9 + 4) = 156 per pixel > 108
    assert rep.layers[0].skipped and "not fewer" in rep.layers[0].skipped


def test_plan_does_not_change_model_and_copy_api(tiny):
    ref = copy.deepcopy(tiny)
    decompose.plan(tiny, rank=1, input_shape=SHAPE)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), tiny.state_dict().values()))
    new, rep = decompose.api.decompose(tiny, rank=1, input_shape=SHAPE)
    assert not any(is_decoupled(m) for m in tiny.modules())
    assert any(is_decoupled(m) for m in new.modules())


def test_full_rank_model_is_exact():
    model = tiny_cnn().double().eval()
    ref = copy.deepcopy(model)
    decompose.decompose_(model, rank=9, order="pw-dw", input_shape=SHAPE)
    x = torch.randn(4, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        assert float((model(x) - ref(x)).abs().max() / ref(x).abs().max()) < 1e-10


def test_energy_rule_reaches_energy(tiny):
    rep = decompose.plan(tiny, energy=0.7, input_shape=SHAPE, order="dw-pw")
    for lp in rep.decomposed:
        assert lp.energy >= 0.7 - 1e-9
        if lp.rank > 1:  # one less would not be enough
            from decompose.kernels.nd import energy_curve, singular_values
            conv = tiny.get_submodule(lp.name)
            e = energy_curve(singular_values(conv.weight, conv.groups, "dw-pw"))
            assert e[lp.rank - 2] < 0.7


def _sq_err(rep):
    return sum(lp.kernel_error ** 2 for lp in rep.layers if lp.skipped is None or "budget" in lp.skipped)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_macs_budget_is_met_and_beats_uniform_ranks(fraction):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    shape = (8, 12, 12)
    rep = decompose.plan(model, target_macs=fraction, input_shape=shape)
    budget = fraction * sum(lp.macs_before for lp in rep.layers)
    spent = sum(lp.macs_after for lp in rep.layers)
    assert spent <= budget
    # no uniform rank (in any fixed order) meeting the same budget has a lower total squared error
    for order in ("dw-pw", "pw-dw"):
        for t in range(1, 10):
            uni = decompose.plan(model, rank=t, order=order, input_shape=shape)
            if sum(lp.macs_after for lp in uni.layers) <= budget:
                assert _sq_err(rep) <= _sq_err(uni) + 1e-12


def test_params_budget_is_met():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    rep = decompose.plan(model, target_params=0.4, input_shape=(8, 8, 8))
    before = sum(lp.params_before for lp in rep.layers)
    assert sum(lp.params_after for lp in rep.layers) <= 0.4 * before


def test_unreachable_budget_says_so():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    with pytest.raises(DecomposeError, match="cannot be met"):
        decompose.plan(model, target_macs=0.01, input_shape=(8, 8, 8))


def test_auto_order_rule():
    assert choose_order({"dw-pw": (1, 0.5, 100), "pw-dw": (1, 0.4, 100)}) == "pw-dw"
    assert choose_order({"dw-pw": (1, 0.5, 90), "pw-dw": (1, 0.4, 100)}) == "dw-pw"
    assert choose_order({"dw-pw": (1, 0.4, 90), "pw-dw": (1, 0.5, 100)}) == "dw-pw"
    assert choose_order({"dw-pw": (1, 0.4, 100), "pw-dw": (1, 0.4, 90)}) == "pw-dw"
    assert choose_order({"pw-dw": (1, 0.4, 90)}) == "pw-dw"


def test_auto_picks_lower_error_on_square_layers(tiny):
    auto = decompose.plan(tiny, rank=1, input_shape=SHAPE)
    both = {o: decompose.plan(tiny, rank=1, order=o, input_shape=SHAPE) for o in ("dw-pw", "pw-dw")}
    for lp in auto.decomposed:
        errs = {o: next(x for x in r.layers if x.name == lp.name) for o, r in both.items()}
        cheapest = min(e.macs_after for e in errs.values())
        if all(e.macs_after == cheapest for e in errs.values()):
            assert math.isclose(lp.kernel_error, min(e.kernel_error for e in errs.values()))


def test_nan_weights_are_refused(tiny):
    with torch.no_grad():
        tiny[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(DecomposeError, match="NaN or Inf"):
        decompose.plan(tiny, rank=1, input_shape=SHAPE)


def test_wrong_input_shape_is_one_line(tiny):
    with pytest.raises(DecomposeError, match="--input-shape"):
        decompose.plan(tiny, rank=1, input_shape=(5, 16, 16))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"), (dict(rank=-1), "rank"), (dict(rank=1.5), "rank"),
    (dict(energy=0), "energy"), (dict(energy=1.2), "energy"),
    (dict(target_macs=1.0), "target_macs"), (dict(target_params=0), "target_params"),
    (dict(rank=1, energy=0.5), "choose one"), (dict(order="x"), "order"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(DecomposeError, match=match):
        DecomposeConfig(**kwargs)


def test_config_json_roundtrip():
    c = DecomposeConfig(energy=0.8, order="pw-dw", exclude=("conv1",), input_shape=(3, 32, 32))
    assert DecomposeConfig.from_dict(c.to_dict()) == c


def test_filter_fn_and_overrides(tiny):
    rep = decompose.plan(tiny, rank=1, input_shape=SHAPE, filter_fn=lambda m, n: n != "3",
                         rank_overrides={"9": 2})
    why = {lp.name: lp for lp in rep.layers}
    assert why["3"].skipped == "excluded by filter_fn"
    assert why["9"].rank == 2 and why["0"].rank == 1


def test_conv1d_and_conv3d_models():
    m1 = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3))
    rep = decompose.decompose_(m1, rank=1, input_shape=(4, 32))
    assert rep.totals["macs_after"] == count_macs(m1, (4, 32))
    m3 = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.Conv3d(6, 6, 3, stride=2))
    rep = decompose.decompose_(m3, rank=2, input_shape=(2, 8, 8, 8))
    assert rep.totals["layers_decomposed"] == 2
    assert rep.totals["macs_after"] == count_macs(m3, (2, 8, 8, 8))


def test_fold_bn_then_decompose_is_exact_at_full_rank():
    model = tiny_cnn().double().eval()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    ref = copy.deepcopy(model)
    rep = decompose.decompose_(model, rank=9, order="pw-dw", fold_bn=True, input_shape=SHAPE)
    assert rep.folded_bn == [["0", "1"]]
    assert isinstance(model[1], nn.Identity)
    assert rep.totals["params_before"] == param_count(ref)
    x = torch.randn(3, *SHAPE, dtype=torch.float64)
    with torch.no_grad():
        assert float((model(x) - ref(x)).abs().max() / ref(x).abs().max()) < 1e-10
    dry = decompose.plan(ref, rank=1, fold_bn=True, input_shape=SHAPE)
    assert dry.folded_bn == [["0", "1"]] and isinstance(ref[1], nn.BatchNorm2d)
