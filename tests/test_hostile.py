"""Issue 13: hostile files, odd paths and bad inputs end in one line on stderr with a cause and a
fix, and a non-zero exit: never a traceback, a signal, a hang, damage to the user's files, or a
silent wrong answer. Each test names the case of docs/reliability.md it checks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import Exiting, NaNOut, Raising
from click.testing import CliRunner
from conftest import tiny_cnn
from hostile import call, nested_dicts, nested_lists, with_pickle, zip_bomb
from test_write import _fill
from torch import nn

import decompose
from decompose import DecomposeError
from decompose.cli import cli
from decompose.io.files import load_model, save_model
from decompose.recover.finetune import _checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 8, 8)


# ----------------------------------------------------------------------------- helpers
def cli_run(*args):
    args = [str(a) for a in args]
    if args and args[0] not in cli.commands and "--latency" not in args:
        args.append("--no-latency")
    return CliRunner().invoke(cli, args)


def one_line_error(res, code: int | None = None) -> str:
    assert res.exit_code != 0, res.output
    if code is not None:
        assert res.exit_code == code, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert "Traceback" not in res.output + res.stderr
    assert "weights_only" not in res.stderr  # never PyTorch's advice to load unsafely
    return errors[0]


def small_cnn() -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    m.input_shape = SHAPE
    return m


@pytest.fixture
def model_file(tmp_path):
    f = tmp_path / "model.pt"
    torch.save(small_cnn(), f)
    return f


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "data.npz"
    np.savez(f, x=rng.integers(0, 255, (24, 3, 8, 8), dtype=np.uint8), y=np.arange(24) % 5)
    return f


# ----------------------------------------------------------------------------- damage
def test_sweep_csv_never_replaces_a_file_without_force_nor_an_input(model_file, tmp_path):
    before = model_file.read_bytes()
    one_line_error(cli_run("sweep", model_file, "--ranks", 1, "--csv", model_file, "--force"))
    assert model_file.read_bytes() == before  # the input model stays the input model
    csv = tmp_path / "s.csv"
    csv.write_text("keep me")
    assert "exists" in one_line_error(cli_run("sweep", model_file, "--ranks", 1, "--csv", csv))
    assert csv.read_text() == "keep me"
    res = cli_run("sweep", model_file, "--ranks", 1, "--csv", csv, "--force", "-q")
    assert res.exit_code == 0, res.stderr
    assert csv.read_text().startswith("setting,")


def test_sweep_plot_never_replaces_a_figure_without_force(model_file, tmp_path):
    pytest.importorskip("matplotlib")
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "sweep.png").write_bytes(b"keep me")
    assert "exists" in one_line_error(cli_run("sweep", model_file, "--ranks", 1, "--plot", figs))
    assert (figs / "sweep.png").read_bytes() == b"keep me"


def test_finetune_log_and_checkpoint_rules(tmp_path, npz):
    student = tmp_path / "s.pt"
    save_model(small_cnn(), student)
    log = tmp_path / "run.log.jsonl"
    log.write_text("an old log\n")
    common = ["finetune", student, "--data", npz, "--val", npz, "--epochs", 1, "-q"]
    assert "exists" in one_line_error(cli_run(*common, "--log", log))
    assert log.read_text() == "an old log\n"
    before = student.read_bytes()
    err = one_line_error(cli_run(*common, "--checkpoint", student, "--force"))
    assert "which this command reads" in err
    assert student.read_bytes() == before  # the model did not become a checkpoint
    err = one_line_error(cli_run(*common, "--checkpoint", tmp_path / "x.pt", "-o",
                                 tmp_path / "x.pt"))
    assert "same file" in err


def test_output_to_devices_fifos_folders_and_links(model_file, tmp_path):
    one_line_error(cli_run(model_file, "-o", "/dev/null", "--force"))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "FIFO" in one_line_error(cli_run(model_file, "-o", fifo, "--force"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert "names a folder" in one_line_error(cli_run(model_file, "-o", f"{tmp_path}/newdir/"))
    assert not (tmp_path / "newdir").exists()
    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to("nowhere.pt")
    one_line_error(cli_run(model_file, "-o", dangling, "--force"))
    assert not (tmp_path / "nowhere.pt").exists()
    target = tmp_path / "target.pt"
    target.write_bytes(b"old")
    link = tmp_path / "link.pt"
    link.symlink_to(target.name)
    assert "symbolic link" in one_line_error(cli_run(model_file, "-o", link))
    res = cli_run(model_file, "-o", link, "--force", "-q")
    assert res.exit_code == 0, res.stderr
    assert link.is_symlink() and load_model(target).kind == "decomposed"


def test_outputs_honour_the_umask(model_file, tmp_path):
    old = os.umask(0o022)
    try:
        res = cli_run(model_file, "-o", tmp_path / "out.pt", "-q")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "out.pt").st_mode) == 0o644  # was always 0600


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("content", [b"abc", b"PK", b"PK\x03\x04garbage", b"\x80\x02\x8a\x0a"])
def test_garbage_and_truncated_files(tmp_path, content):
    f = tmp_path / "bad.pt"
    f.write_bytes(content)
    err = one_line_error(cli_run("report", f))
    assert "bad.pt" in err and ("corrupt" in err or "not a PyTorch" in err)


def test_name_too_long(tmp_path, model_file):
    long = tmp_path / ("m" * 300 + ".pt")
    assert "too long" in one_line_error(cli_run("report", long)) or \
        "bytes long" in one_line_error(cli_run("report", long))
    assert "bytes long" in one_line_error(cli_run(model_file, "-o", tmp_path / ("o" * 300)))


@pytest.mark.parametrize("pkl", [nested_dicts(2000), nested_dicts(5000, "x"), nested_lists(3000)],
                         ids=["state_dict-keys", "other-keys", "lists"])
def test_deeply_nested_pickles(tmp_path, pkl):
    f = with_pickle(tmp_path / "nested.pt", pkl)
    err = one_line_error(cli_run("report", f, "--arch", "builders:tiny"))
    assert "nested.pt" in err


def test_malformed_meta_and_versions(tmp_path):
    good = tmp_path / "good.pt"
    save_model(small_cnn(), good, {"input_shape": list(SHAPE)})
    payload = torch.load(good, weights_only=False)
    cases = {
        "v999": ({"version": 999}, "newer decompose"),
        "vstr": ({"version": "1"}, "malformed format version"),
        "meta-list": ({"meta": [1, 2]}, "malformed metadata"),
        "meta-shape": ({"meta": {"input_shape": "abc"}}, "malformed metadata"),
        "meta-shape-neg": ({"meta": {"input_shape": [3, -1, 8]}}, "malformed metadata"),
        "meta-layers": ({"meta": {"layers": 5}}, "malformed metadata"),
        "no-model": ({"model": {"a": 1}}, "without a model"),
        "checksum": ({"checksum": "x"}, "malformed checksum"),
    }
    for name, (change, match) in cases.items():
        f = tmp_path / f"{name}.pt"
        bad = {**payload, **change}
        if "meta" in change or "model" in change:
            bad.pop("checksum")  # these stand for files written before checksums existed
        torch.save(bad, f)
        assert match in one_line_error(cli_run("report", f)), name


def test_files_without_a_checksum_still_load(tmp_path):
    """What the current main writes (format 1, no checksum) loads, as "unverified"."""
    model = small_cnn()
    f = tmp_path / "old.pt"
    torch.save({"format": "decompose", "version": 1, "model": model,
                "meta": {"input_shape": list(SHAPE)}}, f)
    loaded = load_model(f)
    assert loaded.kind == "decomposed" and loaded.checksum == "unverified"
    g = save_model(model, tmp_path / "new.pt")
    assert load_model(g).checksum == "verified"


def test_damaged_weights_do_not_load(tmp_path):
    good = tmp_path / "good.pt"
    save_model(small_cnn(), good)
    payload = torch.load(good, weights_only=False)
    with torch.no_grad():
        payload["model"][0].weight[0, 0, 0, 0] += 1  # different weights, same stored checksum
    torch.save(payload, tmp_path / "tampered.pt")
    assert "do not match the checksum" in one_line_error(cli_run("report",
                                                                 tmp_path / "tampered.pt"))
    payload = torch.load(good, weights_only=False)
    payload["model"][0].stride = (2, 2)  # same weights, another layer
    torch.save(payload, tmp_path / "restrided.pt")
    one_line_error(cli_run("report", tmp_path / "restrided.pt"))
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    assert "corrupt" in one_line_error(cli_run("report", tmp_path / "flipped.pt"))


def test_integer_weights_into_a_float_model_are_refused(tmp_path):
    sd = {k: (v * 100).long() if v.is_floating_point() else v
          for k, v in tiny_cnn().state_dict().items()}
    torch.save(sd, tmp_path / "int.pt")
    err = one_line_error(cli_run("report", tmp_path / "int.pt", "--arch", "builders:tiny"))
    assert "dtype mismatches" in err and "int64" in err
    half = {k: v.half() if v.is_floating_point() else v for k, v in tiny_cnn().state_dict().items()}
    torch.save(half, tmp_path / "half.pt")  # another float width is converted, as before
    assert load_model(tmp_path / "half.pt", arch="builders:tiny").kind == "checkpoint"


def test_data_flags_out_of_range(model_file, npz):
    for flags, match in ((["--resize", 100000], "--resize"), (["--crop", 100000], "--crop"),
                         (["--seed", -1], "--seed"), (["--seed", 2**32], "--seed"),
                         (["--mean", "nan"], "mean"), (["--std", "nan,1,1"], "std"),
                         (["--std", "inf"], "std")):
        err = one_line_error(cli_run("eval", model_file, "--data", npz, *flags))
        assert match in err, flags
    with pytest.raises(DecomposeError, match="at most 8192"):
        decompose.data.make_loader(npz, resize=100000)
    with pytest.raises(DecomposeError, match="seed"):
        decompose.data.make_loader(npz, limit=3, seed=-1)


@pytest.mark.parametrize("cls,what", [(Raising, "custom failure"), (Exiting, "SystemExit")])
def test_eval_on_a_model_whose_forward_fails(tmp_path, npz, cls, what):
    f = tmp_path / "m.pt"
    torch.save(cls(), f)
    err = one_line_error(cli_run("eval", f, "--allow", "builders", "--data", npz), 1)
    assert what in err


def test_user_code_calling_sys_exit(tmp_path, npz):
    torch.save(tiny_cnn().state_dict(), tmp_path / "ck.pt")
    err = one_line_error(cli_run("report", tmp_path / "ck.pt", "--arch", "builders:exits"), 1)
    assert "sys.exit(4)" in err
    torch.save(Exiting(), tmp_path / "exiting.pt")
    res = cli_run(tmp_path / "exiting.pt", "--allow", "builders", "--data", npz)
    assert "SystemExit" in one_line_error(res, 1) or "sys.exit" in res.stderr
    assert not (tmp_path / "exiting.decomposed.pt").exists()


CASES_IN_ONE_PROCESS = """
import json, sys
from click.testing import CliRunner
from decompose.cli import cli
out = []
for args in json.loads(sys.argv[1]):
    res = CliRunner().invoke(cli, args)
    out.append({"code": res.exit_code, "stderr": res.stderr})
