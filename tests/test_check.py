"""A factorized layer is a drop-in for its conv, and nothing broken is handed back or written."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import decompose
import decompose.methods
from decompose.cli import cli


class ReadsItsConv(nn.Module):
    """Parent code that reads its conv's attributes, as Whisper, ViT and MobileNetV2 do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        assert self.conv.stride[0] == 2 and self.conv.kernel_size == (3, 3)
        assert self.conv.in_channels == 8 and self.conv.out_channels == 16
        x = x.to(self.conv.weight.dtype).to(self.conv.weight.device)
        return self.conv(x) + (0 if self.conv.bias is None else 0 * self.conv.bias.sum())


class CallsConvForward(nn.Module):
    """Parent code that insists on a real nn.Conv2d: no factorized layer can satisfy it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        if not isinstance(self.conv, nn.Conv2d):
            raise TypeError("expected an nn.Conv2d")
        return self.conv(x)


class PadsItself(nn.Conv2d):
    """A conv subclass with its own forward (it pads first), like 'same'-padding convs."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


@pytest.mark.parametrize("method", decompose.methods.names())
def test_parents_that_read_the_conv_keep_working(method):
    model = ReadsItsConv().eval()
    x = torch.randn(2, 8, 12, 12)
    rep = decompose.decompose_(model, method=method, rank=1, input_shape=(8, 12, 12))
    assert rep.decomposed and rep.output_check["outputs"] == "2x16x6x6"
    model(x)  # the asserts in forward hold


def test_full_rank_is_checked_exact_and_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    rep = decompose.decompose_(model, rank="full", input_shape=(3, 10, 10))
    assert len(rep.decomposed) == 2 and rep.output_check["rel_error"] < 1e-5
    assert "checked the model runs" in str(rep)


def test_a_model_that_no_longer_runs_is_an_error_naming_the_module(tmp_path):
    model = nn.Sequential(CallsConvForward()).eval()
    with pytest.raises(decompose.DecomposeError, match=r"fails to run in 0 \(CallsConvForward\)"):
        decompose.decompose_(copy.deepcopy(model), rank=1, input_shape=(8, 8, 8))
    path = tmp_path / "m.pt"
    torch.save(model, path)
    r = CliRunner().invoke(cli, [str(path), "--rank", "1", "--input-shape", "8,8,8",
                                 "--no-latency", "-q", "--allow", __name__])
    assert r.exit_code != 0 and "fails to run" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m.decomposed.pt").exists()


def test_conv_subclasses_with_their_own_forward_are_skipped_with_the_reason():
    model = nn.Sequential(PadsItself(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(1, 8, 9, 9)
    want = model(x)
    rep = decompose.decompose_(model, rank="full", input_shape=(8, 9, 9))
    skipped = {lp.name: lp.skipped for lp in rep.layers}
    assert skipped["0"].startswith("custom forward") and skipped["2"] is None
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


class Conv2dStaticSamePadding(nn.Conv2d):
    """EfficientNet's static 'same' conv: a pad module, then the conv with no padding."""

    def __init__(self, cin, cout, k, stride, image_size):
        super().__init__(cin, cout, k, stride, padding=0)
        p = max((-(-image_size // stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((p // 2, p - p // 2, p // 2, p - p // 2))

    def forward(self, x):
        return super().forward(self.static_padding(x))


class Conv2dDynamicSamePadding(nn.Conv2d):
    """EfficientNet's dynamic 'same' conv: the padding is computed from the input size."""

    def __init__(self, cin, cout, k, stride):
        super().__init__(cin, cout, k, stride, padding=0)

    def forward(self, x):
        import math
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride)


@pytest.mark.parametrize("cls", [Conv2dStaticSamePadding, Conv2dDynamicSamePadding])
@pytest.mark.parametrize("method", decompose.methods.names())
def test_same_padding_conv_subclasses_are_factored_exactly(cls, method, tmp_path):
    torch.manual_seed(0)
    args = (6, 8, 3, 2, 13) if cls is Conv2dStaticSamePadding else (6, 8, 3, 2)
    model = nn.Sequential(cls(*args), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 13, 13)
    want = model(x)
    exact = copy.deepcopy(model)
    rep = decompose.decompose_(exact, method=method, rank="full", input_shape=(6, 13, 13))
    if not rep.decomposed:
        assert rep.layers[0].skipped and "custom forward" not in rep.layers[0].skipped
        return
    assert exact[0].prefix is not None and exact[0].padding == (0, 0)
    with torch.no_grad():
        torch.testing.assert_close(exact(x), want, atol=1e-4, rtol=1e-4)
    folded = copy.deepcopy(model)
    rep = decompose.decompose_(folded, method=method, rank="full", fold_bn=True,
                               input_shape=(6, 13, 13))
    assert rep.folded_bn == [["0", "1"]]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), want, atol=1e-4, rtol=1e-4)
    decompose.save(folded, tmp_path / "m.pt", rep)
    with torch.no_grad():
        torch.testing.assert_close(decompose.load(tmp_path / "m.pt")(x), folded(x))
