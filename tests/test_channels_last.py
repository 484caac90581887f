"""channels_last: the layout option (DecomposeConfig.channels_last / --channels-last).

Layout changes strides, never values: every check here compares outputs with the contiguous
model within float tolerance, and checks that the layout survives decoupling, form changes,
saving and the safe loader.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cnn
from torch import nn

import decompose
from decompose.api import finalize_forms_, plain_forms_
from decompose.cli import cli
from decompose.engine.layout import is_channels_last, to_channels_last_
from decompose.io.files import load_model, save_model
from decompose.measure.compare import measure_latency

TOL = dict(atol=1e-5, rtol=1e-4)


def _activation_layouts(model: nn.Module, x: torch.Tensor) -> list[bool]:
    """For every 4-D conv output in a forward pass: is it channels_last?"""
    seen: list[bool] = []
    hooks = [m.register_forward_hook(lambda _m, _i, y: seen.append(
        y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_to_channels_last_changes_layout_not_values():
    net = tiny_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    ref = net(x)
    assert not is_channels_last(net)
    assert to_channels_last_(net) > 0
    assert is_channels_last(net)
    assert to_channels_last_(net) == 0  # idempotent
    torch.testing.assert_close(net(x), ref, **TOL)
    assert all(_activation_layouts(net, x))  # NCHW input, channels_last convs throughout


def test_conv3d_gets_channels_last_3d_and_conv1d_is_left_alone():
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Flatten(2), nn.Conv1d(4, 4, 3))
    to_channels_last_(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not net[0].weight.is_contiguous()
    assert net[2].weight.is_contiguous()


@pytest.mark.parametrize("form", ["plain", "dw1"])
def test_decompose_channels_last_is_the_same_function(form):
    net = tiny_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    plain, _ = decompose.api.decompose(net, rank=2, input_shape=(3, 16, 16), exclude=("0",))
    cl, rep = decompose.api.decompose(net, rank=2, input_shape=(3, 16, 16), form=form,
                                  channels_last=True, exclude=("0",))
    assert rep.config["channels_last"] is True
    assert is_channels_last(cl) and not is_channels_last(net)  # decompose() works on a copy
    torch.testing.assert_close(cl(x), plain(x), **TOL)
    assert all(_activation_layouts(cl, x))  # the dense stem sets the layout for all


def test_fully_decoupled_model_follows_its_input_layout():
    """A depthwise (C, 1, k, k) or 1x1 weight has no layout of its own, so a model whose every
    conv is decoupled computes in the layout of its input: feed channels_last input."""
    net = tiny_cnn().eval()
    new, _ = decompose.api.decompose(net, rank=1, input_shape=(3, 16, 16), channels_last=True)
    x = torch.randn(2, 3, 16, 16)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert all(_activation_layouts(new, xcl))
    torch.testing.assert_close(new(xcl), new(x), **TOL)


def test_form_changes_keep_the_layout():
    net = tiny_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    rep = decompose.decompose_(net, rank=2, input_shape=(3, 16, 16), form="dw1",
                               channels_last=True, exclude=("0",))
    ref = net(x)
    plain_forms_(net)
    to_channels_last_(net)
    assert finalize_forms_(net, rep) > 0
    assert is_channels_last(net)
    assert all(_activation_layouts(net, x))
    torch.testing.assert_close(net(x), ref, **TOL)


def test_layout_survives_save_and_safe_load(tmp_path):
    net = tiny_cnn().eval()
    decompose.decompose_(net, rank=1, input_shape=(3, 16, 16), channels_last=True,
                         exclude=("0",))
    path = save_model(net, tmp_path / "m.pt", {"note": "cl"})
    loaded = load_model(path).model.eval()
    assert is_channels_last(loaded)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), net(x), **TOL)


def test_latency_also_times_the_original_in_the_same_layout():
    net = tiny_cnn().eval()
    new, rep = decompose.api.decompose(net, rank=1, input_shape=(3, 16, 16), channels_last=True,
                                   exclude=("0",))
    lat = measure_latency(net, new, rep.layers, torch.randn(2, 3, 16, 16), repeats=3,
                          per_layer=False)
    assert lat["layout"] == "channels_last"
    assert lat["before_same_layout_ms"] > 0 and lat["speedup_same_layout"] > 0
    plain, rep2 = decompose.api.decompose(net, rank=1, input_shape=(3, 16, 16))
    lat2 = measure_latency(net, plain, rep2.layers, torch.randn(2, 3, 16, 16), repeats=3,
                           per_layer=False)
    assert "speedup_same_layout" not in lat2 and lat2["layout"] == "as given"


def test_planner_times_in_channels_last():
    """The timing planner sees channels_last inputs when the config asks for that layout."""
    seen = []

    def fake(layer, label, module, x):
        seen.append(not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
        return 1.0 if label == "original" else 0.5

    net = tiny_cnn().eval()
    before = copy.deepcopy(net)
    decompose.plan(net, rank=1, input_shape=(3, 16, 16), latency_aware=True,
                   channels_last=True, latency_fn=fake)
    assert seen and all(seen)
    assert not is_channels_last(net)  # plan never changes the model
    for a, b in zip(net.parameters(), before.parameters()):
        assert a.stride() == b.stride()


def test_cli_flag_records_the_layout(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(tiny_cnn().eval(), f)
    res = CliRunner().invoke(cli, [str(f), "--rank", "1", "--input-shape", "3,16,16",
                                   "--channels-last", "--exclude", "0", "--no-latency", "--json",
                                   "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["config"]["channels_last"] is True
    loaded = load_model(tmp_path / "model.decomposed.pt")
    assert is_channels_last(loaded.model)
    assert loaded.meta["config"]["channels_last"] is True