print(json.dumps(out))
"""


def cli_cases(cases: list[list], timeout: int = 300) -> list[dict]:
    """Several CLI runs in one fresh process (one torch import), with a timeout: for what could
    hang (FIFOs) or abort (a full disk under torch's own writer) the test process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    res = subprocess.run([sys.executable, "-c", CASES_IN_ONE_PROCESS,
                          json.dumps([[str(a) for a in c] for c in cases])],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fifo_and_device_inputs_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    data = tmp_path / "data.npz"
    os.mkfifo(data)
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    os.mkfifo(images / "a.png")
    model = tmp_path / "real.pt"
    torch.save(small_cnn(), model)
    results = cli_cases([["report", fifo], ["report", "/dev/zero"],
                         ["eval", model, "--data", data], ["eval", model, "--data", images.parent],
                         [model, "--calibrate", data, "--no-latency"]], timeout=240)
    for r, what in zip(results, ["FIFO", "device", "FIFO", "not a regular file", "FIFO"]):
        assert r["code"] == 1 and what in r["stderr"] and "Traceback" not in r["stderr"], r
        assert len(r["stderr"].strip().splitlines()) == 1 or \
            r["stderr"].strip().splitlines()[-1].startswith("Error: "), r


# ----------------------------------------------------------------------------- wrong answers
def test_nan_outputs_are_errors_and_nothing_is_written(tmp_path, npz):
    f = tmp_path / "nan.pt"
    torch.save(NaNOut(), f)
    err = one_line_error(cli_run(f, "--allow", "builders", "--data", npz), 1)
    assert "NaN" in err
    assert not (tmp_path / "nan.decomposed.pt").exists()
    err = one_line_error(cli_run(f, "--allow", "builders", "--latency"), 1)
    assert "NaN" in err
    assert "NaN" in one_line_error(cli_run("eval", f, "--allow", "builders", "--data", npz))


