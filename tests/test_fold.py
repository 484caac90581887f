"""BatchNorm folding: exact in eval mode, and only where the graph says it is safe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, needs_shared
from torch import nn

import decompose
from decompose.engine.fold import find_conv_bn_pairs, fold_batchnorm_, fold_bn_

RTOL_F32 = 1e-5
RTOL_F64 = 1e-10

CONV = {1: (nn.Conv1d, nn.BatchNorm1d, (2, 6, 17)),
        2: (nn.Conv2d, nn.BatchNorm2d, (2, 6, 9, 11)),
        3: (nn.Conv3d, nn.BatchNorm3d, (2, 6, 5, 6, 7))}


def _randomise_bn(bn: nn.Module, g: torch.Generator) -> None:
    """Statistics and affine parameters far from the identity, as after training."""
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=g) * 2)
        bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=g))
            bn.bias.copy_(torch.randn(n, generator=g))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_exact(model: nn.Module, x: torch.Tensor, expected_pairs: list, tol: float) -> None:
    model.eval()
    with torch.no_grad():
        before = model(x)
    pairs = fold_batchnorm_(model)
    assert pairs == expected_pairs
    with torch.no_grad():
        after = model(x)
    assert _rel(after, before) < tol


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, RTOL_F32), (torch.float64, RTOL_F64)])
def test_fold_is_exact(dim, groups, bias, affine, dtype, tol):
    g = torch.Generator().manual_seed(dim * 10 + groups)
    conv_cls, bn_cls, shape = CONV[dim]
    model = nn.Sequential(conv_cls(6, 8, 3, padding=1, groups=groups, bias=bias),
                          bn_cls(8, affine=affine, eps=1e-3), nn.ReLU())
    _randomise_bn(model[1], g)
    model = model.to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    _check_exact(model, x, [("0", "1")], tol)
    assert isinstance(model[1], nn.Identity)
    assert model[0].bias is not None and model[0].bias.dtype == dtype


def test_padding_mode_stride_and_dilation_fold_exactly():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2,
                                    padding_mode="reflect"), nn.BatchNorm2d(6))
    _randomise_bn(model[1], g)
    _check_exact(model, torch.randn(2, 4, 13, 13, generator=g), [("0", "1")], RTOL_F32)


class Branchy(nn.Module):
    """conv_a -> bn_a (foldable); conv_b feeds bn_b *and* the sum (not foldable);
    bn_c follows a ReLU (not foldable); bn_d follows a functional conv (not foldable)."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.bn_c = nn.BatchNorm2d(4)
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.bn_d = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_a(self.conv_a(x))
        b = self.conv_b(a)
        y = self.bn_b(b) + b
        y = self.bn_c(F.relu(y))
        return self.bn_d(F.conv2d(y, self.w))


def test_only_safe_pairs_are_folded():
    g = torch.Generator().manual_seed(2)
    model = Branchy()
    for bn in (model.bn_a, model.bn_b, model.bn_c, model.bn_d):
        _randomise_bn(bn, g)
    _check_exact(model, torch.randn(2, 3, 8, 8, generator=g), [("conv_a", "bn_a")], RTOL_F32)
    assert isinstance(model.bn_a, nn.Identity)
    for name in ("bn_b", "bn_c", "bn_d"):
        assert isinstance(getattr(model, name), nn.BatchNorm2d), name
    assert model.conv_b.bias is None


