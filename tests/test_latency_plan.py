"""Fast forms in the engine, latency-aware plans and the latency budget (fake, deterministic
latencies through ``latency_fn``)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import decompose
from decompose import DecomposeConfig
from decompose.api import finalize_forms_, plain_forms_
from decompose.engine.trace import count_macs, param_count
from decompose.errors import DecomposeError
from decompose.methods.nd.forms import form_name
from decompose.methods.nd.layers import decoupled_order, decoupled_rank, is_decoupled
from decompose.planning import timing

SHAPE = (8, 12, 12)


class Net(nn.Module):
    """Convs of several widths; a strided one, one with bias, and a 1x1 that is never decoupled."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 16, 3, padding=1, bias=True)
        self.c = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.d = nn.Conv2d(32, 32, 3, padding=1, bias=True)
        self.p = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        x = self.a(x).relu()
        x = self.b(x).relu()
        x = self.c(x).relu()
        return self.p(self.d(x).relu()).mean((2, 3))


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def fake(slow: tuple[str, ...] = ()):
    """original 10 ms; plain 4 ms at T=1 and 5+4T ms above (slower than the original from T=2);
    dw1 3+T ms; layers in ``slow`` 20 ms in every decomposed form; the model 100 ms."""
    def fn(name, label, module, x):
        if label == "model":
            return 100.0
        if label == "original":
            return 10.0
        _, order, t, form = label.split("/")  # "nd/<order>/T<rank>/<form>"
        t = int(t[1:])
        if name in slow:
            return 20.0
        if form == "plain":
            return 4.0 if t == 1 else 5.0 + 4.0 * t
        return 3.0 + t
    return fn


def test_dw1_is_recognised_as_decoupled():
    m = net()
    decompose.decompose_(m, rank=3, form="dw1", order="pw-dw", input_shape=SHAPE)
    assert form_name(m.b) == "dw1" and is_decoupled(m.b)
    assert decoupled_order(m.b) == "pw-dw" and decoupled_rank(m.b) == 3
    m2 = net()
    decompose.decompose_(m2, rank=2, form="dw1", order="dw-pw", input_shape=SHAPE)
    assert list(m2.b._modules) == ["repeat", "conv_dw", "conv_pw"]
    assert decoupled_order(m2.b) == "dw-pw" and decoupled_rank(m2.b) == 2


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw", "auto"])
@pytest.mark.parametrize("form", ["dw1", "auto", "fastest"])
def test_forms_are_exact_and_counts_match_hooks(order, form):
    x = torch.randn(4, *SHAPE)
    plain = net()
    decompose.decompose_(plain, rank=3, order=order, input_shape=SHAPE)
    m = net()
    rep = decompose.decompose_(m, rank=3, order=order, form=form, input_shape=SHAPE,
                               latency_fn=fake())
    built = {lp.name: form_name(m.get_submodule(lp.name)) for lp in rep.decomposed}
    assert built == {lp.name: lp.form for lp in rep.decomposed}
    with torch.no_grad():
        for lp in rep.decomposed:  # every decoupled layer equals its plain build
            xi = torch.randn(2, lp.kernel_shape[1] * lp.groups, 6, 6)
            torch.testing.assert_close(m.get_submodule(lp.name)(xi),
                                       plain.get_submodule(lp.name)(xi), rtol=1e-4, atol=1e-5)
        if len(rep.decomposed) == len(decompose.plan(net(), rank=3, order=order,
                                                     input_shape=SHAPE).decomposed):
            torch.testing.assert_close(m(x), plain(x), rtol=1e-4, atol=1e-5)
    # params and MACs (repeat/sum modules: no parameters, counted as 0 MACs) as hooks count them
    assert rep.totals["params_after"] == param_count(m)
    assert rep.totals["macs_after"] == count_macs(m, SHAPE)
    for lp in rep.decomposed:
        assert lp.params_after == param_count(m.get_submodule(lp.name))


def test_dw1_pw_dw_bias_params_counted():
    m = net()
    rep = decompose.decompose_(m, rank=3, order="pw-dw", form="dw1", input_shape=SHAPE)
    b = next(lp for lp in rep.decomposed if lp.name == "b")
    assert b.form == "dw1"
    assert b.params_after == param_count(m.b)
    assert rep.totals["params_after"] == param_count(m)


def test_auto_keeps_dense_choices_original():
    rep = decompose.plan(net(), rank=3, form="auto", input_shape=SHAPE)
    # 16-32 channels at T=3: the cost model picks the dense conv -> kept original
    for lp in rep.layers:
        if lp.name in ("a", "b", "c", "d"):
            assert lp.skipped and "not faster" in lp.skipped and lp.form is None


