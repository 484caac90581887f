"""decompose.compare and ``decompose compare``: every method at every budget, data-free and
calibrated, as table, JSON, CSV and Pareto figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _imagegen import make_folder, save_classifier, tiny_classifier
from click.testing import CliRunner

import decompose
from decompose import methods
from decompose.cli import cli
from decompose.compare import compare, compare_configs

FAST = ["--threads", "1", "--repeats", "2", "-q"]


def test_configs_are_methods_times_targets_and_bad_names_are_one_line():
    cfgs = compare_configs(["nd", "auto"], [0.5, 0.25], exclude=("conv1",))
    assert [(c.method, c.target_macs) for c in cfgs] == [
        ("nd", 0.5), ("nd", 0.25), ("auto", 0.5), ("auto", 0.25)]
    with pytest.raises(decompose.DecomposeError, match="unknown method 'nope'"):
        compare_configs(["nd", "nope"], [0.5])
    with pytest.raises(decompose.DecomposeError, match="no budget"):
        compare_configs(["nd"], [])


def test_rows_score_before_and_after_calibration_against_separate_runs():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))]
    calib = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]
    model = tiny_classifier()
    res = compare(model, ["nd"], [0.5], batches=batches, calibration=calib, latency=False,
                  quiet=True, calibration_config=decompose.CalibrationConfig(samples=32))
    (row,) = res.rows
    assert row["method"] == "nd" and row["calibrated"] and row["seconds"] > 0
    cfg = decompose.DecomposeConfig(target_macs=0.5)
    free = tiny_classifier()
    decompose.decompose_(free, cfg)
    fitted = tiny_classifier()
    decompose.decompose_(fitted, cfg, calibration=calib, progress=False,
                         calibration_config=decompose.CalibrationConfig(samples=32))
    x, y = batches[0]
    with torch.no_grad():
        assert row["top1_datafree"] == pytest.approx(float((free(x).argmax(1) == y).float().mean()))
        assert row["top1"] == pytest.approx(float((fitted(x).argmax(1) == y).float().mean()))
    assert "top-1 data-free" in str(res) and "top-1 calibrated" in str(res)


def test_cli_compare_json_csv_and_figures(tmp_path):
    data = make_folder(tmp_path / "data")
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32))
    model = save_classifier(tmp_path / "m.pt")
    names = ",".join(methods.names()[:2] + ("auto",))
    args = ["compare", str(model), "--methods", names, "--targets", "0.6,0.4", "--data",
            str(data), "--calibrate", str(npz), "--calib-samples", "16", "--json", "--csv",
            str(tmp_path / "c.csv"), *FAST]
    plot = pytest.importorskip("matplotlib") and tmp_path / "plots"
    r = CliRunner().invoke(cli, args + ["--plot", str(plot)])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert len(rows) == 2 * len(names.split(","))
    assert [row["method"] for row in rows] == [m for m in names.split(",") for _ in (0, 1)]
    for row in rows:
        if row["layers_decomposed"]:
            assert row["top1"] is not None and row["top1_datafree"] is not None
            assert row["speedup"] > 0 and row["calibrated"]
    assert (tmp_path / "c.csv").read_text().startswith("setting,method,")
    for name in ("compare_macs.png", "compare_latency.png"):
        assert (plot / name).stat().st_size > 1000


def test_cli_compare_bad_method_is_one_line(tmp_path):
    model = save_classifier(tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["compare", str(model), "--methods", "nd,bogus", *FAST])
    assert r.exit_code != 0
    assert "unknown method 'bogus'" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