def test_symlink_loop_in_a_data_folder_counts_each_image_once(tmp_path):
    from PIL import Image
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    (root / "a" / "loop").symlink_to("..")          # a -> data -> a -> ...
    (root / "b" / "self").symlink_to(".")           # b/self/self/self/...
    (root / "b" / "again.png").symlink_to("0.png")  # the same file twice in one class
    ds = decompose.data.open_dataset(root)
    assert len(ds) == 6 + 3  # a: its 3 + b's 3 reached through the loop, b: its 3
    names = [ds.describe(i) for i in range(len(ds))]
    assert len({os.path.realpath(n) for n in names[:6]}) == 6
    assert sum(1 for n in names if n.endswith("again.png")) == 0


# ----------------------------------------------------------------------------- memory
def test_allowlisted_constructors_cannot_be_called_from_a_file(tmp_path):
    f = with_pickle(tmp_path / "linear.pt", call("torch.nn.modules.linear", "Linear",
                                                 100000, 10000))
    assert f.stat().st_size < 2000
    with pytest.raises(DecomposeError, match="calls the constructor of torch.nn.modules.linear"):
        load_model(f)


@pytest.mark.parametrize("pkl", [call("builtins", "bytearray", 10**10),
                                 call("torch", "FloatTensor", 100000, 100000)],
                         ids=["bytearray", "FloatTensor"])
