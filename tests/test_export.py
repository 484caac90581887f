"""Export: ONNX through onnxruntime and TorchScript round-trip a decoupled model; the CLI fails
cleanly on bad input."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import decompose
from decompose import DecomposeError
from decompose.cli import cli
from decompose.io.export import export_onnx, export_pt2, export_torchscript, onnx_latency

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SHAPE = (3, 12, 12)
TOL = 1e-4  # max |export - torch| / max |torch|, float32


def small_decoupled() -> nn.Module:
    """A conv net with a BN, a strided conv and a grouped conv, decoupled at rank 2."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    decompose.decompose_(model, rank=2, input_shape=SHAPE)
    model.input_shape = SHAPE
    return model


@pytest.fixture
def model():
    return small_decoupled()


@pytest.fixture
def model_file(tmp_path, model):
    path = tmp_path / "small.decomposed.pt"
    decompose.io.files.save_model(model, path, {"input_shape": list(SHAPE)})
    return path


def test_onnx_round_trips_through_onnxruntime(tmp_path, model):
    out = tmp_path / "m.onnx"
    res = export_onnx(model, out, SHAPE, batch_size=3)
    assert out.exists() and res.path == str(out)
    assert res.max_rel_err is not None and res.max_rel_err < TOL
    assert res.checked_batches == (3, 1) and res.opset == 17
    # independent check: run the file ourselves at another batch size
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *SHAPE)
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < TOL
    # the decoupled pair is two ONNX Conv nodes, the depthwise one grouped
    import onnx
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    assert len(convs) == 6
    assert any(a.name == "group" and a.i == 8 for n in convs for a in n.attribute)


def test_torchscript_round_trips(tmp_path, model):
    out = tmp_path / "m.ts.pt"
    res = export_torchscript(model, out, SHAPE)
    assert res.max_rel_err is not None and res.max_rel_err < TOL
    loaded = torch.jit.load(str(out))
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert float((loaded(x) - model(x)).abs().max()) < 1e-5


def test_export_refuses_to_overwrite_without_force(tmp_path, model):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(DecomposeError, match="--force"):
        export_onnx(model, out, SHAPE)
    assert out.read_bytes() == b"keep me"
    export_onnx(model, out, SHAPE, force=True)
    assert out.read_bytes() != b"keep me"


def test_output_over_tolerance_writes_nothing(tmp_path, model):
    out = tmp_path / "m.onnx"
    with pytest.raises(DecomposeError, match="tolerance"):
        export_onnx(model, out, SHAPE, tolerance=1e-30)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_onnx_latency_times_files_side_by_side(tmp_path, model):
    a = export_onnx(model, tmp_path / "a.onnx", SHAPE).path
    lat = onnx_latency({"a": a, "b": a}, SHAPE, batch_size=2, threads=1, repeats=3, warmup=1)
    assert list(lat) == ["a", "b"]
    assert all(r.threads == 1 and len(r.samples_ms) == 3 and r.median_ms > 0
               for r in lat.values())


# ----------------------------------------------------------------------------- CLI
def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_cli_exports_both_formats_and_prints_json(tmp_path, model_file):
    onnx_out, ts_out = tmp_path / "m.onnx", tmp_path / "m.ts.pt"
    r = run(["export", str(model_file), "--onnx", str(onnx_out), "--torchscript", str(ts_out),
             "--batch-size", "2", "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["input_shape"] == list(SHAPE) and out["input_shape_source"] == "model.input_shape"
    assert [e["format"] for e in out["exports"]] == ["onnx", "torchscript"]
    assert all(e["max_rel_err"] < TOL for e in out["exports"])
    assert onnx_out.exists() and ts_out.exists()


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_cli_compare_reports_latency(tmp_path, model_file, clock):
    original = tmp_path / "orig.pt"
    orig = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1),
                         nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4))
    torch.save(orig, original)
    r = run(["export", str(model_file), "--onnx", str(tmp_path / "m.onnx"), "--compare",
             str(original), "--repeats", "3", "--threads", "1", "--clock", clock])
    assert r.exit_code == 0, r.output
    assert "onnxruntime latency, batch 1, 1 intra-op thread(s)" in r.stdout
    assert f"rounds, {clock} clock" in r.stdout
    assert "vs original" in r.stdout and "decomposed" in r.stdout


def test_cli_existing_output_needs_force(tmp_path, model_file):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    r = CliRunner().invoke(cli, ["export", str(model_file), "--onnx", str(out)])
    assert r.exit_code == 1
    assert r.stderr.startswith("Error: ") and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert out.read_bytes() == b"old"


