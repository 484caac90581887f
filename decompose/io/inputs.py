"""Checking a path before reading it: one-line errors instead of OSErrors, and no hangs.

Every file decompose reads (model, teacher, checkpoint, ``.npz``, images) is looked at with
``stat`` *before* it is opened: a FIFO or a device node is refused (opening a FIFO would block
forever, reading ``/dev/zero`` would never end), as are missing paths, names too long, symbolic
link loops and paths that cannot be read. Files are then opened non-blocking and checked again
on the open descriptor, so a file swapped for a FIFO in between cannot block either.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import DecomposeError
from .write import check_name_length


def _stat_error(e: OSError, p: Path, what: str) -> DecomposeError:
    if isinstance(e, FileNotFoundError):
        return DecomposeError(f"{what} not found: {p}; check the path")
    if isinstance(e, NotADirectoryError):
        return DecomposeError(f"{what} {p}: a part of the path is a file, not a folder; check "
                              "the path")
    if isinstance(e, PermissionError):
        return DecomposeError(f"cannot read {what} {p}: permission denied; check its "
                              "permissions")
    if e.errno == errno.ENAMETOOLONG:
        return DecomposeError(f"{what} path {str(p)[:60]}... is too long for the file system; "
                              "use a shorter name")
    if e.errno == errno.ELOOP:
        return DecomposeError(f"{what} {p} is a symbolic link loop; fix the link")
    return DecomposeError(f"cannot read {what} {p} ({e.strerror or type(e).__name__}); check "
                          "the path")


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def stat_input(path: str | os.PathLike, what: str = "file", folder_ok: bool = False
               ) -> os.stat_result:
    """``os.stat`` of an input (links followed), refusing anything but a regular file (or a
    folder with ``folder_ok``), with a one-line :class:`DecomposeError` that names ``what``."""
    p = Path(os.fspath(path))
    if not str(path):
        raise DecomposeError(f"the {what} path is empty; give a path")
    try:
        check_name_length(p, what)
    except DecomposeError as e:
        raise DecomposeError(str(e).replace("choose a shorter name", "use a shorter name")) from None
    try:
        st = os.stat(p)
    except OSError as e:
        raise _stat_error(e, p, what) from None
    except ValueError:  # an embedded NUL byte
        raise DecomposeError(f"the {what} path contains a NUL byte; check it") from None
    if stat.S_ISDIR(st.st_mode):
        if folder_ok:
            return st
        raise DecomposeError(f"{what} {p} is a folder; give the file inside it")
    if not stat.S_ISREG(st.st_mode):
        raise DecomposeError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file; give a "
                             "file saved on disk")
    return st


def open_input(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """Open a regular file for reading without ever blocking on a FIFO (see module docs)."""
    p = Path(os.fspath(path))
    stat_input(p, what)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _stat_error(e, p, what) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecomposeError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file; give a "
                                 "file saved on disk")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


__all__ = ["open_input", "stat_input"]