def test_memory_a_load_may_take_is_bounded(tmp_path, pkl):
    f = with_pickle(tmp_path / "big.pt", pkl)
    with pytest.raises(DecomposeError, match="needs more than .* MiB of memory"):
        load_model(f)


def test_zip_bomb_is_refused_unread(tmp_path):
    f = zip_bomb(tmp_path / "bomb.pt", megabytes=200)
    assert f.stat().st_size < 2**20
    with pytest.raises(DecomposeError, match="zip bomb"):
        load_model(f)


def test_counting_multiply_adds_allocates_no_activations():
    """--input-shape 3,4000,4000 used to run a 5 GB forward pass just to count."""
    from decompose.engine.trace import trace

    model = tiny_cnn().eval()
    devices = set()
    for m in model.modules():  # hooks travel with the meta copy: they see what the trace runs
        m.register_forward_hook(lambda mod, i, o: devices.add(o.device.type))
    t0 = time.time()
    report = decompose.plan(model, rank=1, input_shape=(3, 4000, 4000))
    assert time.time() - t0 < 60
    assert devices == {"meta"}
    assert report.totals["macs_before"] > 10**10
    assert all(p.device.type == "cpu" for p in model.parameters())  # the model is untouched

    class NeedsData(nn.Module):  # cannot run on meta tensors: traced for real, capped
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if float(x.sum()) >= 0 else x

    assert trace(NeedsData(), (3, 8, 8))["conv"].out_shape == (1, 4, 6, 6)
    with pytest.raises(DecomposeError, match="too large to run for real"):
        trace(NeedsData(), (3, 4000, 4000))