class Shared(nn.Module):
    """One conv called twice, once into a BN: folding it would change the other call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_shared_conv_is_not_folded():
    model = Shared().eval()
    _randomise_bn(model.bn, torch.Generator().manual_seed(3))
    assert fold_batchnorm_(model) == []


def test_bn_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert find_conv_bn_pairs(model) == []
    assert "running statistics" in fold_bn_(model).left["1"]


def test_channel_mismatch_is_left_alone_with_the_reason():
    class Mismatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.bn(torch.cat([self.conv(x)] * 2, 1))

    res = fold_bn_(Mismatch())
    assert res.folded == [] and "not a conv's output" in res.left["bn"]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_convs_fold_exactly(dim, groups):
    g = torch.Generator().manual_seed(40 + dim + groups)
    conv_cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim]
    _, bn_cls, shape = CONV[dim]
    model = nn.Sequential(conv_cls(6, 4, 3, stride=2, padding=1, output_padding=1,
                                   groups=groups, bias=groups == 1), bn_cls(4), nn.ReLU())
    _randomise_bn(model[1], g)
    _check_exact(model, torch.randn(*shape, generator=g), [("0", "1")], RTOL_F32)


class Untraceable(nn.Module):
    """Data-dependent control flow at the top; a traceable block inside."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return self.block(-x)


def test_untraceable_model_folds_by_forward_hooks_without_a_warning(recwarn):
    """fx cannot trace it (as most Hugging Face models); a forward pass with hooks finds the
    pair, the fold is checked on the outputs, and nothing warns that it might be wrong."""
    g = torch.Generator().manual_seed(4)
    model = Untraceable().eval()
    _randomise_bn(model.block[1], g)
    x = torch.randn(2, 3, 6, 6, generator=g)
    with torch.no_grad():
        before = model(x)
    res = fold_bn_(model, (3, 6, 6))
    assert res.how == "hooks" and res.folded == [("block.0", "block.1")] and res.left == {}
    assert "does not trace with torch.fx" in res.note
    with torch.no_grad():
        assert _rel(model(x), before) < RTOL_F32
    assert not [w for w in recwarn if "folded wrongly" in str(w.message)]


class Flagged(nn.Module):
    """torchcrepe's Crepe shape: ``forward(x, embed=False)`` branches on the flag."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x, embed=False):
        if embed:
            return x
        return self.block(x)


def test_a_forward_flag_with_a_default_is_traced_at_its_default():
    g = torch.Generator().manual_seed(5)
    model = Flagged().eval()
    _randomise_bn(model.block[1], g)
    x = torch.randn(2, 3, 6, 6, generator=g)
    with torch.no_grad():
        before = model(x)
    res = fold_bn_(model, (3, 6, 6))
    assert res.how == "fx" and res.folded == [("block.0", "block.1")]
    with torch.no_grad():
        assert _rel(model(x), before) < RTOL_F32


class ReadsConvOutputToo(nn.Module):
    """Untraceable, and its conv's output is read twice: by the BN and by the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
            y = self.bn(y) + y
        return self.bn2(self.conv2(y))


def test_a_hook_found_fold_that_changes_the_outputs_is_undone_with_the_reason():
    g = torch.Generator().manual_seed(8)
    model = ReadsConvOutputToo().eval()
    _randomise_bn(model.bn, g)
    _randomise_bn(model.bn2, g)
    x = torch.randn(2, 3, 7, 7, generator=g)
    with torch.no_grad():
        before = model(x)
    res = fold_bn_(model, (3, 7, 7))
    assert res.how == "hooks" and res.folded == [("conv2", "bn2")]
    assert "changed the model's outputs" in res.left["bn"]
    assert isinstance(model.bn, nn.BatchNorm2d) and model.conv.bias is not None
    with torch.no_grad():
        assert _rel(model(x), before) < RTOL_F32


