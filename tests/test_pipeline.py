"""decompose.compress_: decouple, then (given images) calibrate, as one call shared by the CLI."""

from __future__ import annotations

import copy

import torch
from _imagegen import tiny_classifier

import decompose
from decompose import CalibrationConfig, DecomposeConfig
from decompose.api import decompose_ as compress_
from decompose.api import finalize_forms_, plain_forms_
from decompose.methods.nd.forms import form_name

CONFIG = DecomposeConfig(rank=2, form="dw1", order="dw-pw")


def _images(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_equals_the_manual_chain():
    x = _images()
    original = tiny_classifier()
    model = copy.deepcopy(original)
    rep = compress_(model, CONFIG, calibration=[x], calibration_config=CalibrationConfig(samples=16), progress=False)

    manual = copy.deepcopy(original)
    want = decompose.decompose_(manual, CONFIG)
    plain_forms_(manual)
    cal = decompose.calibrate_(manual, original, [x], samples=16, progress=False)
    finalize_forms_(manual, want)

    _same(model, manual)
    assert rep.calibration["samples"] == cal.samples == 16
    assert [lc["error_after"] for lc in rep.calibration["layers"]] == \
        [lc.error_after for lc in cal.layers]
    assert {form_name(model.get_submodule(lp.name)) for lp in rep.decomposed} == {"dw1"}
    _same(original, tiny_classifier())  # the reference copy was not touched


def test_original_is_used_as_given_and_one_shot_batches_work():
    x = _images()
    original = tiny_classifier()
    a, b = copy.deepcopy(original), copy.deepcopy(original)
    compress_(a, CONFIG, calibration=[x], calibration_config=CalibrationConfig(samples=16), progress=False)
    compress_(b, CONFIG, calibration=iter([x]), calibration_config=CalibrationConfig(samples=16),
              original=original, progress=False)
    _same(a, b)
    _same(original, tiny_classifier())


def test_without_images_it_is_decompose_and_nothing_decoupled_skips_calibration():
    a, b = tiny_classifier(), tiny_classifier()
    rep = compress_(a, CONFIG)
    decompose.decompose_(b, CONFIG)
    _same(a, b)
    assert rep.calibration is None
    m = tiny_classifier()
    rep = compress_(m, DecomposeConfig(rank=9), calibration=[_images()], progress=False)
    assert not rep.decomposed and rep.calibration is None
    _same(m, tiny_classifier())
