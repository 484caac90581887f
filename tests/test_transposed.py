"""Transposed convolutions: counted, planned, decoupled exactly at full rank, calibrated,
measured, saved and exported like regular ones (the per-method contract is in
tests/test_methods.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decompose
from decompose import methods
from decompose.engine.trace import count_macs, trace
from decompose.kernels import lstsq
from decompose.kernels.transposed import adjoint, patches
from decompose.methods import LowRankConv

EXACT = 1e-4
T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
C = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
    return model.eval()


def unet(dim: int = 2) -> nn.Module:
    """A small U-Net-like model: strided convs down, transposed convs (stride 2,
    output_padding, groups, dilation) back up."""
    c, t = C[dim], T[dim]
    return _randomise(nn.Sequential(
        c(3, 8, 3, padding=1), nn.ReLU(),
        c(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        t(16, 12, 3, stride=2, padding=1, output_padding=1, groups=2), nn.ReLU(),
        t(12, 8, 3, padding=2, dilation=2), nn.ReLU(),
        t(8, 4, 2, stride=2, bias=False)))


SHAPES = {1: (3, 16), 2: (3, 8, 10), 3: (3, 4, 6, 6)}


def hook_macs(model: nn.Module, shape) -> int:
    """An independent count: regular convs per output position, transposed convs per input
    position (fvcore's rule), linear layers per output row."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        x = args[0]
        k = math.prod(m.kernel_size)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            total += m.in_channels * (m.out_channels // m.groups) * k * math.prod(x.shape[2:])
        else:
            total += m.out_channels * (m.in_channels // m.groups) * k * math.prod(out.shape[2:])

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, nn.modules.conv._ConvNd)]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hs:
        h.remove()
    return total


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("kw", [
    dict(stride=2, padding=1, output_padding=1),
    dict(stride=(2, 3), padding=(1, 2), output_padding=(1, 0), dilation=(2, 1), groups=2),
    dict(stride=1, padding=3),  # padding beyond d(k-1): the zero-stuffed input is cropped
    dict(stride=3, padding=0, output_padding=2, dilation=2),
])
def test_patches_and_adjoint_write_a_transposed_conv_as_least_squares_rows(kw):
    torch.manual_seed(0)
    g = kw.get("groups", 1)
    conv = nn.ConvTranspose2d(4, 6, 3, **kw).double()
    x = torch.randn(2, 4, 5, 6, dtype=torch.double)
    y = conv(x) - conv.bias.reshape(1, -1, 1, 1)
    a = adjoint(conv.weight, g)
    assert a.shape == (6, 4 // g, 3, 3) and torch.equal(adjoint(a, g), conv.weight)
    u = lstsq.patches(x, conv)  # dispatches to the transposed patches
    got = torch.einsum("pgi,goi->pgo", u, a.reshape(g, 6 // g, -1))
    assert (got - lstsq.pixels(y, g)).abs().max() < 1e-12
    rows = torch.tensor([0, len(u) // 2, len(u) - 1])
    assert torch.equal(patches(x, conv, rows), u[rows])


# ----------------------------------------------------------------------------- counting


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_macs_and_params_count_transposed_convs(dim):
    model, shape = unet(dim), SHAPES[dim]
    assert count_macs(model, shape) == hook_macs(model, shape)
    rep = decompose.plan(model, rank=1, input_shape=shape)
    assert rep.totals["macs_before"] == hook_macs(model, shape)
    assert rep.totals["params_before"] == sum(p.numel() for p in model.parameters())
    rows = {lp.name: lp for lp in rep.layers}
    assert [n for n, lp in rows.items() if lp.transposed] == ["4", "6", "8"]
    assert sum(lp.macs_before for lp in rep.layers) == rep.totals["macs_before"]
    decompose.decompose_(model, rank=1, input_shape=shape)
    assert rep.totals["macs_after"] == count_macs(model, shape) == hook_macs(model, shape)


def test_the_report_marks_transposed_rows():
    rep = decompose.plan(unet(2), rank=1, input_shape=SHAPES[2])
    assert rep.to_dict()["layers"][2]["transposed"] is True
    assert rep.to_dict()["layers"][0]["transposed"] is False
    assert "16x6x3x3 T" in str(rep)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_full_rank_decouples_a_unet_exactly_in_both_orders(dim, order):
    model, shape = unet(dim), SHAPES[dim]
    x = torch.randn(2, *shape)
    with torch.no_grad():
        want = model(x)
    rep = decompose.decompose_(model, rank="full", order=order, input_shape=shape)
    assert [lp.skipped for lp in rep.layers] == [None] * 5
    assert rep.output_check["rel_error"] < EXACT
    for name in ("4", "6", "8"):
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankConv) and layer.transposed
        assert layer.variant == order
        assert isinstance(layer.conv_dw, T[dim]) and isinstance(layer.conv_pw, C[dim])
    with torch.no_grad():
        assert _rel(model(x), want) < EXACT


def test_a_drop_in_carries_the_transposed_geometry_and_weight():
    conv = _randomise(nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1,
                                         groups=2))
    model = nn.Sequential(copy.deepcopy(conv))
    decompose.decompose_(model, rank="full", input_shape=(6, 5, 5))
    layer = model[0]
    assert layer.transposed is True and layer.output_padding == (1, 1)
    assert layer.weight.shape == conv.weight.shape == (6, 2, 3, 3)
    assert _rel(layer.weight, conv.weight) < EXACT
    x = torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        got = F.conv_transpose2d(x, layer.weight, layer.bias, 2, 1, 1, 2)
        assert _rel(got, layer(x)) < EXACT


def test_methods_without_transposed_support_say_so():
    conv = nn.ConvTranspose2d(6, 4, 3)
    for name in methods.names():
        m = methods.get(name)
        why = methods.skip_reason(m, conv)
        assert (why is None) == m.supports_transposed, name
        if why is not None:
            assert "transposed" in why and "nd" in why
    rep = decompose.plan(nn.Sequential(conv), method="tucker2", rank=1, input_shape=(6, 5, 5))
    assert "transposed conv" in rep.layers[0].skipped


def test_called_with_output_size_is_skipped_with_the_reason():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=[2 * x.shape[2], 2 * x.shape[3]])

    rep = decompose.plan(Up(), rank=1, input_shape=(4, 5, 5))
    assert "output_size" in rep.layers[0].skipped


# ----------------------------------------------------------------------------- the rest


@pytest.mark.parametrize("how", ["joint", "last"])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_calibration_refits_transposed_layers(how, order):
    torch.manual_seed(3)
    original = unet(2)
    g = torch.Generator().manual_seed(4)
    base = F.avg_pool2d(torch.randn(80, 3, 8, 10, generator=g), 3, 1, 1)
    calib, held = list(base[:64].split(16)), base[64:]
    cfg = decompose.DecomposeConfig(rank=1, order=order, input_shape=(3, 8, 10),
                                    exclude=("0", "2"))
    plain = copy.deepcopy(original)
    decompose.decompose_(plain, cfg)
    fitted = copy.deepcopy(original)
    rep = decompose.decompose_(fitted, cfg, calibration=calib, progress=False,
                               calibration_config=decompose.CalibrationConfig(samples=64,
                                                                              method=how))
    layers = {lc["name"]: lc for lc in rep.calibration["layers"]}
    assert set(layers) == {lp.name for lp in rep.decomposed} and not rep.calibration["skipped"]
    assert {"4", "6"} <= set(layers)  # the transposed ones among them
    for lc in layers.values():
        assert lc["error_after"] <= lc["error_before"] + 1e-9
    with torch.no_grad():
        ref = original(held)
        assert _rel(fitted(held), ref) < _rel(plain(held), ref)


@pytest.mark.parametrize("name", ["4", "6"])  # groups 2, and groups 1 (options stacked)
def test_output_error_curves_of_a_transposed_conv_are_measured(name):
    from torch.func import functional_call

    from decompose.planning.sensitivity import output_error_curves
    model = unet(2)
    x = torch.randn(8, 3, 8, 10)
    curves = output_error_curves(model, [x], samples=8)
    conv = model.get_submodule(name)
    call = trace(model, (3, 8, 10))[name]
    nd = methods.get("nd")
    inp = {}
    h = conv.register_forward_hook(lambda m, a, o: inp.update(x=a[0]))
    with torch.no_grad():
        model(x)
    h.remove()
    zero = torch.zeros(conv.out_channels)
    for order in ("dw-pw", "pw-dw"):
        cand = nd.candidates(conv, call, ranks=[1], variants=(order,))[0]
        approx = nd.approx_kernel(conv, cand, 0).float()
        with torch.no_grad():
            y = functional_call(conv, {"weight": conv.weight, "bias": zero}, (inp["x"],))
            e = functional_call(conv, {"weight": conv.weight - approx, "bias": zero},
                                (inp["x"],))
        assert curves[name][f"nd/{order}"]["1"] == pytest.approx(float(e.norm() / y.norm()),
                                                                 rel=1e-4)
    rep = decompose.decompose_(copy.deepcopy(model), target_macs=0.6, allocation="output",
                               input_shape=(3, 8, 10), calibration=[x], progress=False)
    assert rep.allocation is not None


def test_budgets_forms_and_latency_planning_treat_transposed_layers_like_others():
    model = unet(2)
    rep = decompose.decompose_(copy.deepcopy(model), target_macs=0.5, input_shape=(3, 8, 10))
    assert any(lp.transposed and lp.skipped is None for lp in rep.layers)
    calls = []

    def fake(name, label, module, x):
        calls.append((name, label))
        return 1.0 if label == "original" else 0.5

    rep = decompose.decompose_(copy.deepcopy(model), rank=1, form="fastest", latency_aware=True,
                               input_shape=(3, 8, 10), latency_fn=fake)
    for lp in rep.layers:
        assert lp.skipped is None
        if lp.transposed:
            assert lp.form == "plain"
    assert ("4", "nd/pw-dw/T1/plain") in calls or ("4", "nd/dw-pw/T1/plain") in calls


def test_decoupled_transposed_model_saves_loads_and_exports(tmp_path):
    model = unet(3)
    shape = SHAPES[3]
    rep = decompose.decompose_(model, rank=2, input_shape=shape)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        want = model(x)
    decompose.save(model, tmp_path / "u.pt", rep)
    back = decompose.load(tmp_path / "u.pt")
    with torch.no_grad():
        assert torch.equal(back(x), want)
    assert back[4].transposed
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), want, atol=1e-5, rtol=1e-5)
    pytest.importorskip("onnxruntime")
    from decompose.io.export import export_onnx
    res = export_onnx(model, tmp_path / "u.onnx", shape)
    assert res.max_rel_err < 1e-4


def test_fine_tuning_trains_a_decoupled_transposed_layer_in_its_plain_form():
    from decompose.recover.finetune._train_form import wanted
    model = unet(2)
    decompose.decompose_(model, rank=2, input_shape=SHAPES[2])
    assert not wanted(model[4], "dense", torch.device("cpu"))  # no dense form: trains plain
    assert wanted(model[2], "dense", torch.device("cpu"))
