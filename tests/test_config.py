"""The configs: validated on creation, versioned JSON round trips, old dicts still read."""

from __future__ import annotations

import json

import pytest

import decompose
from decompose import CalibrationConfig, DecomposeConfig, DecomposeError, FinetuneConfig


@pytest.mark.parametrize("config", [
    DecomposeConfig(method="nd", target_macs=0.4, exclude=("conv1",), input_shape=(3, 8, 8)),
    DecomposeConfig(rank="full", order="pw-dw", rank_overrides={"a": 2}),
    CalibrationConfig(samples=64, method="last", pixels_per_image=None),
    FinetuneConfig(epochs=3, lr=0.02),
])
def test_round_trip_through_json_with_type_and_version(config):
    d = json.loads(json.dumps(config.to_dict()))
    assert d["_type"] == type(config).__name__ and d["_version"] == type(config).VERSION
    assert type(config).from_dict(d) == config


def test_dicts_from_before_versioning_are_read():
    old = DecomposeConfig(rank=2).to_dict()
    del old["_type"], old["_version"], old["method"], old["seed"]
    assert DecomposeConfig.from_dict(old) == DecomposeConfig(rank=2)
    assert DecomposeConfig.from_dict({**old, "_type": "DecoupleConfig"}) == DecomposeConfig(rank=2)
    assert decompose.DecoupleConfig is DecomposeConfig


@pytest.mark.parametrize("cls", [DecomposeConfig, CalibrationConfig, FinetuneConfig])
def test_newer_versions_and_other_types_are_refused(cls):
    d = cls().to_dict()
    with pytest.raises(DecomposeError, match="newer than this decompose reads"):
        cls.from_dict({**d, "_version": cls.VERSION + 1})
    with pytest.raises(DecomposeError, match="not a"):
        cls.from_dict({**d, "_type": "SomethingElse"})


@pytest.mark.parametrize("fields, needle", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(method="auto", rank=2), "under a budget"),
    (dict(method="cp", energy=0.9), "--energy needs singular values"),
    (dict(rank="half"), "rank must be an integer >= 1 or 'full'"),
    (dict(seed=-1), "seed must be"),
])
def test_bad_fields_say_the_fix(fields, needle):
    with pytest.raises(DecomposeError, match=needle):
        DecomposeConfig(**fields)


def test_calibration_config_checks_its_fields():
    with pytest.raises(DecomposeError, match="calibration method"):
        CalibrationConfig(method="all")
    with pytest.raises(DecomposeError, match="samples must be"):
        CalibrationConfig(samples=0)
