"""Fine-tuning: config validation, the loss, the schedule, checkpoints and resume (in process,
after SIGINT and after SIGKILL in a subprocess), DDP on two CPU processes, and the CLI's errors.

Data: scikit-learn's 8x8 digits (no download) as .npz files, a digits CNN trained for a second
as the teacher, and its rank-1 decoupling as the student.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import decompose
from decompose.cli import cli
from decompose.errors import DecomposeError
from decompose.io.files import load_model, save_model
from decompose.recover.finetune import (
    FinetuneConfig,
    FinetuneInterrupted,
    FinetuneReport,
    distillation_loss,
    finetune,
)
from decompose.recover.finetune import _checkpoint as ckpt
from decompose.recover.finetune.config import LOG_FIELDS
from decompose.recover.finetune.loop import _lr_factor

REPO = Path(__file__).resolve().parents[1]
# 8x8 one-channel digits stored as floats in [0, 1], which is what the digits CNN was trained on
DIGITS = ["--grayscale", "--mean", "0", "--std", "1", "--no-augment", "-q"]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast, and many times faster on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from decompose.models.digits import digits_cnn, load_digits_tensors, train_digits_cnn

    d = tmp_path_factory.mktemp("ft")
    xtr, ytr, xte, yte = load_digits_tensors()
    np.savez(d / "train.npz", x=xtr.numpy(), y=ytr.numpy())
    np.savez(d / "val.npz", x=xte[:200].numpy(), y=yte[:200].numpy())
    np.savez(d / "noy.npz", x=xtr[:50].numpy())
    teacher = train_digits_cnn(epochs=2)
    save_model(teacher, d / "teacher.pt")
    student, _ = decompose.api.decompose(teacher, rank=1)
    save_model(student, d / "student.pt")
    torch.manual_seed(1)
    save_model(digits_cnn(num_classes=5), d / "teacher5.pt")
    return d


def _toy(n: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :3].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def _net(seed: int = 0, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, classes))


def _run_cli(args: list[str]):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_subset_is_used_as_given_not_its_parent():
    """A torch Subset has a .dataset attribute (its parent): fine-tuning must use the subset."""
    from torch.utils.data import DataLoader, Subset
    full = _toy(96)
    train, val = Subset(full, list(range(0, 96, 3))), Subset(full, list(range(1, 96, 4)))
    res = finetune(_net(), train, val, config=FinetuneConfig(epochs=1, batch_size=8,
                                                             device="cpu"), progress=False)
    assert res.train_images == 32 and res.best.n == 24
    res = finetune(_net(), DataLoader(train, batch_size=8), DataLoader(val, batch_size=8),
                   config=FinetuneConfig(epochs=1, batch_size=8, device="cpu"), progress=False)
    assert res.train_images == 32 and res.best.n == 24


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, flag", [
    (dict(epochs=0), "--epochs"), (dict(lr=0), "--lr"), (dict(lr=float("nan")), "--lr"),
    (dict(momentum=1.0), "--momentum"), (dict(kd_weight=1.5), "--kd-weight"),
    (dict(temperature=0), "--temperature"), (dict(batch_size=0), "--batch-size"),
    (dict(warmup_epochs=3, epochs=3), "--warmup-epochs"), (dict(limit=0), "--limit"),
    (dict(epochs=True), "--epochs"),
])
def test_config_rejects_bad_values_naming_the_flag(kwargs, flag):
    with pytest.raises(DecomposeError, match=flag):
        FinetuneConfig(**kwargs)


def test_config_rejects_unknown_choices_listing_valid_ones():
    with pytest.raises(DecomposeError, match="sgd, adamw"):
        FinetuneConfig(optimizer="adam")
    with pytest.raises(DecomposeError, match="auto, cpu, cuda"):
        FinetuneConfig(device="gpu")


def test_config_round_trips_through_json():
    cfg = FinetuneConfig(epochs=3, optimizer="adamw", lr=1e-3, kd_weight=0.7, log="a.csv")
    assert FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(DecomposeError, match="unknown"):
        FinetuneConfig.from_dict({"epoch": 3})


def test_kd_weight_default_depends_on_teacher():
    assert FinetuneConfig().kd_weight_for(True) == 0.5
    assert FinetuneConfig().kd_weight_for(False) == 0.0
    assert FinetuneConfig(kd_weight=0.2).kd_weight_for(True) == 0.2


# ------------------------------------------------------------------------------------ pieces
def test_distillation_loss_is_hinton_kl_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    temp = 3.0
    p, q = torch.softmax(t / temp, 1), torch.softmax(s / temp, 1)
    want = (p * (p.log() - q.log())).sum(1).mean() * temp ** 2
    torch.testing.assert_close(distillation_loss(s, t, temp), want)
    assert distillation_loss(t, t, temp).abs() < 1e-6


def test_cosine_schedule_with_warmup():
    cfg = FinetuneConfig(epochs=4, lr=0.1, warmup_epochs=1, min_lr=0.01)
    f = _lr_factor(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up
    assert f(10) == pytest.approx(1.0)
    assert f(40) == pytest.approx(0.1)  # min_lr / lr at the end
    assert f(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    flat = _lr_factor(FinetuneConfig(epochs=2, schedule="constant"), 5)
    assert flat(0) == flat(9) == 1.0


# ------------------------------------------------------------------------------------ library
def test_finetune_learns_writes_best_and_logs(tmp_path):
    ds = _toy()
    teacher, student = _net(1), _net(2)
    cfg = FinetuneConfig(epochs=3, lr=0.05, batch_size=16, device="cpu",
                         checkpoint=str(tmp_path / "c.ckpt"), log=str(tmp_path / "log.csv"))
    res = finetune(student, ds, ds, teacher=teacher, config=cfg, output=tmp_path / "best.pt",
                   progress=False)
    assert res.kd_weight == 0.5 and res.best_epoch >= 1 and len(res.history) == 3
    assert res.best.top1 == max(r["val_top1"] for r in res.history)
    assert res.before is not None and res.teacher is not None and res.train_images == 96
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0].split(",") == list(LOG_FIELDS) and len(lines) == 4
    loaded = load_model(tmp_path / "best.pt")  # the safe loader reads the best model
    assert loaded.kind == "decomposed" and loaded.meta["finetune"]["best_epoch"] == res.best_epoch
    assert _state_equal(loaded.model, student)  # the model holds the best epoch's weights
    ck = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert ck["epoch"] == 3 and ck["step"] == 0 and "rng" in ck and "optimizer" in ck
    text = str(FinetuneReport(res))
    assert "original (teacher)" in text and "before" in text


def test_finetune_refuses_unlabelled_and_mismatched_inputs():
    ds = _toy()
    unlabelled = TensorDataset(ds.tensors[0])
    with pytest.raises(DecomposeError, match="no class labels"):
        finetune(_net(), unlabelled, ds, epochs=1, progress=False)
    with pytest.raises(DecomposeError, match="do not match"):
        finetune(_net(), ds, ds, teacher=_net(classes=6), epochs=1, progress=False)
    with pytest.raises(DecomposeError, match="needs a teacher"):
        finetune(_net(), ds, ds, kd_weight=0.5, epochs=1, progress=False)
    with pytest.raises(DecomposeError, match="only 3 outputs"):
        finetune(_net(classes=3), ds, ds, epochs=1, progress=False)


class _SignalAt(Dataset):
    """Wraps a dataset and sends SIGINT to this process at the n-th item read."""

    def __init__(self, ds: Dataset, at: int | None) -> None:
        self.ds, self.at, self.reads = ds, at, 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        self.reads += 1
        if self.reads == self.at:
            signal.raise_signal(signal.SIGINT)
        return self.ds[i]


@pytest.mark.parametrize("at", [40, 96 + 2])  # inside epoch 1; then after epoch 1's last batch
def test_sigint_saves_and_resume_gives_the_uninterrupted_result(tmp_path, at):
    ds = _toy()
    kw = dict(epochs=2, lr=0.05, batch_size=16, device="cpu", seed=3)
    ref = _net(2)
    finetune(ref, ds, ds, teacher=_net(1), config=FinetuneConfig(**kw), progress=False)

    cfg = FinetuneConfig(**kw, checkpoint=str(tmp_path / "c.ckpt"), log=str(tmp_path / "l.jsonl"))
    student = _net(2)
    with pytest.raises(FinetuneInterrupted, match="--resume") as e:
        finetune(student, _SignalAt(ds, at), ds, teacher=_net(1), config=cfg, progress=False)
    assert e.value.signal_name == "SIGINT"
    ck = ckpt.read_checkpoint(cfg.checkpoint)
    assert (ck["epoch"], ck["step"] > 0) in ((0, True), (1, False), (1, True))
    again = _net(5)  # other initial weights: everything must come from the checkpoint
    res = finetune(again, ds, ds, teacher=_net(1), config=cfg, resume=True, progress=False)
    assert res.start_epoch == ck["epoch"] and [r["epoch"] for r in res.history] == [1, 2]
    assert _state_equal(again, ref)
    lines = (tmp_path / "l.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]


def test_resume_refuses_another_model_or_other_settings(tmp_path):
    ds = _toy()
    cfg = FinetuneConfig(epochs=1, batch_size=32, device="cpu", checkpoint=str(tmp_path / "c"))
    finetune(_net(), ds, ds, config=cfg, progress=False)
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 4))
    with pytest.raises(DecomposeError, match="another model"):
        finetune(other, ds, ds, config=cfg, resume=True, progress=False)
    with pytest.raises(DecomposeError, match="other settings.*lr"):
        finetune(_net(), ds, ds, config=cfg, resume=True, lr=0.5, progress=False)
    with pytest.raises(DecomposeError, match="--resume to continue"):
        finetune(_net(), ds, ds, config=cfg, progress=False)
    done = finetune(_net(), ds, ds, config=cfg, resume=True, epochs=2, progress=False)
    assert [r["epoch"] for r in done.history] == [1, 2] and done.start_epoch == 1


# ------------------------------------------------------------------------------------ CLI
def test_cli_reports_json_with_control(files, tmp_path):
    out = tmp_path / "s.pt"
    r = _run_cli(["finetune", files / "student.pt", "--data", files / "train.npz", "--val",
                  files / "val.npz", "--epochs", "1", "--limit", "300", "--teacher",
                  files / "teacher.pt", "--control", "-o", out, "--json", *DIGITS])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    for key in ("teacher", "before", "after", "control"):
        assert 0 <= rep[key]["top1"] <= 1 and rep[key]["n"] == 200
    assert rep["drop_vs_control_points"] == pytest.approx(
        100 * (rep["control"]["top1"] - rep["after"]["top1"]), abs=1e-3)
    assert rep["train_images"] == 300 and rep["epochs"] == 1
    assert load_model(out).meta["finetuned_from"].endswith("student.pt")
    assert (tmp_path / "s.control.ckpt").exists() and (tmp_path / "s.control.log.jsonl").exists()


def test_cli_help_has_examples():
    r = _run_cli(["finetune", "--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "--kd-weight" in r.output


def _folder(root: Path, classes: list[str], n: int = 3) -> Path:
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), color=10 * i).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("case", ["no-y", "classes", "teacher", "resume-other", "exists",
                                  "no-checkpoint"])
def test_cli_errors_are_one_line_and_write_nothing(files, tmp_path, case):
    out = tmp_path / "s.pt"
    args = ["finetune", files / "student.pt", "--data", files / "train.npz", "--val",
            files / "val.npz", "--epochs", "1", "-o", out, "--limit", "64", *DIGITS]
    if case == "no-y":
        args[3] = files / "noy.npz"
    elif case == "classes":
        args[3] = _folder(tmp_path / "tr", [str(i) for i in range(10)])
        args[5] = _folder(tmp_path / "va", [str(i) for i in range(9)] + ["x"])
    elif case == "teacher":
        args += ["--teacher", files / "teacher5.pt"]
    elif case == "resume-other":  # a checkpoint made while fine-tuning the teacher
        first = _run_cli(["finetune", files / "teacher.pt", "--data", files / "train.npz",
                          "--val", files / "val.npz", "--epochs", "1", "--limit", "64",
                          "-o", tmp_path / "t.pt", *DIGITS])
        assert first.exit_code == 0, first.output
        args += ["--resume", "--checkpoint", tmp_path / "t.ckpt"]
    elif case == "exists":
        out.write_bytes(b"keep me")
    elif case == "no-checkpoint":
        args += ["--resume"]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = _run_cli(args)
    assert r.exit_code != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: "), r.stderr
    expected = {"no-y": "no labels", "classes": "classes differ", "teacher": "do not match",
                "resume-other": "another model", "exists": "--force",
                "no-checkpoint": "no checkpoint"}[case]
    assert expected in err[0]
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


# ------------------------------------------------------------------------------------ processes
def _cli_proc(args: list, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = "from decompose.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _log_epochs(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(s)["epoch"] for s in path.read_text().splitlines() if s.strip()]


@pytest.mark.slow
def test_sigkill_mid_epoch_loses_at_most_one_epoch_and_resume_completes(files, tmp_path):
    out, log = tmp_path / "s.pt", tmp_path / "s.log.jsonl"
    epochs = 5
    args = ["finetune", files / "student.pt", "--data", files / "train.npz", "--val",
            files / "val.npz", "--epochs", epochs, "--batch-size", "8", "--teacher",
            files / "teacher.pt", "-o", out, "--json", *DIGITS]
    p = _cli_proc(args)
    deadline = time.time() + 60
    while not _log_epochs(log) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch (about 180 batches each)
    done_at_kill = _log_epochs(log)
    p.kill()  # SIGKILL: no handler runs
    p.communicate()
    assert 1 <= len(done_at_kill) < epochs, "the run must be killed after epoch 1, before the end"
    ck = ckpt.read_checkpoint(tmp_path / "s.ckpt")
    assert ck["epoch"] >= len(done_at_kill)  # at most the epoch in progress was lost
    load_model(out)  # the best model so far is complete and loadable

    p = _cli_proc([*args, "--resume"])
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    rep = json.loads(stdout)
    assert [h["epoch"] for h in rep["history"]] == list(range(1, epochs + 1))
    assert _log_epochs(log) == list(range(1, epochs + 1))
    assert load_model(out).meta["finetune"]["best_epoch"] == rep["best_epoch"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(files, tmp_path):
    log = tmp_path / "s.log.jsonl"
    args = ["finetune", files / "student.pt", "--data", files / "train.npz", "--val",
            files / "val.npz", "--epochs", "4", "--batch-size", "8", "-o", tmp_path / "s.pt",
            *DIGITS]
    p = _cli_proc(args)
    deadline = time.time() + 60
    while not _log_epochs(log) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 143, stderr
    assert "Traceback" not in stderr and "--resume" in stderr.strip().splitlines()[-1]
    ck = ckpt.read_checkpoint(tmp_path / "s.ckpt")
    assert ck["epoch"] >= 1


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed or pid-derived one can be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_two_cpu_processes(files, tmp_path):
    out = tmp_path / "s.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = tmp_path / "decompose_cli.py"
    script.write_text("from decompose.cli import main\nmain()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), script, "finetune", files / "student.pt", "--data", files / "train.npz", "--val",
           files / "val.npz", "--epochs", "2", "--limit", "256", "--batch-size", "32",
           "--teacher", files / "teacher.pt", "--device", "cpu", "-o", out, "--json", *DIGITS]
    r = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)  # only rank 0 prints
    assert rep["world_size"] == 2 and rep["after"]["n"] == 200 and rep["train_images"] == 256
    assert _log_epochs(tmp_path / "s.log.jsonl") == [1, 2]
    assert load_model(out).meta["finetune"]["best_epoch"] == rep["best_epoch"]


# ------------------------------------------------------------------------------------ train form
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("conv", [
    dict(cin=8, cout=12, k=3, stride=1, padding=1, groups=1, bias=True),
    dict(cin=8, cout=12, k=3, stride=2, padding=1, groups=2, bias=False),
    dict(cin=6, cout=6, k=(3, 5), stride=1, padding=(1, 2), groups=3, bias=True,
         padding_mode="reflect"),
])
def test_dense_training_form_is_the_same_function_and_gradients(order, conv):
    from decompose.methods.nd.layers import decouple_conv
    from decompose.recover.finetune._train_form import dense_training, strip

    c = nn.Conv2d(conv["cin"], conv["cout"], conv["k"], stride=conv["stride"],
                  padding=conv["padding"], groups=conv["groups"], bias=conv["bias"],
                  padding_mode=conv.get("padding_mode", "zeros"))
    plain = nn.Sequential(decouple_conv(c, 2, order))
    dense = nn.Sequential(decouple_conv(c, 2, order))
    x = torch.randn(3, conv["cin"], 9, 9)
    with dense_training(dense, "dense", torch.device("cpu")) as n:
        assert n == 1
        y = dense(x)
        y.square().sum().backward()
        snapshot = strip(copy.deepcopy(dense))
    plain(x).square().sum().backward()
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(dense.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    assert "forward" not in dense[0].__dict__ and "forward" not in snapshot[0].__dict__


def test_finetune_with_dense_form_saves_a_decoupled_safe_model(files, tmp_path):
    from decompose.methods.nd.layers import is_decoupled

    loaded = load_model(files / "student.pt")
    from decompose.data import make_loader
    tr = make_loader(files / "train.npz", grayscale=True, mean=(0,), std=(1,), limit=128)
    va = make_loader(files / "val.npz", grayscale=True, mean=(0,), std=(1,))
    res = finetune(loaded.model, tr, va, epochs=1, batch_size=32, train_form="dense",
                   output=tmp_path / "s.pt", progress=False)
    out = load_model(tmp_path / "s.pt").model  # the weights-only loader: no class of ours
    assert any(is_decoupled(m) for m in out.modules())
    assert not any("forward" in m.__dict__ for m in out.modules())
    assert res.best_epoch == 1


def test_dw1_form_layers_train_in_their_own_form():
    """A dw1-form layer is not composed into one dense conv for training (its repeat/sum modules
    are not part of the composed kernel): training sees exactly the module's own function."""
    import copy

    from decompose.methods.nd.forms import fast_form
    from decompose.methods.nd.layers import decouple_conv
    from decompose.recover.finetune._train_form import dense_training

    seq = decouple_conv(torch.nn.Conv2d(4, 6, 3, padding=1), 2, "pw-dw")
    dw1 = fast_form(seq, "dw1")
    model = torch.nn.Sequential(dw1)
    x = torch.randn(2, 4, 8, 8)
    ref = copy.deepcopy(model)(x)
    with dense_training(model, "dense", torch.device("cpu")):
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5)
