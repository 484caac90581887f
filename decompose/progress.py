"""Progress bars for anything that takes more than a couple of seconds: on stderr, never stdout.

    from decompose.progress import progress
    for x, y in progress(loader, desc="eval", unit="batch"):
        ...

Uses tqdm when it is installed (``pip install decompose[progress]``); without it, a plain line on
stderr when a long loop starts and when it ends (and nothing at all when stderr is not a
terminal). ``quiet=True`` silences one bar; :func:`quiet_progress` silences every bar opened
inside it, which is how the command line's ``--quiet`` reaches library code it does not call
directly (evaluation loops, sweeps). Nothing here changes state at import.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_QUIET: ContextVar[bool] = ContextVar("decompose_progress_quiet", default=False)


@contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """Inside this block every :func:`progress` with ``quiet=None`` is silent when ``quiet``."""
    token = _QUIET.set(bool(quiet) or _QUIET.get())
    try:
        yield
    finally:
        _QUIET.reset(token)


def is_quiet(quiet: bool | None = None) -> bool:
    """``quiet`` if given, else whether a :func:`quiet_progress` block is active."""
    return _QUIET.get() if quiet is None else bool(quiet)


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency
        return None
    return tqdm


class _Plain:
    """The fallback without tqdm: 'desc ...' at the start and 'desc: n unit in Xs' at the end,
    only when stderr is a terminal."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = 0
        self.start = time.perf_counter()
        self.live = sys.stderr.isatty()
        if self.live:
            size = f" ({total} {unit})" if total else ""
            print(f"{desc}{size} ...", file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable or ():
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str) -> None:  # tqdm's API; nothing to show here
        pass

    def close(self) -> None:
        if self.live:
            self.live = False
            secs = time.perf_counter() - self.start
            print(f"{self.desc}: {self.n} {self.unit} in {secs:.1f}s", file=sys.stderr, flush=True)

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Silent(_Plain):
    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = 0
        self.live = False


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", quiet: bool | None = None, leave: bool = False) -> Any:
    """Wrap ``iterable`` (or, with ``iterable=None``, make a bar to ``update(n)`` by hand).

    Args:
        iterable: what to iterate over; its ``len()`` is used when ``total`` is not given.
        total: number of items (default: ``len(iterable)`` when it has one).
        desc: a short label shown before the bar, e.g. ``"eval original"``.
        unit: what one item is, e.g. ``"batch"`` or ``"img"``. Default ``"it"``.
        quiet: True for no output at all; None (default) follows :func:`quiet_progress`.
        leave: keep the finished bar on screen (tqdm only). Default False.

    Returns an object that iterates like ``iterable`` and has ``update(n)``, ``close()``,
    ``set_postfix_str(s)`` and works as a context manager.
    """
    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if is_quiet(quiet):
        return _Silent(iterable, total, desc, unit)
    tqdm = _tqdm()
    if tqdm is None:
        return _Plain(iterable, total, desc, unit)
    return tqdm(iterable, total=total, desc=desc or None, unit=unit, leave=leave,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


__all__ = ["is_quiet", "progress", "quiet_progress"]