class NoBatchNorm(nn.Module):
    """Untraceable and without BatchNorm (the Whisper encoder): folding must not raise."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)

    def forward(self, x):
        if x.shape[-1] != 9:
            raise ValueError("expects length 9")
        return self.conv(x)


def test_no_batchnorm_never_raises_even_when_fx_cannot_trace():
    res = fold_bn_(NoBatchNorm())
    assert res.folded == [] and res.left == {} and res.how == "none"
    assert fold_batchnorm_(NoBatchNorm()) == []
    model = nn.Sequential(NoBatchNorm())
    rep = decompose.plan(model, rank=1, fold_bn=True, input_shape=(4, 9))
    assert rep.fold["bns"] == 0 and "no BatchNorm" in str(rep)


def test_report_says_how_many_were_folded_and_why_the_others_were_not():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.BatchNorm2d(8, track_running_stats=False),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    rep = decompose.decompose_(model, rank=1, fold_bn=True, input_shape=(3, 8, 8))
    assert rep.folded_bn == [["0", "1"]]
    assert rep.fold["folded"] == [["0", "1"]] and rep.fold["how"] == "fx"
    assert rep.fold["left"] == {"3": "no running statistics (track_running_stats=False)"}
    text = str(rep)
    assert "folded 1 of 2 BatchNorms" in text and "3: no running statistics" in text
    assert rep.to_dict()["fold"]["bns"] == 2


def test_folding_then_decoupling_at_full_rank_is_exact():
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    for bn in (model[1], model[4]):
        _randomise_bn(bn, g)
    x = torch.randn(2, 4, 7, 7, generator=g)
    with torch.no_grad():
        ref = model(x)
    fold_batchnorm_(model)
    decompose.decompose_(model, rank=9, input_shape=(4, 7, 7))
    with torch.no_grad():
        assert _rel(model(x), ref) < 1e-4


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_dw1_form_model_traces_and_folds_exactly(order, channels_last):
    """dw1's channel moves branch on the memory layout; fx must treat them as leaves."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
    for bn in (model[1], model[4]):
        _randomise_bn(bn, g)
    decompose.decompose_(model, rank=2, order=order, form="dw1", input_shape=(4, 7, 7),
                         channels_last=channels_last)
    assert any(type(m).__name__ in ("RepeatChannels", "SumChannelGroups")
               for m in model.modules())
    x = torch.randn(2, 4, 7, 7, generator=g)
    with torch.no_grad():
        ref = model(x)
    pairs = fold_batchnorm_(model)
    # dw-pw ends in the 1x1 conv, which takes the BN; pw-dw's dw1 form ends in a channel sum
    # that no conv-BN rule covers, so its BNs stay (and nothing may change)
    assert len(pairs) == (2 if order == "dw-pw" else 0)
    with torch.no_grad():
        assert _rel(model(x), ref) < 1e-5


@pytest.mark.shared
@needs_shared
def test_resnet20_folds_every_bn_and_keeps_its_outputs():
    from decompose.io.files import load_model
    model = load_model(MODELS / "resnet20.th",
                       arch="decompose.models.cifar_resnet:resnet20").model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x)
    pairs = fold_batchnorm_(model)
    assert len(pairs) == 19  # stem + 2 per block x 9 blocks
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert _rel(model(x), ref) < 1e-5


def test_folding_after_decoupling_folds_into_the_last_conv_of_the_pair():
    g = torch.Generator().manual_seed(7)
    for order in ("dw-pw", "pw-dw"):
        model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)).eval()
        _randomise_bn(model[1], g)
        decompose.decompose_(model, rank=2, order=order, input_shape=(4, 7, 7))
        last = "conv_pw" if order == "dw-pw" else "conv_dw"
        _check_exact(model, torch.randn(2, 4, 7, 7, generator=g), [(f"0.{last}", "1")],
                     RTOL_F32)


def test_calibration_targets_the_bn_folded_by_hooks_in_an_untraceable_model():
    """Calibration must find which BN was folded into which conv in an original fx cannot
    trace: at full rank the folded layer then matches its target (conv, then BN) exactly."""
    g = torch.Generator().manual_seed(9)
    model = Untraceable().eval()
    _randomise_bn(model.block[1], g)
    x = torch.randn(32, 3, 6, 6, generator=g)
    rep = decompose.decompose_(model, rank="full", fold_bn=True, input_shape=(3, 6, 6),
                               calibration=[x], progress=False,
                               calibration_config=decompose.CalibrationConfig(samples=32))
    assert rep.fold["how"] == "hooks" and rep.folded_bn == [["block.0", "block.1"]]
    (layer,) = rep.calibration["layers"]
    assert layer["name"] == "block.0" and layer["error_before"] < 1e-3  # O(1) without the BN
