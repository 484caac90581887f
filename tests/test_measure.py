"""decompose.measure.compare: accuracy before/after, output error (SQNR and per layer), latency."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from _imagegen import tiny_classifier
from torch import nn

import decompose
from decompose.engine.surgery import replace_module
from decompose.errors import DecomposeError
from decompose.measure.compare import (
    cache_batches,
    capture_inputs,
    check_input_shape,
    evaluate_model,
    measure,
    measure_latency,
    measure_output_error,
    sqnr_db,
)
from decompose.methods.nd.layers import decouple_conv
from decompose.planning.plan import LayerPlan
from decompose.progress import progress, quiet_progress

EXACT = 1e-5  # relative error of an exact (full-rank) decomposition in float32


def _batches(n_batches=2, batch=8, classes=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n_batches)]


def _two_convs() -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("a", nn.Conv2d(4, 12, 3, padding=1)), ("relu", nn.ReLU()),
        ("b", nn.Conv2d(12, 12, 3, padding=1)),
    ])).eval()


def _decouple(model: nn.Module, ranks: dict[str, int], order="dw-pw") -> list[LayerPlan]:
    """Decouple the named convs at the given ranks, whatever they cost (for exactness tests)."""
    plans = []
    for name, t in ranks.items():
        conv = model.get_submodule(name)
        plans.append(LayerPlan(name, tuple(conv.weight.shape), conv.groups, variant=order, rank=t))
        replace_module(model, name, decouple_conv(conv, t, order))
    return plans


def test_layer_error_uses_the_original_networks_input():
    # layer a is truncated to rank 1 (large error), layer b is exact (full rank 9): b's own
    # error must be ~0 although its input in the decomposed network is far from the original
    orig = _two_convs()
    dec = copy.deepcopy(orig)
    layers = _decouple(dec, {"a": 1, "b": 9})
    x = torch.randn(6, 4, 10, 10)
    out = measure_output_error(orig, dec, layers, [x])
    assert layers[1].output_rel_error < EXACT
    assert layers[0].output_rel_error > 0.1
    assert out["images"] == 6 and out["input"] == "original network"
    with torch.no_grad():  # and a's figure is exactly ||f_dec(x) - f(x)|| / ||f(x)||
        ref = orig.a(x)
        want = float((dec.a(x) - ref).norm() / ref.norm())
        y, y_hat = orig(x).double(), dec(x).double()
    assert layers[0].output_rel_error == pytest.approx(want, rel=1e-4)
    want_db = 10 * math.log10(float(y.pow(2).sum() / (y - y_hat).pow(2).sum()))
    assert out["sqnr_db"] == pytest.approx(want_db, rel=1e-6)


def test_error_is_accumulated_over_all_images_not_averaged_per_batch():
    orig = _two_convs()
    dec = copy.deepcopy(orig)
    layers = _decouple(dec, {"b": 1})
    xs = [torch.randn(3, 4, 8, 8), 5 * torch.randn(5, 4, 8, 8)]
    measure_output_error(orig, dec, layers, xs)
    with torch.no_grad():
        x = torch.cat(xs)
        h = orig.relu(orig.a(x))
        ref = orig.b(h)
        want = float((dec.b(h) - ref).norm() / ref.norm())
    assert layers[0].output_rel_error == pytest.approx(want, rel=1e-4)


def test_output_error_limits_images():
    orig = _two_convs()
    dec = copy.deepcopy(orig)
    layers = _decouple(dec, {"b": 2})
    batches = [(torch.randn(8, 4, 8, 8), torch.zeros(8)) for _ in range(3)]
    out = measure_output_error(orig, dec, layers, batches, max_images=10)
    assert out["images"] == 10


def test_folded_batchnorm_is_part_of_the_reference():
    orig = nn.Sequential(OrderedDict([("conv", nn.Conv2d(4, 12, 3, padding=1)),
                                      ("bn", nn.BatchNorm2d(12))])).eval()
    with torch.no_grad():
        orig.bn.running_mean.uniform_(-1, 1)
        orig.bn.running_var.uniform_(0.5, 2)
        orig.bn.weight.uniform_(0.5, 3)
    dec = copy.deepcopy(orig)
    from decompose.engine.fold import fold_batchnorm_
    assert fold_batchnorm_(dec) == [("conv", "bn")]
    layers = _decouple(dec, {"conv": 9})
    x = torch.randn(4, 4, 8, 8)
    measure_output_error(orig, dec, layers, [x], folded={"conv": "bn"})
    assert layers[0].output_rel_error < EXACT
    measure_output_error(orig, dec, layers, [x])  # without the BN the comparison is wrong
    assert layers[0].output_rel_error > 0.1


def test_sqnr_edge_cases():
    assert sqnr_db(1.0, 0.0) is None  # identical outputs
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)


def test_capture_inputs_gives_each_layers_real_input_at_the_batch_size():
    m = tiny_classifier()
    x = torch.randn(5, 3, 8, 8)
    got = capture_inputs(m, ["conv1", "conv2"], x)
    assert torch.equal(got["conv1"], x)
    assert got["conv2"].shape == (5, 16, 8, 8)
    assert (got["conv2"] >= 0).all()  # after the ReLU: the actual input, not a random one


def test_measure_latency_fills_whole_model_and_per_layer_fields():
    m = tiny_classifier()
    orig = copy.deepcopy(m)
    rep = decompose.decompose_(m, rank=1)
    x = torch.randn(2, 3, 8, 8)
    lat = measure_latency(orig, m, rep.layers, x, repeats=3, warmup=1, threads=1,
                          min_sample_ms=0.05, quiet=True)
    assert {"before_ms", "after_ms", "speedup", "batch_size", "threads", "repeats"} <= set(lat)
    assert lat["batch_size"] == 2 and lat["threads"] == 1 and lat["repeats"] == 3
    assert lat["before_ms"] > 0 and lat["after_ms"] > 0 and lat["speedup"] > 0
    for lp in rep.layers:
        if lp.skipped is None:
            assert lp.latency_before_ms > 0 and lp.latency_after_ms > 0
        else:
            assert lp.latency_before_ms is None
    assert torch.get_num_threads() >= 1  # restored by the latency utility


def test_measure_fills_the_report():
    m = tiny_classifier()
    orig = copy.deepcopy(m)
    rep = decompose.decompose_(m, rank=1)
    batches = _batches()
    measure(rep, orig, m, batches=batches, repeats=2, threads=1, quiet=True)
    acc = rep.accuracy
    assert set(acc["before"]) >= {"top1", "top5"} and acc["images"] == 16
    for side in ("before", "after"):
        assert 0 <= acc[side]["top1"] <= acc[side]["top5"] <= 1
    assert acc["drop_top1"] == pytest.approx((acc["before"]["top1"] - acc["after"]["top1"]) * 100)
    assert acc["before"]["top1"] == evaluate_model(orig, batches, quiet=True)["top1"]
    assert isinstance(rep.output_error["sqnr_db"], float)
    assert rep.latency["batch_size"] == 1 and rep.latency["input"] == "images"
    d = rep.to_dict()
    assert {"accuracy", "output_error", "latency"} <= set(d)
    assert all("output_rel_error" in lay for lay in d["layers"] if lay["skipped"] is None)
    text = str(rep)
    assert "top-1" in text and "SQNR" in text and "latency" in text


def test_measure_without_data_times_on_random_inputs():
    m = tiny_classifier()
    orig = copy.deepcopy(m)
    rep = decompose.decompose_(m, rank=1)
    measure(rep, orig, m, repeats=2, threads=1, latency_batch=3, quiet=True)
    assert rep.accuracy is None and rep.output_error is None
    assert rep.latency["input"] == "random" and rep.latency["batch_size"] == 3


def test_images_of_another_size_are_refused():
    m = tiny_classifier(size=8)
    orig = copy.deepcopy(m)
    rep = decompose.decompose_(m, rank=1)
    with pytest.raises(DecomposeError, match="16x16.*expects 8x8|resize"):
        measure(rep, orig, m, batches=_batches(size=16), latency=False)


def test_shape_check_skips_a_default_guess():
    rep = decompose.plan(tiny_classifier(), rank=1)
    rep.input_shape_source = "default"
    check_input_shape((3, 16, 16), rep)  # no error: the planned shape was only a guess
    rep.input_shape_source = "given"
    with pytest.raises(DecomposeError):
        check_input_shape((3, 16, 16), rep)


def test_cache_batches_keeps_the_dataset():
    class Loader(list):
        dataset = "the dataset"
    got = cache_batches(Loader(_batches()), quiet=True)
    assert len(got) == 2 and got.dataset == "the dataset"


def test_progress_quiet_and_plain(capsys):
    with quiet_progress():
        assert list(progress(range(3), desc="x")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(progress(range(3), desc="y", quiet=True)) == [0, 1, 2]
    with progress(total=4, desc="z", quiet=True) as bar:
        bar.update(4)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
