"""decompose.sweep and ``decompose sweep``: one row per setting, as table, JSON and CSV."""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
import torch
from _imagegen import make_folder, save_classifier, tiny_classifier
from click.testing import CliRunner

import decompose
from decompose import CalibrationConfig
from decompose.cli import cli
from decompose.errors import DecomposeError
from decompose.sweep import COLUMNS, sweep, sweep_configs

FAST = ["--threads", "1", "--repeats", "2", "-q"]


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))]


def test_configs_cover_every_value_and_order():
    cfgs = sweep_configs(ranks=[1, 2], energies=[0.5], targets=[0.4], orders=["dw-pw", "pw-dw"],
                         exclude=("conv1",))
    assert [(c.selection, c.order) for c in cfgs][:2] == [("rank", "dw-pw"), ("rank", "pw-dw")]
    assert len(cfgs) == 8 and all(c.exclude == ("conv1",) for c in cfgs)


@pytest.mark.parametrize("kwargs, flag", [({"ranks": [0]}, "--ranks"),
                                          ({"energies": [1.5]}, "--energies"),
                                          ({"targets": [2.0]}, "--targets")])
def test_bad_values_name_their_flag(kwargs, flag):
    with pytest.raises(DecomposeError, match=flag):
        sweep_configs(**kwargs)


def test_nothing_to_sweep():
    with pytest.raises(DecomposeError, match="--ranks"):
        sweep_configs()


def test_rows_agree_with_the_plan_and_measure_each_setting():
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfgs = sweep_configs(ranks=[1, 9], orders=["auto"])
    res = sweep(model, cfgs, batches=_batches(), repeats=2, threads=1, quiet=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    r1, r9 = res.rows
    rep = decompose.plan(tiny_classifier(), rank=1)
    assert r1["macs_ratio"] == pytest.approx(rep.totals["macs_after"] / rep.totals["macs_before"])
    assert r1["params_ratio"] == pytest.approx(rep.totals["params_after"] / rep.totals["params_before"])
    assert r1["mean_kernel_error"] == pytest.approx(
        sum(lp.kernel_error for lp in rep.decomposed) / len(rep.decomposed))
    assert 0 <= r1["top1"] <= 1 and r1["speedup"] > 0 and r1["sqnr_db"] is not None
    assert r9["layers_decomposed"] == 0 and r9["top1"] == res.baseline["top1"]  # nothing cheaper
    json.dumps(res.to_dict(), allow_nan=False)  # strict JSON
    assert "T=1 auto" in str(res)


def test_cli_sweep_json_csv_and_plot(tmp_path):
    data = make_folder(tmp_path / "data")
    model = save_classifier(tmp_path / "m.pt")
    out_csv = tmp_path / "s.csv"
    args = ["sweep", str(model), "--ranks", "1,2", "--energies", "0.5", "--orders", "auto,dw-pw",
            "--data", str(data), "--json", "--csv", str(out_csv), *FAST]
    plot = pytest.importorskip("matplotlib") and tmp_path / "plots"
    args += ["--plot", str(plot)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["rows"]) == 6 and d["baseline"]["images"] == 12
    for row in d["rows"]:
        assert {"macs_ratio", "params_ratio", "mean_kernel_error", "top1", "speedup"} <= set(row)
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == COLUMNS
    assert (plot / "sweep.png").stat().st_size > 1000
    assert r.stderr == ""  # --quiet


def test_cli_sweep_table_without_data(tmp_path):
    model = save_classifier(tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["sweep", str(model), "--ranks", "1", *FAST])
    assert r.exit_code == 0, r.output
    assert "T=1 auto" in r.stdout and "speed-up" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["--ranks", "1,a"], "--ranks must be comma-separated integers"),
    (["--ranks", "1,,2"], "--ranks"),
    (["--ranks", "0"], "--ranks"),
    (["--energies", "x"], "--energies"),
    (["--ranks", "1", "--orders", "dw"], "--orders"),
    ([], "nothing to sweep"),
])
def test_cli_sweep_bad_flags_are_one_line(tmp_path, args, needle):
    _one_line_error(tmp_path, args, needle)


def _one_line_error(tmp_path, args, needle):
    model = save_classifier(tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["sweep", str(model), *args, *FAST])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.output