# ----------------------------------------------------------------------------- messages
def test_a_hostile_pickle_is_reported_as_refused(tmp_path):
    f = with_pickle(tmp_path / "evil.pt", call("builtins", "eval", 1))
    err = one_line_error(cli_run("report", f))
    assert "refused" in err and "builtins.eval" in err and "--allow" not in err
    f = with_pickle(tmp_path / "os.pt", call("os", "system", 1))
    err = one_line_error(cli_run("report", f))
    assert "refused" in err and "os.system" in err


def test_allow_takes_classes_only(model_file):
    err = one_line_error(cli_run("report", model_file, "--allow", "builders:exits"))
    assert "not a class" in err and "--allow-function builders:exits" in err
    err = one_line_error(cli_run("report", model_file, "--allow", "builtins:eval"))
    assert "refused" in err
    err = one_line_error(cli_run("report", model_file, "--allow-function", "builtins:eval"))
    assert "refused" in err
    res = cli_run("report", model_file, "--allow-function", "builders:tiny", "--allow",
                  "builders:Custom")
    assert res.exit_code == 0, res.stderr


def test_allow_function_lets_a_file_call_it(tmp_path):
    f = with_pickle(tmp_path / "built.pt", call("builders", "tiny"))
    one_line_error(cli_run("report", f))  # refused without the flag
    res = cli_run("report", f, "--allow-function", "builders:tiny")
    assert res.exit_code == 0, res.stderr


def test_export_compare_bad_fails_before_writing(tmp_path, model_file):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    one_line_error(cli_run("export", model_file, "--onnx", out, "--compare", bad))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- disk full
def _tiny_tmpfs(tmp_path: Path) -> Path:
    from test_write import IS_ROOT


    if not IS_ROOT:
        pytest.skip("needs root to mount a tmpfs (the patched-writer tests cover this)")
    d = tmp_path / "full"
    d.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)],
                         capture_output=True)
    if res.returncode:
        pytest.skip("cannot mount a tmpfs here")
    return d


def test_disk_full_in_every_command_is_one_line(tmp_path, npz):
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))
    big.input_shape = SHAPE
    src = tmp_path / "big.pt"
    torch.save(big, src)
    dec = tmp_path / "big.dec.pt"
    save_model(big, dec)
    full = _tiny_tmpfs(tmp_path)
    try:
        _fill(full)  # to the last block
        cases = [[src, "-o", full / "o.pt", "--no-latency"],
                 ["export", dec, "--torchscript", full / "o.ts"],
                 ["export", dec, "--onnx", full / "o.onnx"],
                 ["finetune", dec, "--data", npz, "--val", npz, "--epochs", 1, "-o",
                  full / "ft.pt"],
                 ["sweep", src, "--ranks", "1,2", "--no-latency", "--csv", full / "s.csv"]]
        results = cli_cases([[*c, "-q"] for c in cases])
        for case, r in zip(cases, results):
            assert r["code"] == 1, (case, r)
            lines = r["stderr"].strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), (case, r)
            assert "no space left" in lines[0], (case, r)
        assert sorted(p.name for p in full.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_disk_full_while_checkpointing_is_one_line(tmp_path, monkeypatch):
    from decompose.io import write as w

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w, "_os_write", full)
    with pytest.raises(DecomposeError, match="no space left"):
        ckpt.write_checkpoint(tmp_path / "c.ckpt", {"model": {"w": torch.ones(3)}})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- more cases
