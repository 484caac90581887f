"""The zoo: decompose run on real third-party model definitions (docs/zoo.md).

Each model is built from a small config with seeded random weights (nothing is downloaded) and
must pass every check below; a model whose package is not installed is skipped with the reason
(``pip install`` the zoo packages as ``.ci/run`` does). Through the public API and the CLI:

* rank 1 runs and gives finite outputs of the original's shapes;
* forced full rank (``rank="full"``) is exact: relative output error < 1e-4;
* ``fold_bn`` (with full rank) is exact where there is BatchNorm, and folds them;
* the report's multiply-adds equal an independent hook count (transposed convs included),
  before and after;
* save, weights-only load, the same outputs;
* the CLI loads the original ``torch.save`` file in one step with the hinted ``--allow``;
* ONNX export where the model returns tensors (or a ModelOutput field).
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import math
import os
import shlex

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from zoo_models import ZOO, ZooModel

import decompose
from decompose.cli import cli

EXACT = 1e-4
pytestmark = pytest.mark.zoo


def params(*checks):
    return pytest.mark.parametrize(
        "z", [pytest.param(z, id=z.name, marks=pytest.mark.skipif(
            not z.available(), reason=f"{z.package} is not installed (bash "
                                      "tests/zoo/install.sh; docs/zoo.md)")) for z in ZOO if all(c(z) for c in checks)])


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def zoo_numbers():
    """What docs/zoo.md quotes, per model; written to $ZOO_NUMBERS (a JSON file) when set."""
    numbers: dict[str, dict] = collections.defaultdict(dict)
    yield numbers
    if os.environ.get("ZOO_NUMBERS"):
        with open(os.environ["ZOO_NUMBERS"], "w") as fh:
            json.dump(numbers, fh, indent=1, default=str)


@functools.cache
def _built(name: str) -> nn.Module:
    return next(z for z in ZOO if z.name == name).build()


def fresh(z: ZooModel) -> nn.Module:
    return copy.deepcopy(_built(z.name))


def sample(z: ZooModel, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *z.input_shape, generator=torch.Generator().manual_seed(seed))


def outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model.eval()(x)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # a transformers ModelOutput
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [t for t in out if isinstance(t, torch.Tensor)]


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    assert [g.shape for g in got] == [w.shape for w in want]
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.double().pow(2).sum()) for w in want)
    return math.sqrt(num / den)


def hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every conv, transposed conv and linear call, counted by forward hooks
    from each call's own tensors (independent of decompose's counting): a conv does
    ``C_in/g * K`` per output element, a transposed conv ``C_out/g * K`` per input element, a
    linear ``in_features`` per output element. ``x`` has batch 1."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
            return
        taps = math.prod(m.kernel_size)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            total += args[0].numel() * (m.out_channels // m.groups) * taps
        else:
            total += out.numel() * (m.in_channels // m.groups) * taps

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        outputs(model, x)
    finally:
        for h in handles:
            h.remove()
    return total


@functools.cache
def _rank1(name: str):
    z = next(z for z in ZOO if z.name == name)
    model = fresh(z)
    report = decompose.decompose_(model, rank=1, input_shape=z.input_shape, progress=False)
    return model, report


def rank1(z: ZooModel):
    return _rank1(z.name)


def parametrize_used(model: nn.Module) -> bool:
    return any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())


def hinted(err: str) -> list[str]:
    words = shlex.split(err.replace(";", " "))
    return [a for w, v in zip(words, words[1:]) if w in ("--allow", "--allow-function")
            for a in (w, v)]


def as_kwargs(flags: list[str]) -> dict[str, list[str]]:
    pairs = list(zip(flags[::2], flags[1::2]))
    return {"allow": [v for w, v in pairs if w == "--allow"],
            "allow_functions": [v for w, v in pairs if w == "--allow-function"]}


def load_as_hinted(path) -> nn.Module:
    """``decompose.load``, then once more with what the refusal hinted (never a third time)."""
    try:
        return decompose.load(path)
    except decompose.DecomposeError as e:
        flags = hinted(str(e))
        assert flags, str(e)
    return decompose.load(path, **as_kwargs(flags))


# ------------------------------------------------------------------------------- the checks
@params()
def test_rank_1_runs_and_is_finite(z):
    model, report = rank1(z)
    assert report.decomposed, f"{z.name}: no layer was decomposed"
    assert report.totals["macs_after"] < report.totals["macs_before"]
    x = sample(z)
    got, want = outputs(model, x), outputs(_built(z.name), x)
    assert all(torch.isfinite(t).all() for t in got if t.is_floating_point())
    assert [t.shape for t in got] == [t.shape for t in want]
    assert report.output_check is not None  # decompose ran the whole model itself


@params()
def test_full_rank_is_exact(z, zoo_numbers):
    model = fresh(z)
    report = decompose.decompose_(model, rank="full", input_shape=z.input_shape, progress=False)
    assert report.decomposed
    err = rel_error(outputs(model, sample(z, seed=3)), outputs(_built(z.name), sample(z, seed=3)))
    zoo_numbers[z.name]["full_rank_rel_error"] = err
    zoo_numbers[z.name]["layers"] = (len(report.decomposed), len(report.layers))
    zoo_numbers[z.name]["skipped"] = sorted({lp.skipped for lp in report.layers if lp.skipped})
    assert err < EXACT, f"{z.name}: full rank differs by {err:.2e}"
    assert report.output_check["rel_error"] < EXACT


@params(lambda z: z.has_bn)
def test_fold_bn_is_exact(z, zoo_numbers):
    model = fresh(z)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    report = decompose.decompose_(model, rank="full", fold_bn=True, input_shape=z.input_shape,
                                  progress=False)
    folded = len(report.folded_bn or [])
    assert folded > 0, f"{z.name}: no BatchNorm folded of {n_bn}: {report.fold}"
    err = rel_error(outputs(model, sample(z, seed=4)), outputs(_built(z.name), sample(z, seed=4)))
    zoo_numbers[z.name]["fold_bn"] = (folded, n_bn, err)
    assert err < EXACT, f"{z.name}: folding {folded} BatchNorms changed the output by {err:.2e}"


@params()
def test_macs_match_an_independent_hook_count(z):
    model, report = rank1(z)
    one = sample(z, batch=1)
    assert report.totals["macs_before"] == hook_macs(_built(z.name), one)
    assert report.totals["macs_after"] == hook_macs(model, one)


@params()
def test_save_weights_only_load_same_outputs(z, tmp_path):
    model, report = rank1(z)
    model = copy.deepcopy(model)
    x = sample(z, seed=5)
    before = outputs(model, x)
    if z.no_pickle:  # the tool says why, in one line, and writes nothing
        with pytest.raises(decompose.DecomposeError, match="hook that is a local function"):
            decompose.save(model, tmp_path / "small.pt", report)
        assert not (tmp_path / "small.pt").exists()
        pytest.skip(z.no_pickle)
    path = decompose.save(model, tmp_path / "small.pt", report)
    again = load_as_hinted(path)  # the weights-only loader, the hinted classes allowed
    for a, b in zip(outputs(again, x), before):
        assert torch.equal(a, b)


@params()
def test_the_cli_loads_the_original_with_the_hinted_allow(z, tmp_path):
    f = tmp_path / "original.pt"
    shape = ",".join(map(str, z.input_shape))
    base = ["--input-shape", shape]
    original = _built(z.name)
    if parametrize_used(original) or z.no_pickle:  # torch cannot pickle them: a checkpoint
        torch.save({"state_dict": original.state_dict(),
                    "config": getattr(original, "config", None)}, f)
        base += ["--arch", f"zoo_models:{z.builder}"]
    else:
        torch.save(original, f)
    runner = CliRunner()
    res = runner.invoke(cli, ["report", str(f), *base])
    if res.exit_code == 0:  # nothing to allow (efficientnet's classes are all nn.Modules...)
        flags: list[str] = []
    else:
        err = [ln for ln in res.stderr.splitlines() if ln.startswith("Error: ")]
        assert len(err) == 1 and "refused" in err[0], res.stderr
        flags = hinted(err[0])
        assert flags, err[0]
    res = runner.invoke(cli, ["report", str(f), *base, *flags])
    assert res.exit_code == 0, f"{flags}\n{res.stderr}"
    out = tmp_path / "small.pt"
    res = runner.invoke(cli, [str(f), *base, "--rank", "1", "-o", str(out), "--no-latency",
                              "-q", *flags])
    if z.no_pickle:
        assert res.exit_code == 1 and "hook that is a local function" in res.stderr, res.stderr
        assert not out.exists()
        return
    assert res.exit_code == 0, res.stderr
    # the written file is a whole module: its classes are hinted at once (a checkpoint's
    # original needed only what the checkpoint held)
    small = decompose.load(out, **as_kwargs(flags)) if "--arch" not in base else \
        load_as_hinted(out)
    assert all(torch.isfinite(t).all() for t in outputs(small, sample(z)))


class Field(nn.Module):
    """A ModelOutput's tensor field, for the exporters (they take tensors and tuples)."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(x)[self.key]


@params()
def test_onnx_export(z, tmp_path):
    pytest.importorskip("onnxruntime")
    from decompose.io.export import export_onnx
    model, _ = rank1(z)
    model = copy.deepcopy(model)
    if z.output is not None:
        model = Field(model, z.output)
    res = export_onnx(model, tmp_path / "m.onnx", z.input_shape)
    assert res.max_rel_err is not None and res.max_rel_err < 1e-4
