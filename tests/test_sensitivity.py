"""Data-aware allocation: measured output errors per rank (decompose.sensitivity) and the
budgets that minimise them (DecomposeConfig.allocation="output", --allocate output)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cnn
from torch import nn

import decompose
from decompose import CalibrationConfig
from decompose.api import decompose_ as compress_
from decompose.cli import cli
from decompose.kernels.nd import error_curve, factorize, rebuild, singular_values
from decompose.planning.sensitivity import output_error_curves


def _as_list(by_rank: dict[str, float]) -> list[float]:
    """{rank: error} -> the errors at T = 1..r."""
    return [by_rank[str(t)] for t in range(1, len(by_rank) + 1)]


def _brute(conv: nn.Module, x: torch.Tensor, order: str) -> list[float]:
    """The definition, one rank at a time through the module's own forward."""
    f = factorize(conv.weight.detach().double(), conv.groups, order)
    ref = conv._conv_forward(x, conv.weight.detach(), None).double().pow(2).sum()
    out = []
    for t in range(1, f.max_rank + 1):
        r = (conv.weight.detach().double() - rebuild(f, t)).float()
        out.append(float((conv._conv_forward(x, r, None).double().pow(2).sum() / ref).sqrt()))
    return out


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 8, 3, padding=1),
    nn.Conv2d(6, 8, 3, stride=2, dilation=2, padding=2, bias=False),
    nn.Conv2d(6, 8, 3, groups=2, padding=1, padding_mode="circular"),
    nn.Conv1d(4, 6, 5, padding=2, padding_mode="reflect"),
    nn.Conv3d(3, 4, 3, padding=1, padding_mode="replicate"),
], ids=["plain", "stride-dilation", "groups-circular", "conv1d-reflect", "conv3d-replicate"])
def test_curves_match_the_definition_for_every_conv(conv):
    conv.eval()
    shape = {1: (9, 4, 20), 2: (9, 6, 12, 12), 3: (9, 3, 6, 6, 6)}[conv.weight.dim() - 2]
    x = torch.randn(*shape)
    net = nn.Sequential(conv)
    curves = output_error_curves(net, [x[:5], x[5:]], samples=9)["0"]
    for label, by_rank in curves.items():
        order = label.split("/")[1]
        got = _as_list(by_rank)
        want = _brute(conv, x, order)
        assert got[-1] == 0.0 and len(got) == len(want)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-4)


def test_white_inputs_give_the_kernel_error():
    """With white inputs and no padding, output error is kernel error (within sampling noise)."""
    conv = nn.Conv2d(8, 16, 3)
    x = torch.randn(64, 8, 20, 20)
    got = _as_list(output_error_curves(nn.Sequential(conv), [x], samples=64)["0"]["nd/dw-pw"])
    want = error_curve(singular_values(conv.weight.detach(), 1, "dw-pw")).tolist()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want, dtype=torch.float32),
                               atol=0.02, rtol=0.05)


def test_samples_caps_the_images_and_selection_is_respected():
    net = tiny_cnn().eval()
    seen = []
    net[0].register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    curves = output_error_curves(net, [torch.randn(8, 3, 16, 16)] * 4, samples=12,
                                 config=decompose.DecomposeConfig(exclude=("3",)))
    assert sum(seen) == 12
    assert "3" not in curves and "0" in curves
    assert "5" not in curves and "7" not in curves  # 1x1 and depthwise: nothing to decouple