# ------------------------------------------- latency targets, calibration, common config flags


def _fake_latency(name, label, module, x):
    """The model 100 ms, an original layer 10 ms, a decoupled one 3+T ms (any order or form)."""
    if label == "model":
        return 100.0
    if label == "original":
        return 10.0
    return 3.0 + int(label.split("/")[2][1:])  # "nd/<order>/T<rank>/<form>"


def test_latency_targets_rule_and_its_predicted_fraction():
    cfgs = sweep_configs(ranks=[1], latency_targets=[0.9], orders=["auto"], form="fastest")
    assert [(c.selection, c.target_latency, c.form) for c in cfgs] == [
        ("rank", None, "fastest"), ("target_latency", 0.9, "fastest")]
    res = sweep(tiny_classifier(), cfgs, latency=False, latency_fn=_fake_latency, quiet=True)
    r1, lat = res.rows
    assert lat["setting"] == "lat=0.9 auto" and lat["rule"] == "target_latency"
    assert lat["value"] == 0.9 and lat["layers_decomposed"] == 2
    plan = decompose.plan(tiny_classifier(), target_latency=0.9, form="fastest",
                          latency_fn=_fake_latency)
    frac = plan.latency_plan["predicted_fraction"]
    assert lat["predicted_latency_fraction"] == pytest.approx(frac) and frac <= 0.9 + 1e-12
    assert {k: tuple(v) for k, v in lat["ranks"].items()} == {
        lp.name: (lp.order, lp.rank) for lp in plan.decomposed}
    assert r1["rule"] == "rank" and r1["predicted_latency_fraction"] is None  # no budget
    table = str(res)
    assert "lat=0.9 auto" in table and "pred.lat" in table


def test_unreachable_latency_target_is_a_row_and_the_sweep_goes_on():
    cfgs = sweep_configs(latency_targets=[0.5, 0.9])  # best: 80 + 2 x 4 ms = 88% of 100
    res = sweep(tiny_classifier(), cfgs, latency=False, latency_fn=_fake_latency, quiet=True)
    bad, good = res.rows
    assert bad["setting"] == "lat=0.5 auto" and bad["layers_decomposed"] == 0
    assert bad["note"].startswith("not reachable: --target-latency 0.5 cannot be met")
    assert bad["top1"] is None and bad["speedup"] is None
    assert good["layers_decomposed"] > 0  # the next setting was still measured
    assert "lat=0.5 auto: not reachable" in str(res)
    res.to_csv(Path(tempfile.mkdtemp()) / "s.csv")  # a row of blanks writes fine


def test_other_errors_still_stop_the_sweep_and_name_the_setting():
    cfgs = sweep_configs(targets=[0.5])
    with pytest.raises(DecomposeError, match=r"^setting MACs=0.5 auto: .*--calibrate"):
        sweep(tiny_classifier(), [dataclasses.replace(cfgs[0], allocation="output")],
              latency=False, quiet=True)


def test_calibrated_rows_raise_the_output_sqnr():
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 3, 8, 8, generator=g) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))]
    cfgs = sweep_configs(ranks=[1, 2], orders=["pw-dw"])
    plain = sweep(tiny_classifier(), cfgs, batches=batches, latency=False, quiet=True)
    model = tiny_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cal = sweep(model, cfgs, batches=batches, latency=False, quiet=True,
                calibration=iter(calib), calibration_config=CalibrationConfig(samples=48))  # one-shot: read once, used twice
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for p, c in zip(plain.rows, cal.rows):
        assert not p["calibrated"] and p["calib_seconds"] is None
        assert c["calibrated"] and c["calib_seconds"] > 0
        assert c["sqnr_db"] > p["sqnr_db"] + 1.0  # ~11-12 dB -> ~18-20 dB here
        assert c["mean_kernel_error"] == p["mean_kernel_error"]  # the plan's, before calibrating
    assert "calib s" in str(cal) and "calib s" not in str(plain)


