"""Weight-parametrized convs (weight_norm, as in Wav2Vec2 and Encodec): factored from their
effective weight, and the result saves and loads (parametrizations baked into plain weights,
exactly, and reported)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import weight_norm_audio
from click.testing import CliRunner
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import decompose
from decompose.engine.fold import fold_bn_
from decompose.engine.params import bake_parametrizations_, parametrized
from decompose.io.files import load_model, save_model

SHAPE = (4, 32)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return weight_norm_audio().eval()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_baking_is_exact_and_leaves_plain_convs():
    model = nn.Sequential(_model(), nn.Flatten(), spectral_norm(nn.Linear(8 * 32, 5))).eval()
    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        before = model(x)
    found = parametrized(model)
    assert set(found) == {"0.0", "0.2", "0.4", "2"}
    assert found["0.4"] == ["weight_norm(weight, old hook)"]
    assert found["0.0"] == ["weight_norm(weight)"] and found["2"] == ["spectral_norm(weight)"]
    assert bake_parametrizations_(model) == found
    assert parametrized(model) == {}
    assert type(model[0][0]) is nn.Conv1d and isinstance(model[0][0].weight, nn.Parameter)
    assert not model[0][4]._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the same numbers, not just close


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_factored_from_the_effective_weight_exactly_at_full_rank(order):
    model = _model(1)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        want = model(x)
    effective = model[0].weight.detach().clone()
    rep = decompose.decompose_(model, rank="full", order=order, input_shape=SHAPE)
    assert [lp.name for lp in rep.decomposed] == ["0", "4"]
    assert torch.allclose(model[0].weight, effective, atol=1e-5)
    with torch.no_grad():
        assert _rel(model(x), want) < 1e-4


def test_the_factored_model_saves_loads_weights_only_and_says_what_was_baked(tmp_path):
    model = _model(2)
    rep = decompose.decompose_(model, rank=1, input_shape=SHAPE)
    assert parametrize.is_parametrized(model[2])  # the 1x1 conv, left original
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        want = model(x)
    decompose.save(model, tmp_path / "m.pt", rep)
    assert rep.baked_parametrizations == {"2": ["weight_norm(weight)"]}
    assert "baked" in str(rep) and rep.to_dict()["baked_parametrizations"]
    loaded = load_model(tmp_path / "m.pt")  # the weights-only loader
    assert loaded.meta["baked_parametrizations"] == {"2": ["weight_norm(weight)"]}
    with torch.no_grad():
        assert torch.equal(loaded.model(x), want)


def test_saving_a_copy_leaves_the_original_parametrized_and_running(tmp_path):
    """Found by the zoo (Encodec): a deep copy shares its Parametrized class with the original,
    and removing the parametrization deleted ``weight`` from that shared class, so saving a
    copy broke the original ('ParametrizedConv1d' object has no attribute 'weight')."""
    model = _model(3)
    rep = decompose.decompose_(model, rank=1, input_shape=SHAPE)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        want = model(x)
    copied = copy.deepcopy(model)
    assert type(copied[2]) is type(model[2])  # what torch's deepcopy does
    decompose.save(copied, tmp_path / "m.pt", rep)
    assert not parametrize.is_parametrized(copied[2])
    assert parametrize.is_parametrized(model[2]) and model[2].weight.shape == (16, 16, 1)
    with torch.no_grad():
        assert torch.equal(model(x), want) and torch.equal(copied(x), want)
    # and the other way round: baking the original leaves the copy working
    other = copy.deepcopy(model)
    bake_parametrizations_(model)
    with torch.no_grad():
        assert torch.equal(other(x), want)
    assert parametrize.is_parametrized(other[2])


def test_save_model_refuses_a_parametrized_model_in_one_line(tmp_path):
    with pytest.raises(decompose.DecomposeError, match="weight parametrization") as e:
        save_model(_model(), tmp_path / "m.pt")
    assert "\n" not in str(e.value) and not (tmp_path / "m.pt").exists()


def test_old_weight_norm_models_can_be_copied_and_calibrated():
    model = _model(3)  # the old hook's weight carries autograd history: deepcopy used to fail
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)  # what decompose_ does before calibrating
    x = torch.randn(64, *SHAPE)
    rep = decompose.decompose_(model, rank=1, input_shape=SHAPE, calibration=[x],
                               progress=False,
                               calibration_config=decompose.CalibrationConfig(samples=64))
    assert {lc["name"] for lc in rep.calibration["layers"]} == {"0", "4"}


def test_a_weight_normalised_conv_before_a_batchnorm_is_left_with_the_reason():
    model = nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)).eval()
    res = fold_bn_(model)
    assert res.folded == [] and "weight-parametrized" in res.left["1"]


def test_cli_decomposes_a_weight_norm_checkpoint_and_writes_a_loadable_file(tmp_path):
    from decompose.cli import cli
    model = _model(4)
    ck = tmp_path / "ck.pt"
    torch.save(model.state_dict(), ck)
    out = tmp_path / "out.pt"
    res = CliRunner().invoke(cli, [str(ck), "--arch", "builders:weight_norm_audio", "--rank", "1",
                                   "--input-shape", "4,32", "--no-latency", "-o", str(out),
                                   "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["baked_parametrizations"] == {"2": ["weight_norm(weight)"]}
    loaded = load_model(out)
    ref = _model(4)
    decompose.decompose_(ref, rank=1, input_shape=SHAPE)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref(x))