def _subspace_model() -> tuple[nn.Module, list[torch.Tensor]]:
    """Two identical-cost convs. The first sees inputs in channel 0 only, whose kernel slice is
    rank 1: rank 1 is exact at its output, though its kernel error is large (the other
    channels' slices are random). The second's kernel is dominated by one rank-1 slice (small
    kernel error at rank 1) but its inputs excite every channel."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    with torch.no_grad():
        net[0].weight[:, 0] = torch.outer(torch.randn(8), torch.randn(9)).reshape(8, 3, 3)
        net[1].weight[:, 0] = 3 * torch.outer(torch.randn(8), torch.randn(9)).reshape(8, 3, 3)
    mask = torch.zeros(1, 8, 1, 1)
    mask[:, 0] = 1
    xs = [torch.randn(16, 8, 12, 12) * mask for _ in range(2)]
    return net.eval(), xs


def test_output_allocation_spends_rank_where_the_outputs_need_it():
    net, xs = _subspace_model()
    cfg = dict(target_macs=0.5, order="dw-pw", input_shape=(8, 12, 12))
    k = decompose.plan(net, **cfg)
    curves = output_error_curves(net, xs)
    o = decompose.plan(net, allocation="output", error_curves=curves, **cfg)
    rank = lambda rep, n: {lp.name: lp.rank for lp in rep.decomposed}.get(n, 0)  # noqa: E731
    assert rank(o, "0") == 1 < rank(k, "0")  # rank 1 is exact at the first layer's output
    assert rank(o, "1") > rank(k, "1")  # the budget it frees goes to the second
    assert o.totals["macs_after"] <= 0.5 * o.totals["macs_before"] + 1
    planned = {lp.name: lp.planned_output_error for lp in o.decomposed}
    assert planned and all(0 <= v < 1 for v in planned.values())


def test_compress_measures_then_calibrates_on_the_same_images():
    net, xs = _subspace_model()
    model = copy.deepcopy(net)
    cfg = decompose.DecomposeConfig(target_macs=0.5, order="dw-pw", allocation="output",
                                   input_shape=(8, 12, 12))
    rep = compress_(model, cfg, calibration=iter(xs), calibration_config=CalibrationConfig(samples=32), progress=False)
    assert rep.allocation["images"] == 32
    assert rep.calibration["samples"] == 32  # the one-shot iterator was kept
    assert rep.config["allocation"] == "output"


def test_allocation_errors_are_one_line():
    with pytest.raises(decompose.DecomposeError, match="--target-macs"):
        decompose.DecomposeConfig(rank=2, allocation="output")
    with pytest.raises(decompose.DecomposeError, match="allocation must be one of"):
        decompose.DecomposeConfig(target_macs=0.5, allocation="data")
    with pytest.raises(decompose.DecomposeError, match="--calibrate"):
        decompose.plan(tiny_cnn(), target_macs=0.5, allocation="output", input_shape=(3, 16, 16))


def test_cli_allocate_output(tmp_path):
    import numpy as np
    f = tmp_path / "model.pt"
    torch.save(tiny_cnn().eval(), f)
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.random.default_rng(0).random((40, 16, 16, 3), dtype=np.float32))
    runner = CliRunner()
    res = runner.invoke(cli, [str(f), "--target-macs", "0.5", "--allocate", "output",
                              "--input-shape", "3,16,16", "--no-latency", "--json", "-q"])
    assert res.exit_code != 0 and "--calibrate" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "model.decomposed.pt").exists()
    res = runner.invoke(cli, [str(f), "--target-macs", "0.5", "--allocate", "output",
                              "--calibrate", str(npz), "--calib-samples", "32",
                              "--input-shape", "3,16,16", "--no-latency", "--json", "-q"])
    assert res.exit_code == 0, res.output + res.stderr
    rep = json.loads(res.stdout)
    assert rep["config"]["allocation"] == "output"
    assert rep["allocation"]["images"] == 32


def test_sweep_applies_output_allocation_to_budget_rows_only():
    from decompose.sweep import sweep_configs
    cfgs = sweep_configs(ranks=[1], targets=[0.5], latency_targets=[0.8], allocation="output")
    assert [c.allocation for c in cfgs] == ["kernel", "output", "output"]


def test_sweep_cli_allocate_output_needs_calibration_images(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(tiny_cnn().eval(), f)
    res = CliRunner().invoke(cli, ["sweep", str(f), "--targets", "0.5", "--allocate", "output",
                                   "--input-shape", "3,16,16", "--no-latency", "-q"])
    assert res.exit_code == 2 and "--allocate" in res.stderr and "--calibrate" in res.stderr
    assert "Traceback" not in res.output
