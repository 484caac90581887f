"""The command line: the main job, report, demo, and one-line errors for every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_cnn

from decompose.cli import cli
from decompose.io.files import load_model

SHAPE = "3,16,16"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def model_file(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(tiny_cnn().eval(), f)
    return f


def run(runner, *args):
    """Invoke the CLI; the main job skips its latency measurement unless a test asks for it."""
    args = [str(a) for a in args]
    first = args[0] if args else ""
    if first not in cli.commands and first not in ("--help", "-h") and "--latency" not in args:
        args.append("--no-latency")
    return runner.invoke(cli, args)


def one_line_error(res, code=None):
    assert res.exit_code != 0
    if code is not None:
        assert res.exit_code == code
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr  # logs may precede it
    assert "Traceback" not in res.output + res.stderr
    return errors[0]


def test_main_job_writes_file_and_json_report(runner, model_file):
    res = run(runner, model_file, "--rank", 2, "--input-shape", SHAPE, "--json", "-q",
              "--latency", "--repeats", 3)
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["latency"]["before_ms"] > 0 and rep["latency"]["after_ms"] > 0
    out = model_file.with_name("model.decomposed.pt")
    assert rep["output"] == str(out) and out.exists()
    keys = {"name", "order", "rank", "max_rank", "params_before", "params_after", "macs_before",
            "macs_after", "kernel_error", "energy", "skipped"}
    assert all(keys <= set(lp) for lp in rep["layers"])
    assert {"params_before", "params_after", "macs_before", "macs_after"} <= set(rep["totals"])
    assert rep["totals"]["macs_after"] < rep["totals"]["macs_before"]
    loaded = load_model(out)
    assert loaded.kind == "decomposed" and loaded.meta["config"]["rank"] == 2
    # a second run refuses to overwrite, and leaves the file as it was
    before = out.read_bytes()
    res = run(runner, model_file, "--rank", 1, "--input-shape", SHAPE)
    assert "--force" in one_line_error(res)
    assert out.read_bytes() == before
    res = run(runner, model_file, "--rank", 1, "--input-shape", SHAPE, "--force", "-q")
    assert res.exit_code == 0 and out.read_bytes() != before


def test_table_on_stdout_logs_on_stderr(runner, model_file, tmp_path):
    res = run(runner, model_file, "--energy", "0.8", "--input-shape", SHAPE,
              "-o", tmp_path / "o.pt")
    assert res.exit_code == 0, res.stderr
    assert "layer" in res.stdout.splitlines()[0] and "MACs" in res.stdout
    assert "loaded" in res.stderr and "loaded" not in res.stdout


def test_report_writes_nothing(runner, model_file, tmp_path):
    res = run(runner, "report", model_file, "--target-macs", "0.5", "--input-shape", SHAPE, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["output"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_checkpoint_with_arch(runner, tmp_path):
    f = tmp_path / "ck.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_cnn().state_dict().items()}}, f)
    res = run(runner, f, "--input-shape", SHAPE)
    assert "--arch" in one_line_error(res)
    res = run(runner, f, "--arch", "builders:tiny", "--input-shape", SHAPE, "-q")
    assert res.exit_code == 0, res.stderr
    # the output of a user-class model needs the same --allow/--arch to load back
    assert load_model(tmp_path / "ck.decomposed.th").kind == "decomposed"


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "rank"), (["--rank", "-2"], "rank"), (["--rank", "1.5"], "--rank"),
    (["--energy", "0"], "energy"), (["--energy", "1.5"], "energy"), (["--energy", "x"], "--energy"),
    (["--target-macs", "1"], "target_macs"), (["--target-params", "0"], "target_params"),
    (["--rank", "1", "--energy", "0.5"], "choose one"), (["--input-shape", "a,b"], "--input-shape"),
    (["--order", "sideways"], "order"), (["--input-shape", "5,16,16"], "--input-shape"),
    (["--plan-batch", "0"], "--plan-batch"), (["--plan-threads", "0"], "--plan-threads"),
    (["--rank", "2", "--allocate", "output"], "--target-macs"),
])
def test_bad_settings_are_one_line(runner, model_file, args, needle):
    res = run(runner, model_file, *args)
    assert needle in one_line_error(res)
    assert not model_file.with_name("model.decomposed.pt").exists()


def test_bad_files_are_one_line(runner, tmp_path):
    assert "not found" in one_line_error(run(runner, tmp_path / "missing.pt"))
    txt = tmp_path / "notes.txt"
    txt.write_text("not a model")
    assert "PyTorch" in one_line_error(run(runner, txt)) or "corrupt" in one_line_error(run(runner, txt))
    bad = tmp_path / "nan.pt"
    m = tiny_cnn()
    with torch.no_grad():
        m[0].weight.fill_(float("inf"))
    torch.save(m, bad)
    assert "NaN or Inf" in one_line_error(run(runner, bad, "--input-shape", SHAPE))
    assert not (tmp_path / "nan.decomposed.pt").exists()


def test_unwritable_output_folder(runner, model_file, tmp_path):
    err = one_line_error(run(runner, model_file, "-o", tmp_path / "no" / "such" / "o.pt"))
    assert "does not exist" in err


def test_no_decomposable_layer_exits_nonzero_and_writes_nothing(runner, tmp_path):
    f = tmp_path / "pw.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1)), f)
    err = one_line_error(run(runner, f, "--input-shape", SHAPE))
    assert "nothing written" in err
    assert not (tmp_path / "pw.decomposed.pt").exists()


def test_every_command_has_help_with_an_example(runner):
    res = run(runner, "--help")
    assert res.exit_code == 0
    for name, cmd in cli.commands.items():
        assert cmd.help and "Example" in cmd.help, f"{name} lacks help with an example"
        res = run(runner, name, "--help")
        assert res.exit_code == 0 and "Usage" in res.stdout


def test_demo_runs_end_to_end(runner):
    res = run(runner, "demo", "--json", "-q")
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    acc = rep["accuracy"]
    assert acc["before"]["top1"] > 0.9
    assert 0 <= acc["after"]["top1"] <= 1
    assert rep["totals"]["macs_after"] < rep["totals"]["macs_before"]


def test_calibrate_flag_refits_and_reports(runner, model_file, tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=rng.random((40, 3, 16, 16), dtype=np.float32))  # no labels: not needed
    res = run(runner, model_file, "--rank", 1, "--calibrate", npz, "--calib-samples", 32,
              "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--json", "-q")
    assert res.exit_code == 0, res.stderr
    cal = json.loads(res.stdout)["calibration"]
    assert cal["samples"] == 32 and cal["layers"]
    for layer in cal["layers"]:
        assert layer["error_after"] <= layer["error_before"] + 1e-6
    res = run(runner, model_file, "--calibrate", tmp_path / "nope", "-o", tmp_path / "x.pt")
    one_line_error(res)
    assert not (tmp_path / "x.pt").exists()
