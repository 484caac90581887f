"""decompose.models: the CIFAR ResNet family (shipped checkpoints load strictly) and the digits CNN."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from decompose import models
from decompose.errors import DecomposeError
from decompose.models import SAFE_GLOBALS, ShortcutA, cifar_resnet, resnet20, resnet56

CKPTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "cifar-resnet"
needs_ckpts = pytest.mark.skipif(not (CKPTS / "resnet20.th").exists(),
                                 reason="../shared/models/cifar-resnet is not next to this clone")


def _state(name: str) -> dict[str, torch.Tensor]:
    ckpt = torch.load(CKPTS / name, map_location="cpu", weights_only=True)
    return {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}


@pytest.mark.shared
@needs_ckpts
@pytest.mark.parametrize("name, build", [("resnet20.th", resnet20), ("resnet56.th", resnet56)])
def test_shipped_checkpoints_load_strictly(name, build):
    result = build().load_state_dict(_state(name), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_family_has_depth_minus_one_convs_and_one_linear(depth):
    m = cifar_resnet(depth)
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert len(convs) + len(linears) == depth
    assert len(linears) == 1 and m.input_shape == (3, 32, 32)


def test_parameter_counts_match_the_paper():
    # He et al. 2016, table 6: 0.27M (ResNet-20), 0.85M (56), 1.7M (110)
    counts = {d: sum(p.numel() for p in cifar_resnet(d).parameters()) for d in (20, 56, 110)}
    assert round(counts[20] / 1e6, 2) == 0.27
    assert round(counts[56] / 1e6, 2) == 0.85
    assert round(counts[110] / 1e6, 1) == 1.7


def test_forward_shapes_and_num_classes():
    m = cifar_resnet(20, num_classes=7).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_option_a_shortcut_subsamples_and_pads_channels_both_sides():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = ShortcutA(pad=1)(x)
    assert y.shape == (1, 4, 2, 2)
    assert torch.equal(y[:, 1:3], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 0]) == 0 and torch.count_nonzero(y[:, 3]) == 0
    # the widening blocks are the only ones with a ShortcutA, and it has no parameters
    m = resnet20()
    shortcuts = [n for n, x in m.named_modules() if isinstance(x, ShortcutA)]
    assert shortcuts == ["layer2.0.shortcut", "layer3.0.shortcut"]
    assert not any("shortcut" in k for k in m.state_dict())


def test_any_6n_plus_2_name_builds_and_others_raise():
    assert models.resnet200 is not None and models.resnet200.__name__ == "resnet200"
    assert len(models.resnet26(num_classes=3).layer1) == 4
    with pytest.raises(DecomposeError, match="6n\\+2"):
        models.resnet21  # noqa: B018
    with pytest.raises(DecomposeError, match="6n\\+2"):
        cifar_resnet(21)
    with pytest.raises(DecomposeError):
        cifar_resnet(2)
    assert not hasattr(models, "resnet21")  # still an AttributeError for hasattr/getattr
    with pytest.raises(AttributeError):
        models.not_a_model  # noqa: B018


def test_resnet200_builds():
    m = models.resnet200()
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == 199


def _roundtrip(model: nn.Module, allowed: list) -> nn.Module:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals(allowed):
        return torch.load(buf, weights_only=True)


def test_resnet_pickles_and_loads_weights_only_with_the_allowlist():
    m = resnet20().eval()
    nn_classes = [nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential, nn.Identity]
    back = _roundtrip(m, SAFE_GLOBALS + nn_classes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    assert back.input_shape == (3, 32, 32)


def test_digits_cnn_trains_quickly_and_pickles_with_torch_classes_only():
    x_train, y_train, x_test, y_test = models.load_digits_tensors(seed=0)
    assert x_train.dtype == torch.float32 and x_train.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(x_train.min()) and float(x_train.max()) <= 1.0
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 359
    m = models.train_digits_cnn(seed=0)
    assert m.input_shape == (1, 8, 8) and not m.training
    with torch.no_grad():
        acc = (m(x_test).argmax(1) == y_test).float().mean().item()
    assert acc >= 0.95  # 97-99% measured for seeds 0-7; 0.95 is the documented promise
    back = _roundtrip(m, [nn.Sequential, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear])
    with torch.no_grad():
        assert torch.equal(back(x_test), m(x_test))


def test_digits_split_is_deterministic():
    a = models.load_digits_tensors(seed=3)
    b = models.load_digits_tensors(seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(DecomposeError):
        models.train_digits_cnn(epochs=0)
