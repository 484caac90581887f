"""The one writer: every file decompose writes goes through :func:`atomic_write`.

Models, checkpoints, fine-tuning logs, sweep CSVs, plots, ONNX and TorchScript files all land
the same way, and the rules are the same for all of them:

* **Atomic.** The bytes go to a temporary file in the target's own folder, are flushed to disk
  (``fsync``), and the temporary file is renamed over the target (``os.replace``; without
  ``force``, ``os.link`` so that a file appearing meanwhile is never replaced). A reader sees the
  old file or the new one, never a part.
* **Nothing replaced without force.** An existing file is only replaced with ``force=True``
  (``--force``).
* **Never the command's own inputs.** A target that is one of the inputs registered with
  :func:`protect_inputs` or passed as ``inputs`` (or a hard link to one), or an existing image or
  ``.npz`` inside an input folder, is refused, even with ``force``: ``finetune S.pt --checkpoint
  S.pt --force`` cannot turn the model into a checkpoint.
* **Regular files only.** A folder, a device node (``/dev/null``), a FIFO or a socket is refused
  even with ``force``; so is a name ending in ``/`` (``-o newdir/``).
* **Symbolic links.** A link to a regular file counts as that file: it is only replaced with
  ``force``, and then the file it points to is replaced (atomically, in that file's folder) and the
  link itself stays. A dangling link, a link loop, or a link to anything but a regular file is
  refused, with or without ``force``.
* **The umask is honoured**: a new file gets mode ``0o666 & ~umask``, like any program's output.
* **No debris.** An error, ``KeyboardInterrupt`` or a SIGTERM/SIGHUP while writing removes the
  temporary file (the signal then takes its usual course). A SIGKILL cannot be caught; the
  temporary files it leaves (``.NAME.<host>-<pid>-<random>.decompose-tmp``) are removed by the next
  write into that folder, but only those that are provably stale: this machine's name tag, owned
  by this user, a regular file, and a writer process that no longer exists (or that started after
  the file was last written, i.e. a reused process id).
* **One-line errors.** A full disk (``ENOSPC``/``EDQUOT``), a read-only file system, missing
  permission, a name too long and any other ``OSError`` become one :class:`DecomposeError` naming
  the path and what to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DecomposeError

TMP_SUFFIX = ".decompose-tmp"
NAME_MAX = 255      # bytes per path component, when the file system does not say
PATH_MAX = 4096     # bytes per path
_TMP_BASE_MAX = 100  # the target's name is cut to this many bytes inside a temporary name
_TMP_RE = re.compile(r"^\.(?P<base>.*)\.(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]+)-[0-9a-f]{8}"
                     + re.escape(TMP_SUFFIX) + r"$", re.DOTALL)

_protected: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar(
    "decompose_protected_inputs", default=())

# indirections, so that tests can inject faults (a full disk) without touching the os module
_os_write = os.write
_os_fsync = os.fsync


# ------------------------------------------------------------------------------- inputs
@contextlib.contextmanager
def protect_inputs(*paths: str | os.PathLike | None) -> Iterator[None]:
    """Inside the block no write may replace any of ``paths`` (files), nor an image or ``.npz``
    inside any of them (folders). Commands register their model, teacher and data paths here."""
    keep = tuple(Path(os.fspath(p)) for p in paths if p)
    token = _protected.set(_protected.get() + keep)
    try:
        yield
    finally:
        _protected.reset(token)


def protected_inputs() -> tuple[Path, ...]:
    """The paths registered by the enclosing :func:`protect_inputs` blocks."""
    return _protected.get()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


#: files inside an input folder that a command reads (images of a data folder, arrays)
DATA_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".npz")


def _clashes_with_input(final: Path, inputs: Iterable[Path]) -> Path | None:
    """The input that writing ``final`` would overwrite, if any: an input file itself (or a
    hard link to it), or an existing image or array inside an input folder."""
    target = _identity(final)
    real = os.path.realpath(final)
    for inp in inputs:
        ident = _identity(inp)
        if ident is None:
            continue
        if target is not None and ident == target:
            return inp
        if target is not None and os.path.isdir(inp) \
                and final.name.lower().endswith(DATA_SUFFIXES):
            root = os.path.realpath(inp)
            if os.path.commonpath([root, real]) == root:
                return inp
        if target is None and os.path.realpath(inp) == real:
            return inp
    return None


# ------------------------------------------------------------------------------- names
def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def check_name_length(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse a path with a component or a total length the file system cannot hold, with a
    one-line error instead of ``OSError: [Errno 36] File name too long``."""
    raw = os.fsencode(os.fspath(path))
    if len(raw) >= PATH_MAX:
        raise DecomposeError(f"the {what} path is {len(raw)} bytes long, more than the system "
                             f"allows ({PATH_MAX - 1}); choose a shorter path")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            shown = os.fsdecode(part)[:40]
            raise DecomposeError(f"the {what} name {shown}... is {len(part)} bytes long, more than "
                                 f"file names may be ({NAME_MAX}); choose a shorter name")


