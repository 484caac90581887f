"""The decoupled layer reproduces every conv the user has at full rank, and is plain torch.nn."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn

from decompose.kernels.nd import error_curve, factorize
from decompose.methods import LowRankConv
from decompose.methods.nd.layers import decouple_conv, decoupled_order, decoupled_rank, is_decoupled

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: (23,), 2: (11, 9), 3: (7, 6, 5)}


def _stride(dim, kind):
    if kind == "asym":
        return tuple([2] + [1] * (dim - 1)) if dim > 1 else 2
    return kind


def _conv(dim, stride, dilation, groups, padding_mode, bias, padding=1, dtype=torch.float32):
    torch.manual_seed(0)
    c_in, c_out = 4, 6
    return CONV[dim](c_in, c_out, 3, stride=_stride(dim, stride), padding=padding,
                     dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                     dtype=dtype).eval()


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


# Every (dim, order) with every stride x dilation x groups, and every (dim, order) with every
# padding mode x bias; 120 cases instead of the 576 of the full product, each option still paired
# with every other conv dimension and order.
_GEOM = list(itertools.product([1, 2, "asym"], [1, 2], [1, 2]))
_PADS = list(itertools.product(["zeros", "reflect", "replicate", "circular"], [True, False]))
CASES = [(d, o, s, dl, g, "zeros", (s, dl, g) != (1, 1, 1))
         for d, o in itertools.product([1, 2, 3], ["dw-pw", "pw-dw"]) for s, dl, g in _GEOM]
CASES += [(d, o, *_GEOM[(i + j) % len(_GEOM)], pm, b)
          for i, (d, o) in enumerate(itertools.product([1, 2, 3], ["dw-pw", "pw-dw"]))
          for j, (pm, b) in enumerate(_PADS)]


@pytest.mark.parametrize("dim,order,stride,dilation,groups,padding_mode,bias", CASES)
def test_full_rank_is_exact_float32(dim, order, stride, dilation, groups, padding_mode, bias):
    conv = _conv(dim, stride, dilation, groups, padding_mode, bias)
    dec = decouple_conv(conv, 10**6, order)
    x = torch.randn(2, 4, *SIZE[dim])
    with torch.no_grad():
        assert max_rel(dec(x), conv(x)) <= 1e-5


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("padding", ["same", "valid", 0, 2])
def test_full_rank_is_exact_float64_padding_forms(dim, order, padding):
    conv = _conv(dim, 1, 2, 2, "zeros", True, padding=padding, dtype=torch.float64)
    dec = decouple_conv(conv, 10**6, order)
    x = torch.randn(2, 4, *SIZE[dim], dtype=torch.float64)
    with torch.no_grad():
        assert max_rel(dec(x), conv(x)) <= 1e-12


def test_non_square_kernel_and_tuple_padding():
    conv = nn.Conv2d(5, 7, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1)).double()
    for order in ("dw-pw", "pw-dw"):
        dec = decouple_conv(conv, 100, order)
        x = torch.randn(1, 5, 12, 13, dtype=torch.float64)
        with torch.no_grad():
            assert max_rel(dec(x), conv(x)) <= 1e-12


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_truncated_layer_computes_the_rank_t_kernel(order):
    """At rank T the layer equals a plain conv with the rank-T kernel (so reported error is real)."""
    from decompose.kernels.nd import rebuild
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2).double()
    f = factorize(conv.weight, 2, order)
    for t in (1, 2):
        dec = decouple_conv(conv, t, order)
        ref = nn.Conv2d(6, 8, 3, padding=1, groups=2).double()
        with torch.no_grad():
            ref.weight.copy_(rebuild(f, t))
            ref.bias.copy_(conv.bias)
            x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
            assert max_rel(dec(x), ref(x)) <= 1e-12
            err = (ref.weight - conv.weight).norm() / conv.weight.norm()
            assert abs(float(err) - float(error_curve(f.s)[t - 1])) < 1e-12


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_structure_names_and_shapes(order):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    dec = decouple_conv(conv, 2, order)
    assert is_decoupled(dec) and decoupled_order(dec) == order and decoupled_rank(dec) == 2
    # plain torch.nn convs inside one LowRankConv, which is a drop-in for the conv it replaced
    assert isinstance(dec, LowRankConv)
    assert all(type(m).__module__.startswith("torch.nn") for m in dec.children())
    for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode"):
        assert getattr(dec, a) == getattr(conv, a)
    x = torch.randn(2, 4, 8, 8)  # weight and bias are the effective kernel: the same function
    torch.testing.assert_close(dec(x), torch.nn.functional.conv2d(x, dec.weight, dec.bias,
                                                                  padding=1), atol=1e-5, rtol=1e-5)
    assert dec.weight.dtype == conv.weight.dtype and dec.weight.shape == conv.weight.shape
    names = list(dec._modules)
    assert names == (["conv_dw", "conv_pw"] if order == "dw-pw" else ["conv_pw", "conv_dw"])
    assert dec.conv_pw.kernel_size == (1, 1)
    assert dec.conv_dw.groups == (4 if order == "dw-pw" else 6)


def test_rank_is_capped_at_full_rank():
    conv = nn.Conv2d(4, 3, 3)
    dec = decouple_conv(conv, 50, "dw-pw")
    assert decoupled_rank(dec) == 3  # min(C_out, K)


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_torchscript_and_save_roundtrip(order):
    model = nn.Sequential(decouple_conv(nn.Conv2d(3, 5, 3, padding=1), 2, order), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    scripted = torch.jit.script(model)
    assert torch.allclose(scripted(x), model(x), atol=1e-6)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    safe = [nn.Sequential, nn.Conv2d, nn.ReLU, LowRankConv]
    with torch.serialization.safe_globals(safe):
        back = torch.load(buf, weights_only=True)
    assert torch.equal(back(x), model(x))


def test_rejects_non_conv():
    with pytest.raises(TypeError):
        decouple_conv(nn.Linear(3, 4), 1)
