"""Every fast form is the same function as the decoupled Sequential it came from.

Tolerances: float32 on unit-variance inputs and default-initialised convs, compared with
``torch.testing.assert_close(rtol=RTOL, atol=ATOL)``; "dense" sums the T terms in another order,
the others are the same convolutions in another arrangement. In float64 every form agrees to
``ATOL64``, which shows they are exact rewrites, not approximations.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from decompose.kernels.nd import factorize
from decompose.methods import LowRankConv
from decompose.methods.convs import CONV_TYPES
from decompose.methods.nd.forms import (
    CUSTOM_MODULES,
    FORMS,
    RepeatChannels,
    SumChannelGroups,
    auto_form,
    candidate_forms,
    estimated_speedup,
    fast_form,
    form_name,
    rebuilt_weight,
)
from decompose.methods.nd.layers import decouple_conv, decoupled_rank

RTOL, ATOL = 1e-4, 1e-5
ATOL64 = 1e-12
ORDERS = ("dw-pw", "pw-dw")


def make_conv(dim=2, cin=4, cout=6, k=3, dtype=torch.float32, seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    if "padding" not in kw:
        kw["padding"] = k // 2
    return CONV_TYPES[dim](cin, cout, k, dtype=dtype, **kw).eval()


def make_input(conv: nn.Module, n=2, size=7, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, conv.in_channels) + (size,) * len(conv.kernel_size)
    return torch.randn(shape, generator=g, dtype=conv.weight.dtype)


def full_rank(conv: nn.Module, order: str) -> int:
    return factorize(conv.weight, conv.groups, order).max_rank


def check_all_forms(conv: nn.Module, rank: int, order: str, x: torch.Tensor | None = None):
    seq = decouple_conv(conv, rank, order).eval()
    x = make_input(conv) if x is None else x
    forms = candidate_forms(seq)
    assert "plain" in forms and "dense" in forms
    with torch.no_grad():
        ref = seq(x)
        for name, m in forms.items():
            assert form_name(m) == name
            tol = (dict(rtol=0, atol=ATOL64) if x.dtype == torch.float64
                   else dict(rtol=RTOL, atol=ATOL))
            torch.testing.assert_close(m(x), ref, **tol, msg=lambda s, n=name: f"{n}: {s}")
    return seq, forms


# ------------------------------------------------------------------ geometry x order x rank
GEOMETRIES = {
    "default": {},
    "stride2": dict(stride=2),
    "stride_asym": dict(stride=(2, 1)),
    "dilation": dict(dilation=2, padding=2),
    "groups2": dict(groups=2),
    "nobias": dict(bias=False),
    "reflect": dict(padding_mode="reflect"),
    "replicate": dict(padding_mode="replicate"),
    "circular": dict(padding_mode="circular"),
    "nopad_k5": dict(k=5, padding=0),
    "rect_kernel": dict(k=(3, 1), padding=(1, 0)),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("geom", list(GEOMETRIES))
def test_forms_exact_conv2d(geom, order):
    kw = dict(GEOMETRIES[geom])
    conv = make_conv(2, cin=4, cout=6, **kw)
    for rank in sorted({1, 2, full_rank(conv, order)}):
        check_all_forms(conv, rank, order)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("kw", [{}, dict(stride=2, groups=2, padding_mode="replicate"),
                                dict(dilation=2, padding=2, bias=False, padding_mode="circular"),
                                dict(padding_mode="reflect")])
def test_forms_exact_conv1d_conv3d(dim, order, kw):
    conv = make_conv(dim, cin=4, cout=4, **kw)
    if dim == 3 and "stride" in kw:
        conv = make_conv(3, cin=4, cout=4, **{**kw, "stride": (1, 2, 1)})
    for rank in sorted({1, full_rank(conv, order)}):
        check_all_forms(conv, rank, order, make_input(conv, size=5))


@pytest.mark.parametrize("order", ORDERS)
def test_forms_exact_in_float64(order):
    conv = make_conv(2, cin=6, cout=8, stride=(1, 2), padding_mode="reflect", groups=2,
                     dtype=torch.float64)
    for rank in (1, 2, full_rank(conv, order)):
        check_all_forms(conv, rank, order)


@pytest.mark.parametrize("order", ORDERS)
def test_full_rank_forms_equal_the_original_conv(order):
    conv = make_conv(2, cin=4, cout=6, stride=2, padding_mode="circular", dtype=torch.float64)
    seq = decouple_conv(conv, 99, order)
    x = make_input(conv)
    with torch.no_grad():
        for m in candidate_forms(seq).values():
            torch.testing.assert_close(m(x), conv(x), rtol=0, atol=1e-10)


# ------------------------------------------------------------------ channels_last
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dim", [2, 3])
def test_channels_last_input_same_values_and_layout_kept(order, dim):
    conv = make_conv(dim, cin=4, cout=6, stride=2)
    seq = decouple_conv(conv, 3, order).eval()
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    x = make_input(conv, size=6)
    xcl = x.contiguous(memory_format=fmt)
    with torch.no_grad():
        ref = seq(x)
        for name, m in candidate_forms(seq).items():
            m = m.to(memory_format=fmt)
            y = m(xcl)
            torch.testing.assert_close(y, ref, rtol=RTOL, atol=ATOL, msg=name)
            assert y.is_contiguous(memory_format=fmt), name


def test_custom_modules_keep_channels_last():
    x = torch.randn(2, 6, 3, 5).contiguous(memory_format=torch.channels_last)
    r = RepeatChannels(3)(x)
    assert r.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(r, x.contiguous().repeat_interleave(3, dim=1))
    s = SumChannelGroups(2)(x)
    assert s.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(s, x.contiguous().view(2, 3, 2, 3, 5).sum(2))


# ------------------------------------------------------------------ structure and API
def test_dw1_structure():
    conv = make_conv(2, cin=4, cout=6)
    dwpw = fast_form(decouple_conv(conv, 3, "dw-pw"), "dw1")
    assert list(dwpw._modules) == ["repeat", "conv_dw", "conv_pw"]
    assert dwpw.conv_dw.groups == dwpw.conv_dw.in_channels == dwpw.conv_dw.out_channels == 12
    pwdw = fast_form(decouple_conv(conv, 3, "pw-dw"), "dw1")
    assert list(pwdw._modules) == ["conv_pw", "conv_dw", "sum"]
    assert pwdw.conv_dw.groups == pwdw.conv_dw.in_channels == pwdw.conv_dw.out_channels == 18
    # at T = 1 the plain Sequential already has channel multiplier 1
    one = fast_form(decouple_conv(conv, 1, "dw-pw"), "dw1")
    assert list(one._modules) == ["conv_dw", "conv_pw"] and decoupled_rank(one) == 1
    assert "dw1" not in candidate_forms(decouple_conv(conv, 1, "pw-dw"))


def test_dense_is_rebuilt_kernel():
    conv = make_conv(2, cin=4, cout=6, groups=2, dtype=torch.float64)
    f = factorize(conv.weight, 2, "dw-pw")
    from decompose.kernels.nd import rebuild
    seq = decouple_conv(conv, 2, "dw-pw", factors=f)
    w, b = rebuilt_weight(seq)
    torch.testing.assert_close(w, rebuild(f, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(b, conv.bias.detach(), rtol=0, atol=0)
    dense = fast_form(seq, "dense")
    assert type(dense) is nn.Conv2d and dense.groups == 2 and dense.stride == conv.stride


def test_depthwise_bias_folds_into_dense():
    conv = make_conv(2, cin=4, cout=6, groups=2, dtype=torch.float64)
    seq = decouple_conv(conv, 2, "dw-pw")
    dw = seq.conv_dw
    seq.conv_dw = nn.Conv2d(dw.in_channels, dw.out_channels, 3, padding=1, groups=dw.groups,
                            dtype=torch.float64)
    with torch.no_grad():
        seq.conv_dw.weight.copy_(dw.weight)
    x = make_input(conv)
    with torch.no_grad():
        for name, m in candidate_forms(seq).items():
            torch.testing.assert_close(m(x), seq(x), rtol=0, atol=ATOL64, msg=name)


def test_form_keeps_mode_and_leaves_input_alone():
    seq = decouple_conv(make_conv(2), 2, "dw-pw").train()
    before = {k: v.clone() for k, v in seq.state_dict().items()}
    for m in candidate_forms(seq).values():
        assert m.training
    assert not fast_form(seq.eval(), "dw1").training
    for k, v in seq.state_dict().items():
        assert torch.equal(v, before[k])


def test_errors_list_choices():
    seq = decouple_conv(make_conv(2), 2, "dw-pw")
    with pytest.raises(ValueError, match="auto, plain, dense, dw1"):
        fast_form(seq, "fastest")
    with pytest.raises(TypeError, match="decoupled layer"):
        fast_form(make_conv(2))
    with pytest.raises(TypeError):
        form_name(nn.ReLU())


def test_auto_rule():
    def auto(cin, cout, rank, order="dw-pw", stride=1):
        return auto_form(decouple_conv(make_conv(2, cin=cin, cout=cout, stride=stride), rank,
                                       order))
    assert auto(16, 16, 1) == "plain"  # T = 1: always worth it for a 3x3 dw-pw conv
    assert auto(16, 16, 2) == "dense"  # narrow layers: the intermediate costs more than it saves
    assert auto(256, 256, 2) == "dw1" and auto(256, 256, 4, "pw-dw") == "dw1"
    assert auto(256, 256, 6) == "dense"
    assert auto(256, 256, 2, stride=2) == "plain"  # no repeat of the larger input
    assert auto(32, 64, 1, "pw-dw", stride=2) == "dense"  # pw-dw's 1x1 runs at input resolution
    seq = decouple_conv(make_conv(2, cin=64, cout=64), 2, "dw-pw")
    assert estimated_speedup(seq) == pytest.approx(9 * 64 / (2 * (64 + 200)))


def test_auto_is_a_known_form():
    for order in ORDERS:
        for rank in (1, 2, 4, 9):
            seq = decouple_conv(make_conv(2, cin=8, cout=8), rank, order)
            assert auto_form(seq) in FORMS
            assert form_name(fast_form(seq)) in FORMS


# ------------------------------------------------------------------ export and safe loading
def _modules(order: str) -> tuple[nn.Module, torch.Tensor]:
    conv = make_conv(2, cin=4, cout=6, stride=2)
    return fast_form(decouple_conv(conv, 3, order), "dw1").eval(), make_input(conv)


@pytest.mark.parametrize("order", ORDERS)
def test_torchscript(order):
    m, x = _modules(order)
    s = torch.jit.script(m)
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x))
        xcl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(s(xcl), m(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("order", ORDERS)
def test_weights_only_load_with_allowlist(order):
    m, x = _modules(order)
    buf = io.BytesIO()
    torch.save(m, buf)
    allow = [nn.Sequential, nn.Conv2d, LowRankConv, *CUSTOM_MODULES]
    buf.seek(0)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(buf)) <= {
        f"{c.__module__}.{c.__qualname__}" for c in allow}
    buf.seek(0)
    with torch.serialization.safe_globals(allow):
        m2 = torch.load(buf, weights_only=True)
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


@pytest.mark.parametrize("order", ORDERS)
def test_onnx_export(order):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings
    m, x = _modules(order)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (x,), buf, dynamo=False)  # the dynamo exporter works too (slower)
    sess = ort.InferenceSession(buf.getvalue())
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), m(x), rtol=RTOL, atol=ATOL)