# ------------------------------------------------------------------------------- target
def _os_error(e: OSError, path: Any, doing: str = "write") -> DecomposeError:
    """One line for an OSError met while writing ``path``."""
    where = Path(os.fspath(path))
    folder = where.parent if str(where.parent) else Path(".")
    code = e.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return DecomposeError(f"cannot {doing} {where}: no space left on the device holding "
                              f"{folder} (disk full or quota reached); free some space there or "
                              "write somewhere else")
    if code == errno.EROFS:
        return DecomposeError(f"cannot {doing} {where}: {folder} is on a read-only file system; "
                              "write somewhere else")
    if code in (errno.EACCES, errno.EPERM):
        return DecomposeError(f"cannot {doing} {where}: permission denied; check the "
                              f"permissions of {folder} or write somewhere else")
    if code == errno.ENAMETOOLONG:
        return DecomposeError(f"cannot {doing} {where}: the name is too long for the file "
                              "system; choose a shorter name")
    if code == errno.EFBIG:
        return DecomposeError(f"cannot {doing} {where}: the file is larger than this file "
                              "system or its limits allow; write somewhere else")
    if code == errno.ELOOP:
        return DecomposeError(f"cannot {doing} {where}: too many levels of symbolic links; "
                              "check the path")
    return DecomposeError(f"cannot {doing} {where} ({e.strerror or type(e).__name__}); check the "
                          "path and the disk, or write somewhere else")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_target(path: str | os.PathLike, force: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), what: str = "output") -> Path:
    """Check that ``path`` may be written, before any work. Returns the file that will actually
    be replaced (``path`` itself, or the file a symbolic link ``path`` points to).

    Raises :class:`DecomposeError` for: an empty name or one ending in ``/``; a name too long;
    a folder, device, FIFO or socket; a dangling or looping symbolic link; an existing file
    without ``force``; one of the command's inputs; a missing or unwritable folder.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise DecomposeError(f"the {what} name is empty; give a file name")
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise DecomposeError(f"{what} {text} names a folder; give a file name, e.g. "
                             f"{text.rstrip('/' + (os.altsep or ''))}/model.pt")
    check_name_length(text, what)
    p = Path(text)
    try:
        st: os.stat_result | None = os.lstat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise DecomposeError(f"{what} {p}: a part of the folder path is a file, not a folder; "
                             "check the path") from None
    except OSError as e:
        raise _os_error(e, p, "write") from None
    final = p
    if st is not None and stat.S_ISLNK(st.st_mode):
        link = os.readlink(p)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DecomposeError(f"{what} {p} is a symbolic link to {link}, which does not exist; "
                                 "decompose does not create files through dangling links: remove "
                                 "the link or choose another name") from None
        except OSError as e:
            raise DecomposeError(f"{what} {p} is a symbolic link that cannot be followed "
                                 f"({e.strerror}); remove it or choose another name") from None
        if stat.S_ISREG(st.st_mode) and not force:
            raise DecomposeError(f"{what} {p} is a symbolic link to the existing file {link}; "
                                 "pass --force to replace that file (the link stays) or choose "
                                 "another name")
        final = Path(os.path.realpath(p))
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise DecomposeError(f"{what} {p} is a folder; give a file name, e.g. "
                                 f"{p / 'model.pt'}")
        if not stat.S_ISREG(st.st_mode):
            raise DecomposeError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file; "
                                 "decompose only replaces regular files, even with --force: "
                                 "choose another name")
        if not force:
            raise DecomposeError(f"{p} exists; pass --force to overwrite it or choose another "
                                 f"name")
    clash = _clashes_with_input(final, [*map(Path, map(os.fspath, inputs)), *_protected.get()])
    if clash is not None:
        read = f"a file in {clash}" if os.path.isdir(clash) else str(clash)
        raise DecomposeError(f"{what} {p} would overwrite {read}, which this command reads; "
                             "choose another name (refused even with --force)")
    parent = final.parent if str(final.parent) else Path(".")
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise DecomposeError(f"output folder {parent} does not exist; create it or choose "
                             "another name") from None
    except OSError as e:
        raise _os_error(e, final, "write") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise DecomposeError(f"{parent} is not a folder; check the {what} path")
    if not os.access(parent, os.W_OK):
        raise DecomposeError(f"cannot write to folder {parent} (read-only or no permission); "
                             "choose somewhere writable")
    return final


# ------------------------------------------------------------------------------- temporaries
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _temp_name(final: Path) -> str:
    base = os.fsdecode(os.fsencode(final.name)[:_TMP_BASE_MAX])  # bytes: names are limited so
    return f".{base}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(old)
    return old


def _process_started_after(pid: int, mtime: float) -> bool:
    """True when process ``pid`` provably started after ``mtime`` (Linux /proc; False when
    unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        started = btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return started > mtime + 2.0


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporary files of this writer in ``folder`` that a killed run left behind: this
    machine's tag, owned by this user, regular files, whose writer process is gone (or is a
    process that started after the file was last written)."""
    out = []
    host = _host_tag()
    uid = os.getuid() if hasattr(os, "getuid") else None
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        if not e.name.endswith(TMP_SUFFIX):
            continue
        m = _TMP_RE.match(e.name)
        if not m or m.group("host") != host:
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        pid = int(m.group("pid"))
        if not _alive(pid) or (pid != os.getpid() and _process_started_after(pid, st.st_mtime)):
            out.append(Path(e.path))
    return out


def clean_stale_temporaries(folder: str | os.PathLike) -> int:
    """Remove :func:`stale_temporaries` of ``folder``; returns how many were removed."""
    n = 0
    for p in stale_temporaries(folder):
        with contextlib.suppress(OSError):
            os.unlink(p)
            n += 1
    return n


class _Signalled(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While writing, SIGTERM and SIGHUP (when they would kill the process outright) raise
    instead, so that the temporary file is removed before the signal takes its course."""
    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            try:
                if signal.getsignal(sig) == signal.SIG_DFL:
                    installed[sig] = signal.signal(sig, _raise_signalled)
            except (ValueError, OSError):
                pass
    try:
        yield
    finally:
        for sig, old in installed.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, old)