def test_latency_aware_keeps_layers_that_are_not_faster():
    rep = decompose.plan(net(), rank=2, form="plain", latency_aware=True, input_shape=SHAPE,
                         latency_fn=fake())
    for lp in rep.layers:
        if lp.name in ("a", "b", "c", "d"):  # plain T=2 takes 13 ms vs 10
            assert lp.skipped.startswith("kept original: decomposing is not faster")
            assert "13.000 ms" in lp.skipped and "10.000 ms" in lp.skipped
            assert lp.plan_ms_after == 13.0 and lp.params_after == lp.params_before
    assert rep.latency_plan["clock"] == "latency_fn"
    rep1 = decompose.plan(net(), rank=1, latency_aware=True, input_shape=SHAPE,
                          latency_fn=fake(slow=("c",)))
    kept = {lp.name for lp in rep1.layers if lp.skipped}
    assert "c" in kept and not {"a", "b", "d"} & kept
    assert all(lp.form == "plain" for lp in rep1.decomposed)


def test_fastest_picks_the_fastest_form_and_respects_the_margin():
    rep = decompose.plan(net(), rank=2, form="fastest", input_shape=SHAPE, latency_fn=fake())
    assert {lp.form for lp in rep.decomposed} == {"dw1"}  # 5 ms vs plain 13 ms
    assert all(lp.plan_ms_after == 5.0 for lp in rep.decomposed)

    def close(name, label, module, x):  # 4% faster: within the 1.05 margin
        return 10.0 if label == "original" else 9.6
    rep = decompose.plan(net(), rank=1, form="fastest", input_shape=SHAPE, latency_fn=close)
    assert not rep.decomposed
    rep = decompose.plan(net(), rank=1, form="fastest", input_shape=SHAPE, latency_fn=close,
                         latency_margin=1.0)
    assert len(rep.decomposed) == 4


def test_injected_clock_is_used():
    ticks = itertools.count()
    rep = decompose.plan(net(), rank=1, latency_aware=True, input_shape=SHAPE,
                         timer=lambda: float(next(ticks)))
    # every sample lasts one tick: nothing is faster than the original
    assert not rep.decomposed and rep.latency_plan["clock"] == "injected"


def _sq_error(rep):
    return sum(lp.kernel_error ** 2 for lp in rep.layers if lp.name in ("a", "b", "c", "d"))


@pytest.mark.parametrize("form", ["fastest", "dw1"])
def test_target_latency_is_met_and_beats_uniform_choices(form):
    target = 0.8
    rep = decompose.plan(net(), target_latency=target, form=form, input_shape=SHAPE,
                         latency_fn=fake())
    info = rep.latency_plan
    assert info["predicted_fraction"] <= target + 1e-12
    # the prediction is the sum of the chosen options' fake costs
    fn = fake()
    pred = info["remainder_ms"]
    for lp in rep.layers:
        if lp.name in ("a", "b", "c", "d"):
            pred += 10.0 if lp.skipped else fn(lp.name, f"nd/{lp.order}/T{lp.rank}/{lp.form}",
                                                None, None)
    assert pred == pytest.approx(info["predicted_ms"])
    assert pred <= target * 100.0 + 1e-9
    # every uniform (order, rank, form) that meets the same budget has at least the error
    best = _sq_error(rep)
    forms = ("plain", "dw1") if form == "fastest" else ("dw1",)
    met = 0
    for order, t, f in itertools.product(("dw-pw", "pw-dw"), range(1, 6), forms):
        u = decompose.plan(net(), rank=t, order=order, input_shape=SHAPE)
        cost = info["remainder_ms"] + sum(
            fn(lp.name, f"nd/{order}/T{lp.rank}/{f if lp.rank > 1 else 'plain'}", None, None)
            if not lp.skipped else 10.0 for lp in u.layers if lp.name in ("a", "b", "c", "d"))
        if cost <= target * 100.0:
            met += 1
            assert _sq_error(u) >= best - 1e-9
    assert met > 0


def _fake_sum(model: nn.Module) -> float:
    """What ``fake()``'s per-layer costs add up to for a built model: 60 ms outside a-d."""
    fn, total = fake(), 60.0
    for name in ("a", "b", "c", "d"):
        m = getattr(model, name)
        total += 10.0 if not is_decoupled(m) else fn(
            name, f"nd/{decoupled_order(m)}/T{decoupled_rank(m)}/{form_name(m)}", m, None)
    return total


