"""The safe loader's refusal lists every global a file needs at once, as flags that work pasted.

A model that pickles a config class, an Enum, a namedtuple, a dataclass and a function (as real
checkpoints do) must load after ONE refusal: the message names every class as ``--allow
MODULE:NAME`` and every function apart as ``--allow-function MODULE:NAME``; globals of modules
that can run code are never offered.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import re
import shlex
import zipfile

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from decompose import DecomposeError
from decompose.cli import cli
from decompose.io.files import load_model


class Settings:
    """A plain config class, as transformers pickles its configs."""

    def __init__(self, width: int = 4) -> None:
        self.width = width


class Act(enum.Enum):
    RELU = "relu"
    GELU = "gelu"


Geometry = collections.namedtuple("Geometry", "kernel stride")


@dataclasses.dataclass
class Extra:
    scale: float = 1.0


def relu_fn(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x)


class Configured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings()
        self.act = Act.RELU
        self.geometry = Geometry(3, 1)
        self.extra = Extra()
        self.fn = relu_fn
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.fn(self.conv(x))) * self.extra.scale


class Dangerous:
    def __reduce__(self):
        import os
        return (os.getcwd, ())


NEEDED = [f"{__name__}:{n}" for n in ("Configured", "Settings", "Act", "Geometry", "Extra")]


def refusal(f, **kwargs) -> str:
    with pytest.raises(DecomposeError) as info:
        load_model(f, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "weights_only" not in msg
    return msg


def hinted(msg: str) -> list[str]:
    """The flags of the message, as a user pastes them."""
    words = shlex.split(msg.replace(";", " "))
    out = []
    for i, w in enumerate(words[:-1]):
        if w in ("--allow", "--allow-function"):
            out += [w, words[i + 1]]
    return out


def as_kwargs(flags: list[str]) -> dict[str, list[str]]:
    pairs = list(zip(flags[::2], flags[1::2]))
    return {"allow": [v for k, v in pairs if k == "--allow"],
            "allow_functions": [v for k, v in pairs if k == "--allow-function"]}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-state-dict"])
def test_one_refusal_lists_every_global_and_the_pasted_flags_load(tmp_path, legacy):
    f = tmp_path / "m.pt"
    if legacy:  # legacy files restore no modules: a checkpoint with its config objects
        torch.save({"state_dict": Configured().state_dict(), "settings": Settings(),
                    "act": Act.GELU, "geometry": Geometry(3, 2), "extra": Extra(2.0),
                    "fn": relu_fn}, f, _use_new_zipfile_serialization=False)
        kw = {"arch": f"{__name__}:Configured"}
    else:
        torch.save(Configured(), f)
        kw = {}
    msg = refusal(f, **kw)
    flags = hinted(msg)
    classes = NEEDED[int(legacy):]  # the checkpoint's model class comes from --arch
    assert as_kwargs(flags) == {"allow": classes,
                                "allow_functions": [f"{__name__}:relu_fn"]}, msg
    # functions are hinted apart, with the warning, after the classes
    assert re.search(r"--allow [^;]*; for the function it names, only if you trust its author, "
                     r"also pass --allow-function", msg), msg
    loaded = load_model(f, **kw, **as_kwargs(flags))
    if not legacy:
        m = loaded.model
        assert isinstance(m, Configured) and m.act is Act.RELU and m.geometry == (3, 1)
        assert m.fn is relu_fn and m.extra == Extra() and m.settings.width == 4
        x = torch.randn(1, 3, 8, 8)
        assert torch.equal(m(x), m(x))
    # classes alone are not enough: the function stays refused until it is named
    msg2 = refusal(f, **kw, allow=as_kwargs(flags)["allow"])
    assert as_kwargs(hinted(msg2)) == {"allow": [], "allow_functions": [f"{__name__}:relu_fn"]}


def test_the_cli_loads_in_one_step_with_the_hinted_flags(tmp_path):
    f = tmp_path / "m.pt"
    torch.save(Configured(), f)
    runner = CliRunner()
    res = runner.invoke(cli, ["report", str(f), "--input-shape", "3,16,16"])
    assert res.exit_code == 1
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(err) == 1, res.stderr
    flags = hinted(err[0])
    assert flags.count("--allow") == 5 and flags.count("--allow-function") == 1, err[0]
    res = runner.invoke(cli, ["report", str(f), "--input-shape", "3,16,16", *flags])
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "small.pt"
    res = runner.invoke(cli, [str(f), "--input-shape", "3,16,16", "--rank", "1", "-o", str(out),
                              "--no-latency", "-q", *flags])
    assert res.exit_code == 0, res.stderr
    assert out.exists()


def test_a_dangerous_global_hints_nothing(tmp_path):
    f = tmp_path / "evil.pt"
    torch.save({"model": Configured(), "payload": Dangerous()}, f)
    msg = refusal(f)
    assert "os.getcwd" in msg or "posix.getcwd" in msg, msg
    assert "do not load this file" in msg and "--allow" not in msg, msg


def test_globals_that_cannot_be_imported_are_named_as_such(tmp_path):
    f = tmp_path / "m.pt"
    torch.save({"state_dict": Configured().state_dict(), "settings": Settings(),
                "act": Act.RELU}, f)
    # the file as another program wrote it: its config class lives in a module not here
    g = tmp_path / "moved.pt"
    with zipfile.ZipFile(io.BytesIO(f.read_bytes())) as src, \
            zipfile.ZipFile(g, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(__name__.encode() + b"\nSettings",
                                    b"gone_module_xyz\nSettings")
            dst.writestr(info, data)
    msg = refusal(g, arch=f"{__name__}:Configured")
    assert "not importable here" in msg and "gone_module_xyz:Settings" in msg, msg
    assert f"--allow {__name__}:Act" in msg and "--allow gone_module_xyz" not in msg, msg


def test_a_refused_global_of_an_unreadable_pickle_is_still_named(tmp_path, monkeypatch):
    """Where the file cannot be read statically, the first refused global is named, as before."""
    from decompose.io import safeload
    f = tmp_path / "m.pt"
    torch.save(Configured(), f)
    monkeypatch.setattr(safeload, "_pickle_globals", lambda *a: None)
    msg = refusal(f)
    assert f"it asks for {__name__}.Configured" in msg and f"--allow {__name__}:Configured" in msg


class WithGelu(nn.Module):
    """As transformers' GELUActivation: keeps torch.nn.functional.gelu (torch._C._nn.gelu)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.functional.gelu

    def forward(self, x):
        return self.act(self.conv(x))


def test_tensor_ops_of_torch_C_are_functions_to_allow_not_dangerous(tmp_path):
    """Found by the zoo: every transformers model with GELU was refused as 'would run code'
    (torch._C is a dangerous module), with no way to load it but --trust."""
    f = tmp_path / "gelu.pt"
    torch.save(WithGelu(), f)
    msg = refusal(f)
    flags = as_kwargs(hinted(msg))
    assert flags == {"allow": [f"{__name__}:WithGelu"],
                     "allow_functions": ["torch._C._nn:gelu"]}, msg
    assert "do not load" not in msg
    m = load_model(f, **flags).model
    assert m.act is nn.functional.gelu
    # the rest of torch._C stays out of reach
    with pytest.raises(DecomposeError, match="arbitrary code"):
        load_model(f, allow_functions=["torch._C:_get_tracing_state"])
