"""decompose.sweep and ``decompose sweep``: one row per setting, as table, JSON and CSV."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from _imagegen import make_folder, save_classifier, tiny_classifier
from click.testing import CliRunner

import decompose
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
    model = save_classifier(tmp_path / "m.pt")
    r = CliRunner().invoke(cli, ["sweep", str(model), *args, *FAST])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.output
