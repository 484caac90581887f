"""The method contract: every registered method, on every kind of conv it accepts.

A method that cannot factor a conv must say why (a skip reason); one that can must offer
candidates whose reported errors, multiply-adds and parameters are those of the layer it
builds, build a drop-in LowRankConv (the conv's geometry, ``weight`` = the kernel it computes),
reproduce the conv at its full rank where it has one, and survive the safe loader, ONNX and
torch.export. Method-specific maths (optimality, convergence) is tested beside each method.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decompose
from decompose import methods
from decompose.engine.trace import count_macs, trace
from decompose.methods import LowRankConv
from decompose.methods.convs import run_conv

EXACT = 1e-4  # relative error allowed where a method is exact (float32 rounding)

#: (id, conv, one sample's input shape)
CASES = [
    ("2d", nn.Conv2d(6, 8, 3, padding=1), (6, 10, 10)),
    ("2d-bias-off-stride", nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), (6, 11, 11)),
    ("2d-dilation-reflect", nn.Conv2d(6, 8, 3, padding=2, dilation=2, padding_mode="reflect"),
     (6, 12, 12)),
    ("2d-groups-circular", nn.Conv2d(8, 12, 3, padding=1, groups=2, padding_mode="circular"),
     (8, 9, 9)),
    ("2d-rect-same", nn.Conv2d(5, 7, (3, 5), padding="same"), (5, 9, 11)),
    ("2d-one-input-channel", nn.Conv2d(1, 8, 3), (1, 12, 12)),
    ("1d", nn.Conv1d(6, 10, 5, stride=2, padding=2, padding_mode="replicate"), (6, 40)),
    ("3d", nn.Conv3d(4, 6, 3, padding=1), (4, 6, 7, 7)),
    ("2d-1x1", nn.Conv2d(16, 12, 1), (16, 6, 6)),
    # transposed convs: every method factors them exactly at full rank or says why not
    ("t1d-stride-outpad", nn.ConvTranspose1d(6, 10, 5, stride=2, padding=2, output_padding=1),
     (6, 13)),
    ("t2d-groups-dilation", nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1,
                                               groups=2, dilation=2), (8, 7, 7)),
    ("t2d-rect-nobias", nn.ConvTranspose2d(5, 7, (2, 3), stride=(2, 1), padding=(0, 1),
                                           bias=False), (5, 6, 5)),
    ("t3d", nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=(1, 0, 1)),
     (4, 4, 5, 4)),
    ("t2d-1x1-stride", nn.ConvTranspose2d(6, 4, 1, stride=2), (6, 5, 5)),
]
IDS = [c[0] for c in CASES]


def _case(i: int) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(i)
    _, conv, shape = CASES[i]
    conv = copy.deepcopy(conv).eval()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn_like(p))
    return conv, shape


def _call(conv: nn.Module, shape: tuple[int, ...]):
    return trace(nn.Sequential(conv), shape)["0"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _usable(name: str, conv: nn.Module) -> bool:
    why = methods.skip_reason(methods.get(name), conv)
    if why is not None:
        assert isinstance(why, str) and why, f"{name}: a skip needs a reason"
        return False
    return True


@pytest.mark.parametrize("name", methods.names())
@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_full_rank_is_exact_and_a_drop_in(name, i):
    conv, shape = _case(i)
    if not _usable(name, conv):
        return
    method = methods.get(name)
    x = torch.randn(3, *shape)
    cands = method.candidates(conv, _call(conv, shape), ranks=["full"])
    assert cands, f"{name} offers no candidate for {IDS[i]}"
    for c in cands:
        assert len(c) == 1 and c.method == name
        layer = method.build(conv, c, 0)
        assert isinstance(layer, LowRankConv) and layer.method == name
        for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                  "dilation", "groups", "padding_mode", "transposed", "output_padding"):
            assert getattr(layer, a) == getattr(conv, a), a
        assert layer.weight.shape == conv.weight.shape
        assert (layer.bias is None) == (conv.bias is None)
        with torch.no_grad():
            y, want = layer(x), conv(x)
        assert y.shape == want.shape
        if c.full_rank is not None:
            assert c.errors[0] < EXACT
            assert _rel(y, want) < EXACT, f"{c.label} at full rank {c.full_rank}"
            assert _rel(layer.weight.detach(), conv.weight) < EXACT


NUMBERS = [0, 1, 3, 6, 7, 9, 10, 12]


@pytest.mark.parametrize("name", methods.names())
@pytest.mark.parametrize("i", NUMBERS, ids=[IDS[j] for j in NUMBERS])
def test_reported_numbers_are_the_built_layers(name, i):
    """Kernel error, MACs (an independent hook count) and parameters of every option."""
    conv, shape = _case(i)
    if not _usable(name, conv):
        return
    method = methods.get(name)
    x = torch.randn(2, *shape)
    for c in method.candidates(conv, _call(conv, shape)):
        assert len(c.ranks) == len(c.errors) == len(c.macs) == len(c.params) > 0
        for j in sorted({0, len(c) // 2, len(c) - 1}):
            layer = method.build(conv, c, j)
            w = layer.weight.detach()
            assert _rel(w, conv.weight) == pytest.approx(c.errors[j], abs=2e-4), c.label
            assert count_macs(nn.Sequential(layer), shape) == c.macs[j], c.label
            assert sum(p.numel() for p in layer.parameters()) == c.params[j], c.label
            with torch.no_grad():  # weight/bias compute what the chain computes
                want = layer(x)
                got = run_conv(conv, x, w, layer.bias)
            assert _rel(got, want) < EXACT, c.label


@pytest.mark.parametrize("name", methods.names())
def test_budget_plan_builds_what_it_reports_and_survives_save_load_export(name, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.randn(2, 3, 12, 12)
    want = model(x)
    rep = decompose.decompose_(model, method=name, target_macs=0.5, input_shape=(3, 12, 12))
    assert rep.decomposed, f"{name} factored nothing at 50% of the MACs"
    assert rep.totals["macs_after"] <= 0.5 * rep.totals["macs_before"] + 1 or \
        rep.totals["decomposed_macs_ratio"] <= 0.5
    assert rep.totals["macs_after"] == count_macs(model, (3, 12, 12))
    assert all(lp.method == name for lp in rep.decomposed)
    with torch.no_grad():
        got = model(x)
    assert got.shape == want.shape and torch.isfinite(got).all()
    path = tmp_path / "m.pt"
    decompose.save(model, path, rep)
    back = decompose.load(path)
    with torch.no_grad():
        assert torch.equal(back(x), got)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), got, atol=1e-5, rtol=1e-5)
    pytest.importorskip("onnxruntime")
    from decompose.io.export import export_onnx
    res = export_onnx(model, tmp_path / "m.onnx", (3, 12, 12))
    assert res.max_rel_err is not None and res.max_rel_err < 1e-4


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", methods.names())
def test_calibration_lowers_the_output_error(name, channels_last):
    """Every method's refit works in both layouts (L-BFGS once failed on channels_last grads)
    and a channels_last model stays channels_last."""
    torch.manual_seed(1)
    original = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(12, 12, 3, padding=1)).eval()
    g = torch.Generator().manual_seed(2)
    base = F.avg_pool2d(torch.randn(96, 3, 14, 14, generator=g), 3, 1, 1)  # correlated input
    calib, held = list(base[:64].split(16)), base[64:]
    plain = copy.deepcopy(original)
    cfg = decompose.DecomposeConfig(method=name, target_macs=0.4, input_shape=(3, 12, 12),
                                    exclude=("0",), channels_last=channels_last)
    decompose.decompose_(plain, cfg)
    fitted = copy.deepcopy(original)
    rep = decompose.decompose_(fitted, cfg, calibration=calib, progress=False,
                               calibration_config=decompose.CalibrationConfig(samples=64))
    assert rep.calibration["layers"], name
    if channels_last:
        from decompose.engine.layout import is_channels_last
        assert is_channels_last(fitted)
        assert all(p.is_contiguous(memory_format=torch.channels_last)
                   for p in fitted.parameters() if p.dim() == 4)
    with torch.no_grad():
        ref = original(held)
        before, after = _rel(plain(held), ref), _rel(fitted(held), ref)
    assert after < before, f"{name}: held-out error {before:.4f} -> {after:.4f}"


def test_registry_names_methods_and_rejects_bad_ones():
    assert "nd" in methods.names()
    assert methods.resolve("auto") == tuple(n for n in methods.names()
                                            if methods.get(n).in_auto)
    with pytest.raises(decompose.DecomposeError, match="unknown method"):
        methods.resolve("nd,nope")
    with pytest.raises(ValueError):
        methods.register(type("Bad", (methods.Method,), {"name": "auto"}))


def test_a_registered_method_is_used_by_the_planner_without_naming_it():
    """The worked example of docs/architecture.md: a method of a few lines, registered, is
    planned, built, reported and saved like the built-in ones."""

    class Rank1Channel(methods.Method):
        """k x k conv to one channel, then 1x1 back out: a rank-1 channel factorization."""

        name = "test-rank1"
        in_auto = False

        def candidates(self, conv, call, *, ranks=None, variants=None, seed=0):
            w = conv.weight.detach().flatten(1).double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            approx = (u[:, :1] * s[:1]) @ vh[:1]
            err = float((w - approx).norm() / w.norm())
            px = call.out_shape[2] * call.out_shape[3]
            k = conv.weight[0].numel()
            return [methods.Candidate(self.name, "", [1], [err], [(k + conv.out_channels) * px],
                                      [k + conv.out_channels + conv.out_channels],
                                      state=(u[:, :1] * s[:1], vh[:1]))]

        def build(self, conv, cand, i, form="plain"):
            from collections import OrderedDict
            left, right = cand.state
            first = nn.Conv2d(conv.in_channels, 1, conv.kernel_size, conv.stride, conv.padding,
                              bias=False)
            last = nn.Conv2d(1, conv.out_channels, 1)
            with torch.no_grad():
                first.weight.copy_(right.reshape(first.weight.shape))
                last.weight.copy_(left.reshape(last.weight.shape))
                last.bias.copy_(conv.bias)
            return LowRankConv(OrderedDict(first=first, last=last), like=conv, method=self.name,
                               rank=1)

        def compose(self, module):
            w = torch.einsum("oa,ack->ock", module.last.weight.flatten(1),
                             module.first.weight.flatten(2))
            return w.reshape(module.out_channels, module.in_channels, *module.kernel_size), \
                module.last.bias

    methods.register(Rank1Channel)
    try:
        model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).eval()
        rep = decompose.decompose_(model, method="test-rank1", rank=1, input_shape=(8, 8, 8))
        assert rep.decomposed[0].method == "test-rank1"
        assert "test-rank1" in str(rep)  # the report's method column
        assert isinstance(model[0], LowRankConv)
        buf = io.BytesIO()
        torch.save(model, buf)
    finally:
        methods.registry._METHODS.pop("test-rank1", None)


@pytest.mark.parametrize("name", methods.names())
def test_fine_tuning_trains_every_method_and_keeps_its_layers(name):
    """One short fine-tune on a factorized model: the loss falls, the layers stay the method's,
    and the dense training form (composed kernel) gives the same gradients as the chain."""
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 3)).eval()
    teacher = copy.deepcopy(model)
    decompose.decompose_(model, method=name, target_macs=0.5, input_shape=(3, 10, 10),
                         exclude=("0",))
    layer = model[2]
    assert isinstance(layer, LowRankConv) and layer.method == name
    x = torch.randn(48, 3, 10, 10)
    y = teacher(x).argmax(1)
    from decompose.recover.finetune._train_form import dense_training
    grads = {}
    for form in ("plain", "dense"):
        m = copy.deepcopy(model).train()
        with dense_training(m, form, torch.device("cpu")):
            F.cross_entropy(m(x), y).backward()
        grads[form] = torch.cat([p.grad.flatten() for p in m[2].parameters()])
    torch.testing.assert_close(grads["dense"], grads["plain"], atol=1e-5, rtol=1e-4)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    res = decompose.finetune(model, loader, loader, teacher=teacher, progress=False,
                             config=decompose.FinetuneConfig(epochs=2, lr=0.05, device="cpu"))
    assert res.best.loss < res.before.loss
    assert isinstance(model[2], LowRankConv) and model[2].method == name
