"""Model files: safe loading (no code runs), checkpoints with --arch, atomic writes, round trips."""

from __future__ import annotations

import os

import pytest
import torch
from builders import Custom
from conftest import tiny_cnn
from torch import nn

import decompose
from decompose import DecomposeError
from decompose.io.files import default_output, load_model, save_model

SHAPE = (3, 16, 16)


class Payload:
    """Unpickling this calls open(path, 'w'): it creates a file if any code from the file runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_payload_never_runs(tmp_path):
    target = tmp_path / "pwned.txt"
    f = tmp_path / "evil.pt"
    torch.save({"model": tiny_cnn(), "extra": Payload(str(target))}, f)
    with pytest.raises(DecomposeError, match="refused .*io.open"):
        load_model(f)
    assert not target.exists()
    f2 = tmp_path / "evil2.pt"
    torch.save(Payload(str(target)), f2)
    with pytest.raises(DecomposeError):
        load_model(f2)
    assert not target.exists()


def test_custom_class_needs_allow(tmp_path):
    f = tmp_path / "custom.pt"
    torch.save(Custom(), f)
    with pytest.raises(DecomposeError, match=r"builders\.Custom.*--allow builders"):
        load_model(f)
    assert isinstance(load_model(f, allow=["builders"]).model, Custom)
    assert isinstance(load_model(f, allow=["builders:Custom"]).model, Custom)
    assert isinstance(load_model(f, trust=True).model, Custom)


def test_whole_module_and_roundtrip(tmp_path):
    model = tiny_cnn().eval()
    f = tmp_path / "m.pt"
    torch.save(model, f)
    loaded = load_model(f)
    assert loaded.kind == "module"
    decompose.decompose_(loaded.model, rank=2, input_shape=SHAPE)
    out = save_model(loaded.model, default_output(f), {"input_shape": list(SHAPE)})
    assert out == tmp_path / "m.decomposed.pt"
    back = load_model(out)
    assert back.kind == "decomposed" and back.meta["input_shape"] == [3, 16, 16]
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(back.model(x), loaded.model(x))
    assert torch.equal(decompose.load(out)(x), loaded.model(x))


def test_checkpoint_with_arch_prefix_and_wrappers(tmp_path):
    model = tiny_cnn()
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    f = tmp_path / "ckpt.th"
    torch.save({"state_dict": sd, "best_prec1": 90.0}, f)
    with pytest.raises(DecomposeError, match="--arch"):
        load_model(f)
    loaded = load_model(f, arch="builders:tiny")
    assert loaded.kind == "checkpoint"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    assert load_model(plain, arch="builders:tiny").kind == "checkpoint"


def test_arch_errors(tmp_path):
    f = tmp_path / "ckpt.th"
    torch.save(tiny_cnn().state_dict(), f)
    with pytest.raises(DecomposeError, match="cannot import"):
        load_model(f, arch="no_such_module_xyz:build")
    with pytest.raises(DecomposeError, match="has no"):
        load_model(f, arch="builders:nope")
    with pytest.raises(DecomposeError, match="does not match --arch"):
        load_model(f, arch="builders:other")
    with pytest.raises(DecomposeError, match="failed to build"):
        load_model(f, arch="builders:broken")
    with pytest.raises(DecomposeError, match="module:function"):
        load_model(f, arch="not a spec")


def test_arch_kwargs_are_literals_only():
    from decompose.io.files import parse_arch
    assert parse_arch("a.b:c(depth=56, name='x')") == ("a.b", "c", {"depth": 56, "name": "x"})
    with pytest.raises(DecomposeError):
        parse_arch("a:b(x=__import__('os'))")


def test_cuda_saved_tensors_load_on_cpu(tmp_path, monkeypatch):
    """A file whose storages say cuda:0 (as the shipped ResNets do) loads on a CPU-only machine."""
    import torch.serialization as ser
    monkeypatch.setattr(ser, "location_tag", lambda storage: "cuda:0")
    f = tmp_path / "cuda.th"
    torch.save({"state_dict": tiny_cnn().state_dict()}, f)
    monkeypatch.undo()
    assert load_model(f, arch="builders:tiny").kind == "checkpoint"


@pytest.mark.parametrize("content,match", [
    (b"", "empty|truncated|not a PyTorch"),
    (b"hello, I am a text file\n" * 10, "not a PyTorch|truncated"),
])
def test_not_a_torch_file(tmp_path, content, match):
    f = tmp_path / "x.pt"
    f.write_bytes(content)
    with pytest.raises(DecomposeError, match=match):
        load_model(f)


def test_truncated_file(tmp_path):
    f = tmp_path / "m.pt"
    torch.save(tiny_cnn(), f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecomposeError, match="truncated or corrupt|not a PyTorch"):
        load_model(f)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DecomposeError, match="not found"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(DecomposeError, match="folder"):
        load_model(tmp_path)


def test_save_never_overwrites_without_force_and_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "o.pt"
    out.write_bytes(b"precious")
    with pytest.raises(DecomposeError, match="--force"):
        save_model(nn.Conv2d(1, 1, 1), out)
    assert out.read_bytes() == b"precious"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(nn.Conv2d(1, 1, 1), out, force=True)
    assert out.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["o.pt"]  # no temporary left behind
    monkeypatch.undo()
    save_model(nn.Conv2d(1, 1, 1), out, force=True)
    assert isinstance(decompose.load(out), nn.Conv2d)


def test_unwritable_output_folder(tmp_path, monkeypatch):
    with pytest.raises(DecomposeError, match="does not exist"):
        save_model(nn.Conv2d(1, 1, 1), tmp_path / "missing" / "o.pt")
    # CI runs as root, who may write anywhere: simulate a read-only folder through os.access
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(DecomposeError, match="cannot write"):
        save_model(nn.Conv2d(1, 1, 1), tmp_path / "o.pt")
    assert not (tmp_path / "o.pt").exists()


def test_checkpoint_without_num_batches_tracked_loads(tmp_path):
    """Checkpoints from before PyTorch 0.4.1 (the shipped CIFAR ResNets) lack BN step counters."""
    model = tiny_cnn()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    f = tmp_path / "old.th"
    torch.save({"state_dict": sd}, f)
    loaded = load_model(f, arch="builders:tiny")
    assert torch.equal(loaded.model[1].running_var, model[1].running_var)


def test_a_model_holding_a_local_hook_names_it_when_it_cannot_be_saved(tmp_path):
    """Found by the zoo (SegFormer): transformers installs forward hooks that are local
    functions on a model's first forward; saving then failed with pickle's words only."""
    model = tiny_cnn()

    def install(module):
        def capturing_hook(mod, args, out):
            return None
        module.register_forward_hook(capturing_hook)

    install(model[3])
    with pytest.raises(DecomposeError, match=r"3 \(capturing_hook\) holds a hook that is a "
                                             r"local function.*state_dict.*--arch"):
        save_model(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