def _raise_signalled(signum: int, frame: Any) -> None:
    raise _Signalled(signum)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        _os_fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _os_fsync(fd)
    finally:
        os.close(fd)


def _looks_like_disk_full(e: BaseException, folder: Path) -> bool:
    text = str(e)
    if "No space left" in text or "file write failed" in text or "ENOSPC" in text:
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 16)
    except OSError:
        return False


def _place(tmp: str, final: Path, force: bool, what: str) -> None:
    """Move the finished temporary file onto ``final``: no-clobber without ``force``."""
    if not force:
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise DecomposeError(f"{final} appeared while it was being written; pass --force to "
                                 "overwrite it or choose another name") from None
        except OSError:  # no hard links here (some network and FAT file systems)
            if os.path.lexists(final):
                raise DecomposeError(f"{final} appeared while it was being written; pass --force "
                                     "to overwrite it or choose another name") from None
            os.replace(tmp, final)
            return
        os.unlink(tmp)
        return
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):  # swapped for something else meanwhile
        raise DecomposeError(f"{what} {final} became {_kind(st.st_mode)} while it was being "
                             "written; nothing replaced")
    os.replace(tmp, final)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], force: bool = False,
                 inputs: Iterable[str | os.PathLike] = (), what: str = "output") -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside the target, then put it in place.

    ``write`` may open ``tmp_path`` by name (torch.onnx.export, matplotlib); the file exists,
    empty, when it is called. See the module docs for the rules. Returns ``path`` as given.

    Raises:
        DecomposeError: a refused target (see :func:`check_target`), a full disk or any other
            OSError while writing; nothing is left behind.
    """
    final = check_target(path, force, inputs, what)
    folder = final.parent if str(final.parent) else Path(".")
    clean_stale_temporaries(folder)
    tmp = str(folder / _temp_name(final))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise _os_error(e, final) from None
    os.close(fd)
    try:
        with _signals_raise():
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync_file(tmp)
            _place(tmp, final, force, what)
        _fsync_dir(folder)
    except _Signalled as s:
        _unlink(tmp)
        signal.signal(s.signum, signal.SIG_DFL)
        signal.raise_signal(s.signum)
        raise KeyboardInterrupt from None  # only reached if the signal was blocked
    except DecomposeError:
        _unlink(tmp)
        raise
    except OSError as e:
        _unlink(tmp)
        raise _os_error(e, final) from None
    except Exception as e:
        _unlink(tmp)
        if _looks_like_disk_full(e, folder):
            raise _os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), final) from None
        raise
    except BaseException:
        _unlink(tmp)
        raise
    return Path(os.fspath(path))


def _unlink(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _write_all(path: str, chunks: Iterable[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0))
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                n = _os_write(fd, view[: 1 << 20])
                view = view[n:]
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview,
                force: bool = False, inputs: Iterable[str | os.PathLike] = (),
                what: str = "output") -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: _write_all(tmp, [bytes(data) if isinstance(
        data, bytearray) else data]), force, inputs, what)


def write_text(path: str | os.PathLike, text: str, force: bool = False,
               inputs: Iterable[str | os.PathLike] = (), what: str = "output") -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return write_bytes(path, text.encode("utf-8"), force, inputs, what)


__all__ = ["TMP_SUFFIX", "atomic_write", "check_name_length", "check_target",
           "clean_stale_temporaries", "protect_inputs", "protected_inputs", "stale_temporaries",
           "write_bytes", "write_text"]