def test_target_latency_is_checked_on_the_whole_model_and_tightened(monkeypatch):
    """The whole planned model runs 5 ms slower than the per-layer sum predicts (what happens
    between layers): the plan is timed whole and the budget cut until it meets the target."""
    seen = []
    slower = [5.0]

    def whole(self, planned):  # the whole-model clock, faked like the per-layer one
        seen.append((_fake_sum(planned) + slower[0]) / 100.0)
        return seen[-1]
    monkeypatch.setattr(timing.LayerTimer, "planned_fraction", whole)
    rep = decompose.plan(net(), target_latency=0.9, form="fastest", input_shape=SHAPE,
                         latency_fn=fake())
    info = rep.latency_plan
    assert info["measured_rounds"] == pytest.approx(seen)
    assert len(seen) >= 2 and seen[0] > 0.91  # the first plan was over: tightened
    assert seen[-1] <= 0.91 and info["met"] is True
    assert info["measured_fraction"] == pytest.approx(seen[-1])
    assert info["predicted_ms"] == pytest.approx(100.0 * seen[-1] - 5.0)  # the plan kept
    # out of reach (20 ms over every prediction; the fastest plan sums to 76 ms): the fastest
    # plan is kept and the report says the target was not met
    seen.clear()
    slower[0] = 20.0
    rep = decompose.plan(net(), target_latency=0.8, form="fastest", input_shape=SHAPE,
                         latency_fn=fake())
    info = rep.latency_plan
    assert info["met"] is False and info["predicted_ms"] == pytest.approx(76.0)
    assert info["measured_fraction"] == pytest.approx(0.96)
    assert "NOT met" in decompose.report.render_table(rep)
    # an injected latency_fn alone is not checked whole: the prediction, as before
    monkeypatch.undo()
    rep = decompose.plan(net(), target_latency=0.8, form="fastest", input_shape=SHAPE,
                         latency_fn=fake())
    assert "measured_fraction" not in rep.latency_plan


def test_target_latency_unreachable_says_the_best_fraction():
    with pytest.raises(DecomposeError, match=r"--target-latency 0.3 cannot be met: the fastest "
                                             r"plan measured takes 0\.7\d\d"):
        decompose.plan(net(), target_latency=0.3, form="fastest", input_shape=SHAPE,
                       latency_fn=fake())


def test_finalize_after_calibration_on_plain():
    x = torch.randn(6, *SHAPE)
    original = net()
    m = copy.deepcopy(original)
    rep = decompose.decompose_(m, rank=2, form="dw1", input_shape=SHAPE)
    with torch.no_grad():
        y = m(x)
    assert plain_forms_(m) == 4 and all(form_name(m.get_submodule(lp.name)) == "plain"
                                        for lp in rep.decomposed)
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, rtol=1e-4, atol=1e-5)
    from decompose.recover.calibrate import calibrate_
    calibrate_(m, original, [x], samples=6, progress=False)
    assert finalize_forms_(m, rep) == 4
    assert {form_name(m.get_submodule(lp.name)) for lp in rep.decomposed} == {"dw1"}
    assert finalize_forms_(m, rep) == 0


def test_config_validation():
    with pytest.raises(DecomposeError, match="form must be one of"):
        DecomposeConfig(form="dense")
    with pytest.raises(DecomposeError, match="choose one of"):
        DecomposeConfig(rank=2, target_latency=0.5)
    with pytest.raises(DecomposeError, match="target_latency must be in"):
        DecomposeConfig(target_latency=1.5)
    with pytest.raises(DecomposeError, match="latency_batch"):
        DecomposeConfig(latency_batch=0)
    c = DecomposeConfig(target_latency=0.5, form="fastest", latency_batch=64, threads=1)
    assert DecomposeConfig.from_dict(c.to_dict()) == c and c.timed


def test_cli_flags(tmp_path):
    from click.testing import CliRunner

    from decompose.cli import cli
    path = tmp_path / "m.pt"
    torch.save(net(), path)
    res = CliRunner().invoke(cli, ["report", str(path), "--trust", "--rank", "1", "--form",
                                    "dw1", "--input-shape", "8,12,12", "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["report", str(path), "--trust", "--target-latency", "0.01",
                                    "--plan-batch", "2", "--plan-threads", "1",
                                    "--input-shape", "8,12,12"])
    assert res.exit_code != 0 and "--target-latency 0.01 cannot be met" in res.output
