"""The one exception users see.

Every message is one line that says what went wrong *and* what to do about it. The CLI prints
it as ``Error: <message>`` and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class DecomposeError(Exception):
    """A user-facing problem: bad input, a file that cannot be read, a setting out of range."""


class BudgetError(DecomposeError):
    """A budget (``--target-macs``, ``--target-params``, ``--target-latency``) that no plan can
    meet; the message gives the reachable fraction. A sweep records it as a row and goes on."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type name if it has none),
    cut to ``limit`` characters: what a one-line error quotes of an underlying failure."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]
