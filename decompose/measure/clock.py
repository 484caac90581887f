"""Side-by-side latency of modules: the one timing routine every part of the project uses.

Timings on a shared CPU drift with load, so comparisons are only meaningful as ratios measured
together in one process. :func:`compare_latency` therefore runs the candidates *interleaved*:
after a warm-up of every module, each round times every module once (the order rotates from
round to round, so no module always runs right after the same neighbour), and the median of the
rounds is reported. :func:`time_module` is the one-module case.

Everything runs under ``torch.inference_mode()`` with the modules temporarily in eval mode (their
``training`` flags are restored afterwards) and with Python's garbage collector paused while
timing, as :mod:`timeit` does. The clock is injectable (``timer=``, seconds as a float, like
:func:`time.perf_counter`) so that tests can be deterministic.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.trace import eval_mode

Timer = Callable[[], float]


# Clocks for ``timer=``: wall time, or the CPU time of the calling thread (with one thread doing
# all the work, other processes' load on a shared machine does not inflate it).
CLOCKS: dict[str, Timer] = {"wall": time.perf_counter, "cpu": time.thread_time}


# Environment settings that change CPU latency through the memory allocator: glibc returns
# blocks above its mmap threshold to the system on free, so large activations can page-fault
# on every call unless these are set or another allocator is preloaded (docs/speed.md).
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                 "LD_PRELOAD")


def allocator_settings() -> dict[str, str]:
    """The allocator-related environment variables that are set (empty: glibc's defaults)."""
    return {k: os.environ[k] for k in ALLOCATOR_ENV if os.environ.get(k)}


@dataclass(frozen=True)
class Latency:
    """The timing of one module: per-call milliseconds of every measured round.

    ``median_ms`` is the figure to report; ``q1_ms``/``q3_ms`` (quartiles) show the spread.
    """

    samples_ms: tuple[float, ...]
    threads: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def q1_ms(self) -> float:
        return _quantile(self.samples_ms, 0.25)

    @property
    def q3_ms(self) -> float:
        return _quantile(self.samples_ms, 0.75)

    def to_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "q1_ms": self.q1_ms, "q3_ms": self.q3_ms,
                "min_ms": self.min_ms, "rounds": len(self.samples_ms), "threads": self.threads}


def _quantile(xs: tuple[float, ...], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


@contextmanager
def _gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _no_sync() -> None:
    pass


def _on_cuda(modules: Mapping[str, Callable[..., Any]], args: Mapping[str, Any]) -> bool:
    tensors = [t for a in args.values() for t in (a if isinstance(a, tuple) else (a,))
               if isinstance(t, torch.Tensor)]
    tensors += [p for m in modules.values() if isinstance(m, nn.Module)
                for p in itertools.islice(m.parameters(), 1)]
    return any(t.is_cuda for t in tensors)


def _call(module: Callable[..., Any], x: Any) -> Any:
    return module(*x) if isinstance(x, tuple) else module(x)


def compare_latency(modules: Mapping[str, Callable[..., Any]], x: Any, *, repeats: int = 30,
                    warmup: int = 3, number: int = 1, timer: Timer = time.perf_counter,
                    threads: int | None = None,
                    inputs: Mapping[str, Any] | None = None) -> dict[str, Latency]:
    """Time several modules side by side; ``{name: Latency}`` in the order given.

    Args:
        modules: name -> module (any callable; ``nn.Module``s are put in eval mode while timed
            and restored afterwards).
        x: the input, or a tuple of positional inputs. Not copied: a module must not modify it.
        repeats: measured rounds (default 30, >= 1); each round times every module once.
        warmup: untimed calls of every module before measuring (default 3, >= 0), also
            interleaved, so that allocator caches and oneDNN primitives are built first.
        number: calls per timed sample (default 1, >= 1); the sample is their mean. Raise it
            for layers that take only microseconds.
        timer: a clock in seconds (default :func:`time.perf_counter`); inject a fake one for
            deterministic tests. It is read exactly twice per sample; when an input or a
            module's parameters are on a CUDA device, each read follows a
            ``torch.cuda.synchronize()``, so the sample covers the kernels, not their launch.
        threads: if given, ``torch.set_num_threads`` for the measurement (restored afterwards);
            the count used is recorded in every result.
        inputs: optional name -> input for modules that need their own input (e.g. a
            channels_last copy); others get ``x``.
    """
    if repeats < 1 or warmup < 0 or number < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, number >= 1; got {repeats}, {warmup}, "
                         f"{number}")
    names = list(modules)
    if not names:
        return {}
    inputs = dict(inputs or {})
    unknown = set(inputs) - set(names)
    if unknown:
        raise ValueError(f"inputs given for unknown modules {sorted(unknown)}; known: {names}")
    args = {n: inputs.get(n, x) for n in names}
    nn_modules = [m for m in modules.values() if isinstance(m, nn.Module)]
    # CUDA kernels run asynchronously: without a barrier the clock would read launch time only
    sync = torch.cuda.synchronize if _on_cuda(modules, args) else _no_sync
    samples: dict[str, list[float]] = {n: [] for n in names}
    with _threads(threads), eval_mode(*nn_modules), torch.inference_mode():
        used_threads = torch.get_num_threads()
        for _ in range(warmup):
            for n in names:
                _call(modules[n], args[n])
        with _gc_paused():
            for r in range(repeats):
                k = r % len(names)
                for n in names[k:] + names[:k]:
                    m, a = modules[n], args[n]
                    sync()
                    t0 = timer()
                    for _ in range(number):
                        _call(m, a)
                    sync()
                    t1 = timer()
                    samples[n].append((t1 - t0) * 1e3 / number)
    return {n: Latency(tuple(samples[n]), used_threads) for n in names}


def time_module(module: Callable[..., Any], example_input: Any, *, repeats: int = 30,
                warmup: int = 3, number: int = 1, timer: Timer = time.perf_counter,
                threads: int | None = None) -> Latency:
    """Latency of one module on ``example_input`` (see :func:`compare_latency` for the args).

    To compare modules use :func:`compare_latency`, not two calls of this: only interleaved
    rounds make the ratio robust to the machine's load changing in between.
    """
    return compare_latency({"m": module}, example_input, repeats=repeats, warmup=warmup,
                           number=number, timer=timer, threads=threads)["m"]


def speedups(results: Mapping[str, Latency], baseline: str) -> dict[str, float]:
    """Speed-up of every result over ``baseline`` (> 1 means faster than the baseline).

    For results of one :func:`compare_latency` call it is the median over rounds of the paired
    ratio ``baseline / module`` (rounds ran close together in time, so load that drifts between
    rounds cancels); for results of unequal length, the ratio of the medians.
    """
    if baseline not in results:
        raise KeyError(f"baseline {baseline!r} not among {list(results)}")
    b = results[baseline]
    out = {}
    for n, r in results.items():
        if len(r.samples_ms) == len(b.samples_ms):
            out[n] = statistics.median(_ratio(bs, rs) for bs, rs in zip(b.samples_ms, r.samples_ms))
        else:
            out[n] = _ratio(b.median_ms, r.median_ms)
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")
