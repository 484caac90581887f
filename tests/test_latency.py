"""The timing utility, made deterministic by an injected fake clock."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from decompose.measure.clock import Latency, compare_latency, speedups, time_module


class FakeClock:
    """A clock that advances only when a fake module runs: by that module's cost (ms)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now


class Fake(nn.Module):
    def __init__(self, clock: FakeClock, name: str, costs_ms) -> None:
        super().__init__()
        self.clock, self.name = clock, name
        self.costs = list(costs_ms) if isinstance(costs_ms, (list, tuple)) else None
        self.cost = costs_ms
        self.calls = 0
        self.seen_modes: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.clock.log.append(self.name)
        self.seen_modes.append((self.training, torch.is_inference_mode_enabled()))
        c = self.costs[self.calls % len(self.costs)] if self.costs else self.cost
        self.calls += 1
        self.clock.now += c / 1e3
        return x


def test_deterministic_medians_and_call_counts():
    clock = FakeClock()
    a = Fake(clock, "a", 2.0)
    b = Fake(clock, "b", [1.0, 5.0, 1.0])  # a noisy one: median 1 ms
    res = compare_latency({"a": a, "b": b}, torch.zeros(1), repeats=5, warmup=2, timer=clock)
    assert list(res) == ["a", "b"]
    assert res["a"].samples_ms == pytest.approx((2.0,) * 5)
    assert res["a"].median_ms == pytest.approx(2.0)
    assert res["b"].median_ms == pytest.approx(1.0)
    assert res["b"].min_ms == pytest.approx(1.0)
    assert a.calls == b.calls == 7
    again = compare_latency({"a": Fake(FakeClock(), "a", 2.0)}, torch.zeros(1), repeats=5,
                            warmup=2, timer=FakeClock())
    assert again["a"].threads == res["a"].threads


def test_rounds_alternate_and_rotate():
    clock = FakeClock()
    mods = {n: Fake(clock, n, 1.0) for n in "abc"}
    compare_latency(mods, torch.zeros(1), repeats=3, warmup=1, timer=clock)
    assert clock.log == list("abc") + list("abc") + list("bca") + list("cab")


def test_number_averages_inner_calls():
    clock = FakeClock()
    m = Fake(clock, "m", [1.0, 3.0])
    r = time_module(m, torch.zeros(1), repeats=4, warmup=0, number=2, timer=clock)
    assert r.samples_ms == pytest.approx((2.0,) * 4)
    assert m.calls == 8


def test_eval_and_inference_mode_then_restored():
    clock = FakeClock()
    inner = Fake(clock, "inner", 1.0)
    outer = nn.Sequential(inner).train()
    inner.train()
    time_module(outer, torch.zeros(1), repeats=2, warmup=1, timer=clock)
    assert inner.seen_modes == [(False, True)] * 3
    assert outer.training and inner.training


def test_per_module_inputs_and_tuple_inputs():
    seen = {}

    def f(x, y=None):
        seen.setdefault("f", (x, y))
        return x

    def g(x):
        seen.setdefault("g", x)
        return x

    x, other = torch.zeros(1), torch.ones(2)
    compare_latency({"f": f, "g": g}, (x, x), inputs={"g": other}, repeats=1, warmup=0)
    assert seen["f"][1] is x and seen["g"] is other
    with pytest.raises(ValueError, match="unknown modules"):
        compare_latency({"f": f}, x, inputs={"h": x})


def test_speedups_are_paired_ratios():
    a = Latency((2.0, 4.0, 2.0), threads=1)   # the machine got slower in round 2 ...
    b = Latency((1.0, 2.0, 1.0), threads=1)   # ... for both
    assert speedups({"a": a, "b": b}, "a") == pytest.approx({"a": 1.0, "b": 2.0})
    c = Latency((1.0,), threads=1)
    assert speedups({"a": a, "c": c}, "a")["c"] == pytest.approx(2.0)  # unequal: medians
    with pytest.raises(KeyError):
        speedups({"a": a}, "z")


def test_threads_set_and_restored():
    before = torch.get_num_threads()
    r = time_module(lambda x: x, torch.zeros(1), repeats=1, warmup=0, threads=1)
    assert r.threads == 1 and torch.get_num_threads() == before


def test_bad_arguments():
    with pytest.raises(ValueError):
        time_module(lambda x: x, torch.zeros(1), repeats=0)
    assert compare_latency({}, torch.zeros(1)) == {}


def test_real_clock_smoke():
    conv = nn.Conv2d(3, 4, 3)
    r = time_module(conv, torch.randn(1, 3, 8, 8), repeats=3, warmup=1)
    assert len(r.samples_ms) == 3 and r.median_ms > 0 and r.q1_ms <= r.q3_ms
    assert set(r.to_dict()) >= {"median_ms", "q1_ms", "q3_ms", "min_ms", "rounds", "threads"}


def test_cuda_work_is_synchronized_before_each_clock_read(monkeypatch):
    """On a GPU kernels run asynchronously: every timer read must follow a device barrier."""
    import decompose.measure.clock as lat
    events: list[str] = []
    clock = iter(range(1000))

    def timer() -> float:
        events.append("timer")
        return float(next(clock))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: events.append("sync"))
    monkeypatch.setattr(lat, "_on_cuda", lambda modules, args: True)
    compare_latency({"a": lambda x: events.append("call")}, torch.zeros(1), repeats=2,
                    warmup=0, timer=timer)
    assert events == ["sync", "timer", "call", "sync", "timer"] * 2
    # and on the CPU nothing synchronizes
    events.clear()
    monkeypatch.setattr(lat, "_on_cuda", lambda modules, args: False)
    compare_latency({"a": lambda x: events.append("call")}, torch.zeros(1), repeats=1,
                    warmup=0, timer=timer)
    assert events == ["timer", "call", "timer"]


def test_on_cuda_sees_inputs_and_parameters_on_cpu_as_cpu():
    from decompose.measure.clock import _on_cuda
    assert not _on_cuda({"m": torch.nn.Linear(2, 2)}, {"m": (torch.zeros(1), 3)})


def test_latency_reports_record_the_allocator_settings(monkeypatch):
    """glibc's mmap threshold changes CPU timings a lot (docs/speed.md): reports say what was set."""
    import decompose
    from decompose.measure.clock import ALLOCATOR_ENV, allocator_settings
    from decompose.measure.compare import measure_latency
    for k in ALLOCATOR_ENV:
        monkeypatch.delenv(k, raising=False)
    assert allocator_settings() == {}
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert allocator_settings() == {"MALLOC_MMAP_THRESHOLD_": "1073741824"}
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    new, rep = decompose.api.decompose(net, rank=1, input_shape=(3, 12, 12))
    lat = measure_latency(net, new, rep.layers, torch.randn(2, 3, 12, 12), repeats=2,
                          per_layer=False)
    assert lat["allocator"] == {"MALLOC_MMAP_THRESHOLD_": "1073741824"}
    fake = lambda layer, label, module, x: 1.0  # noqa: E731
    _, rep = decompose.api.decompose(net, rank=1, input_shape=(3, 12, 12), latency_aware=True,
                                 latency_fn=fake)
    assert rep.latency_plan["allocator"] == {"MALLOC_MMAP_THRESHOLD_": "1073741824"}
