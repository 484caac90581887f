"""Fuzzing the loader (issue 13): byte-mutated and truncated decompose files, fine-tuning
checkpoints and plain state_dict checkpoints either load with identical weights or fail with the
one-line DecomposeError; nothing else (another exception, a crash, a hang, other weights).

Seeded and bounded: hypothesis runs derandomized (the same examples every run), a fixed number
of examples per target, no deadline per example."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from decompose import DecomposeError
from decompose.io.files import load_model, save_model
from decompose.recover.finetune import _checkpoint as ckpt

EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRUNCATIONS = settings(FUZZ, max_examples=60)


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 3)).eval()
    return m


def _decompose_file() -> bytes:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = save_model(_model(), Path(d) / "m.pt", {"input_shape": [3, 8, 8]})
        return p.read_bytes()


def _checkpoint_file() -> bytes:
    import tempfile
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    payload = {"epoch": 1, "step": 0, "partial": [0.0, 0.0, 0.0, 0.0], "world_size": 1,
               "model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": {},
               "rng": ckpt.rng_state(), "config": {"lr": 0.1}, "history": [{"epoch": 1}],
               "best_top1": 0.5, "best_epoch": 1, "best_state": m.state_dict(), "before": None,
               "teacher": None, "output": None}
    with tempfile.TemporaryDirectory() as d:
        ckpt.write_checkpoint(Path(d) / "c.ckpt", payload)
        return (Path(d) / "c.ckpt").read_bytes()


def _state_dict_file() -> bytes:
    buf = io.BytesIO()
    torch.save({"state_dict": _model().state_dict(), "epoch": 3}, buf)
    return buf.getvalue()


ORIGINAL = {"decompose": _decompose_file(), "checkpoint": _checkpoint_file(),
            "state_dict": _state_dict_file()}
REFERENCE = {k: _model().state_dict() for k in ("decompose", "state_dict")}


def build() -> nn.Module:
    """--arch target for the state_dict files."""
    return _model()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a)


def _load(kind: str, path: Path) -> dict:
    if kind == "decompose":
        return load_model(path).model.state_dict()
    if kind == "state_dict":
        return load_model(path, arch="test_fuzz_loader:build").model.state_dict()
    ck = ckpt.read_checkpoint(path)
    return ck["model"]


def _check(kind: str, data: bytes, tmp: Path) -> str:
    path = tmp / f"{kind}.pt"
    path.write_bytes(data)
    try:
        sd = _load(kind, path)
    except DecomposeError as e:
        text = str(e)
        assert text and "\n" not in text, text
        assert "weights_only" not in text and "Traceback" not in text
        return "refused"
    reference = REFERENCE.get(kind) or torch.load(io.BytesIO(ORIGINAL[kind]),
                                                  weights_only=True)["model"]
    assert _same(sd, reference), "a damaged file loaded with other weights"
    return "loaded"


mutations = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                     min_size=1, max_size=4)


@pytest.mark.parametrize("kind", sorted(ORIGINAL))
def test_mutated_files_load_identically_or_fail_in_one_line(kind, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fuzz-{kind}")
    original = ORIGINAL[kind]
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(mutations)
    def mutate(changes):
        data = bytearray(original)
        for where, xor in changes:
            data[int(where * len(data))] ^= xor
        outcome = _check(kind, bytes(data), tmp)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    mutate()
    assert outcomes.get("refused", 0) > EXAMPLES // 2, outcomes  # the checks do bite


@pytest.mark.parametrize("kind", sorted(ORIGINAL))
def test_truncated_files_fail_in_one_line(kind, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"trunc-{kind}")
    original = ORIGINAL[kind]

    @TRUNCATIONS
    @given(st.integers(0, len(original) - 1))
    def truncate(n):
        assert _check(kind, original[:n], tmp) == "refused"

    truncate()


def test_the_unmutated_files_load():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for kind in ORIGINAL:
            assert _check(kind, ORIGINAL[kind], Path(d)) == "loaded"