def test_cli_missing_onnxruntime_says_how_to_install(tmp_path, model_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    r = CliRunner().invoke(cli, ["export", str(model_file), "--onnx", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1
    assert "pip install onnxruntime" in r.stderr and "--no-check" in r.stderr
    assert not (tmp_path / "m.onnx").exists()
    # without the check the file is written
    r = CliRunner().invoke(cli, ["export", str(model_file), "--onnx", str(tmp_path / "m.onnx"),
                                 "--no-check", "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.onnx").exists()


def test_cli_dynamo_without_onnxscript_says_how_to_install(tmp_path, model_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    r = CliRunner().invoke(cli, ["export", str(model_file), "--onnx", str(tmp_path / "m.onnx"),
                                 "--dynamo"])
    assert r.exit_code == 1 and "pip install onnxscript" in r.stderr
    assert "leave out --dynamo" in r.stderr


@pytest.mark.parametrize("args,needle", [
    ([], "--onnx OUT.onnx, --pt2 OUT.pt2 and/or --torchscript"),
    (["--onnx", "X.pt2", "--pt2", "X.pt2"], "--onnx and --pt2 name the same file"),
    (["--onnx", "X.onnx", "--batch-size", "two"], "--batch-size must be an integer"),
    (["--onnx", "X.onnx", "--input-shape", "3,a"], "--input-shape must be positive"),
    (["--torchscript", "X.pt", "--compare", "orig.pt"], "give --onnx"),
    (["--onnx", "X.onnx", "--compare", "orig.pt", "--clock", "cpu"], "add --threads 1"),
    (["--onnx", "X.onnx", "--compare", "orig.pt", "--clock", "cpu", "--threads", "2"],
     "add --threads 1"),
])
def test_cli_bad_arguments_fail_in_one_line(tmp_path, model_file, args, needle):
    args = [a.replace("X.", str(tmp_path / "X.")) for a in args]
    r = CliRunner().invoke(cli, ["export", str(model_file), *args])
    assert r.exit_code != 0
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_help_has_an_example():
    r = run(["export", "--help"])
    assert r.exit_code == 0 and "decompose export" in r.stdout and "--compare" in r.stdout


def test_pt2_round_trips_through_torch_export_load(tmp_path, model):
    path = tmp_path / "m.pt2"
    res = export_pt2(model, path, SHAPE, batch_size=1)
    assert res.format == "pt2" and res.checked_batches == (1, 2)
    assert res.max_rel_err is not None and res.max_rel_err < TOL
    program = torch.export.load(str(path)).module()
    x = torch.randn(5, *SHAPE)  # the batch axis is dynamic
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(DecomposeError, match="exists"):
        export_pt2(model, path, SHAPE)


def test_pt2_export_failure_names_the_cause_and_no_opset(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y if y.sum() > 0 else -y  # data-dependent: torch.export refuses it

    with pytest.raises(DecomposeError, match="torch.export failed") as e:
        export_pt2(Branchy(), tmp_path / "b.pt2", SHAPE)
    assert "opset" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "b.pt2").exists()


def test_an_onnx_failure_that_is_not_about_the_opset_does_not_blame_it(tmp_path, monkeypatch):
    import decompose.io.export as ex

    def broken(*a, **k):
        raise RuntimeError("Tensors must be on the same device")

    monkeypatch.setattr(ex, "_torch_onnx_export", broken)
    with pytest.raises(DecomposeError, match="ONNX export failed") as e:
        export_onnx(small_decoupled(), tmp_path / "m.onnx", SHAPE)
    assert "--opset" not in str(e.value) and "--dynamo" in str(e.value)

    def opset(*a, **k):
        raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 17 is not "
                           "supported")

    monkeypatch.setattr(ex, "_torch_onnx_export", opset)
    with pytest.raises(DecomposeError, match="another --opset"):
        export_onnx(small_decoupled(), tmp_path / "m.onnx", SHAPE)


def test_a_torchscript_mismatch_does_not_suggest_onnx_flags(tmp_path, model, monkeypatch):
    import decompose.io.export as ex
    monkeypatch.setattr(ex._Errors, "rel", property(lambda self: 1.0))
    with pytest.raises(DecomposeError, match="differs from PyTorch") as e:
        export_torchscript(model, tmp_path / "m.ts", SHAPE)
    assert "opset" not in str(e.value) and "dynamo" not in str(e.value)


def test_cli_writes_a_checked_pt2_and_says_torchscript_is_deprecated(tmp_path, model_file):
    out = tmp_path / "m.pt2"
    r = run(["export", str(model_file), "--pt2", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [e["format"] for e in rep["exports"]] == ["pt2"]
    assert rep["exports"][0]["max_rel_err"] < TOL and out.exists()
    h = run(["export", "--help"])
    assert "--pt2" in h.stdout and "deprecated" in h.stdout