class _NaNWhileTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.fc(self.conv(x).mean((2, 3)))
        return y * float("nan") if self.training else y


def test_a_nan_loss_stops_fine_tuning_in_one_line(tmp_path):
    from torch.utils.data import TensorDataset

    from decompose.recover.finetune import FinetuneConfig, finetune
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 5)
    cfg = FinetuneConfig(epochs=1, batch_size=8, device="cpu", checkpoint=str(tmp_path / "c"),
                         log=str(tmp_path / "l"))
    with pytest.raises(DecomposeError, match="training loss became nan") as e:
        finetune(_NaNWhileTraining(), data, data, config=cfg, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()  # no epoch finished: nothing claims to be one
    assert "--fold-bn" in str(e.value)  # no normalization layer: the likely cause is named


def test_a_nan_loss_with_batchnorm_does_not_blame_folding(tmp_path, capsys):
    from torch.utils.data import TensorDataset

    from decompose.recover.finetune import FinetuneConfig, finetune
    net = _NaNWhileTraining()
    net.conv = nn.Sequential(net.conv, nn.BatchNorm2d(4))
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 5)
    cfg = FinetuneConfig(epochs=1, batch_size=8, device="cpu", checkpoint=str(tmp_path / "c"),
                         log=str(tmp_path / "l"))
    with pytest.raises(DecomposeError, match="training loss became nan") as e:
        finetune(net, data, data, config=cfg, progress=False)
    assert "--fold-bn" not in str(e.value)


def test_a_folded_student_of_a_batchnorm_teacher_gets_a_note(capsys):
    from torch.utils.data import TensorDataset

    from decompose.engine.fold import fold_bn_
    from decompose.recover.finetune import FinetuneConfig, finetune
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    import copy
    student = copy.deepcopy(teacher)
    fold_bn_(student, (3, 8, 8))
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 5)
    finetune(student, data, data, teacher=teacher, config=FinetuneConfig(
        epochs=1, batch_size=8, device="cpu"), progress=True)
    assert "no normalization layers but its teacher does" in capsys.readouterr().err


def test_an_npz_too_big_for_memory_is_refused_before_reading(npz, monkeypatch):
    from decompose.data import arrays
    monkeypatch.setattr(arrays, "_available_memory", lambda: 1000)
    with pytest.raises(DecomposeError, match="more than half"):
        decompose.data.open_dataset(npz)
    monkeypatch.undo()
    assert len(decompose.data.open_dataset(npz)) == 24


def test_an_unexpected_exception_is_still_one_line(model_file, monkeypatch):
    from decompose import api as run_module

    def broken(*a, **k):
        raise TypeError("something nobody expected")

    monkeypatch.setattr(run_module, "load_model", broken)
    err = one_line_error(cli_run("report", model_file), 1)
    assert "unexpected TypeError" in err and "DECOMPOSE_DEBUG" in err
    monkeypatch.setenv("DECOMPOSE_DEBUG", "1")
    res = cli_run("report", model_file)
    assert isinstance(res.exception, TypeError)  # the traceback, for whoever debugs it


def test_allowed_non_module_classes_are_still_restored(tmp_path):
    from builders import Colour
    f = tmp_path / "ck.pt"
    torch.save({"state_dict": tiny_cnn().state_dict(), "colour": Colour.BLUE}, f)
    one_line_error(cli_run("report", f, "--arch", "builders:tiny", "--allow", "hostile"))
    res = cli_run("report", f, "--arch", "builders:tiny", "--allow", "builders:Colour")
    assert res.exit_code == 0, res.stderr