def test_cli_flags_reach_every_config(tmp_path, monkeypatch):
    import decompose.sweep as sweep_mod
    seen = {}

    def fake_sweep(model, configs, **kw):
        seen["configs"], seen["kw"] = configs, kw
        return sweep_mod.SweepResult([], {})
    monkeypatch.setattr(sweep_mod, "sweep", fake_sweep)
    model = save_classifier(tmp_path / "m.pt")
    npz = tmp_path / "calib.npz"
    import numpy as np
    np.savez(npz, x=np.random.default_rng(0).random((10, 3, 8, 8), dtype=np.float32))
    r = CliRunner().invoke(cli, [
        "sweep", str(model), "--ranks", "1", "--latency-targets", "0.5,0.7", "--fold-bn",
        "--form", "dw1", "--latency-aware", "--plan-batch", "4", "--plan-threads", "1",
        "--channels-last", "--exclude", "conv1", "--calibrate", str(npz), "--calib-samples",
        "6", "--calib-method", "last", "--json", *FAST])
    assert r.exit_code == 0, r.output
    cfgs = seen["configs"]
    assert [(c.selection, getattr(c, c.selection)) for c in cfgs] == [
        ("rank", 1), ("target_latency", 0.5), ("target_latency", 0.7)]
    for c in cfgs:
        assert (c.fold_bn, c.form, c.latency_aware, c.latency_batch, c.threads,
                c.channels_last, c.exclude) == (True, "dw1", True, 4, 1, True, ("conv1",))
    kw = seen["kw"]
    assert kw["calibration_config"].samples == 6 and kw["calibration_config"].method == "last"
    assert sum(len(x) for x in kw["calibration"]) == 6  # the --calibrate images


def test_fold_bn_and_form_rows():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                                torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    cfgs = sweep_configs(ranks=[2], orders=["dw-pw"], fold_bn=True, form="dw1",
                         input_shape=(3, 8, 8))
    (row,) = sweep(model, cfgs, batches=_batches(), latency=False, quiet=True).rows
    assert row["folded_bn"] == 2 and set(row["forms"].values()) == {"dw1"}
    assert row["sqnr_db"] is not None
    (row,) = sweep(model, sweep_configs(ranks=[2], input_shape=(3, 8, 8)), latency=False,
                   quiet=True).rows
    assert row["folded_bn"] == 0 and set(row["forms"].values()) == {"plain"}


@pytest.mark.parametrize("args, needle", [
    (["--latency-targets", "1.5"], "must be in (0, 1), got 1.5; e.g. --latency-targets 0.5,0.7"),
    (["--targets", "2"], "--targets: target_macs must be in (0, 1), got 2.0; e.g. --targets"),
    (["--ranks", "1", "--energies", "1.5"], "; e.g. --energies 0.5,0.8"),
    (["--latency-targets", "0.5,x"], "--latency-targets must be comma-separated numbers"),
    (["--ranks", "1", "--plan-batch", "0"], "--plan-batch"),
    (["--ranks", "1", "--plan-threads", "0"], "--plan-threads"),
    (["--ranks", "1", "--form", "dense"], "--form"),
    (["--ranks", "1", "--calibrate", "nope/", "--calib-samples", "0"], "--calib-samples"),
    (["--ranks", "1", "--calibrate", "does-not-exist"], "does-not-exist"),
])
def test_cli_sweep_new_flags_bad_values_are_one_line(tmp_path, args, needle):
    _one_line_error(tmp_path, args, needle)


def test_output_errors_are_measured_once_for_all_budget_settings(monkeypatch):
    """They depend on the model, fold_bn, include and exclude only: one measurement serves
    every budget and order of a sweep, and the rows equal separate compress_ calls."""
    import decompose.planning.sensitivity as sens
    calls = []
    real = sens.output_error_curves

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(sens, "output_error_curves", counting)
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]
    cfgs = sweep_configs(targets=[0.4, 0.6], orders=["auto", "dw-pw"], allocation="output")
    res = sweep(tiny_classifier(), cfgs, latency=False, quiet=True, calibration=calib,
                calibration_config=CalibrationConfig(samples=32))
    assert len(calls) == 1 and len(res.rows) == 4
    for cfg, row in zip(cfgs, res.rows):
        alone = decompose.decompose_(tiny_classifier(), cfg, calibration=calib,
                                     calibration_config=CalibrationConfig(samples=32),
                                     progress=False)
        assert {k: tuple(v) for k, v in row["ranks"].items()} == {
            lp.name: (lp.order, lp.rank) for lp in alone.decomposed}
