"""The one writer (decompose.io.write): atomic, no overwrite without force, never an input, regular
files only, one symlink rule, the umask, no debris after errors and signals, stale temporaries of
killed runs removed by the next write, and one-line errors for full disks and odd paths."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from decompose import DecomposeError
from decompose.io import write as w
from decompose.io.write import (
    TMP_SUFFIX,
    atomic_write,
    clean_stale_temporaries,
    protect_inputs,
    stale_temporaries,
    write_bytes,
)

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX))


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and text, text
    return text


# ------------------------------------------------------------------------- basic rules
def test_write_is_atomic_and_never_overwrites_without_force(tmp_path):
    out = tmp_path / "o.bin"
    write_bytes(out, b"first")
    assert out.read_bytes() == b"first"
    with pytest.raises(DecomposeError, match="exists; pass --force") as e:
        write_bytes(out, b"second")
    one_line(e)
    assert out.read_bytes() == b"first"
    write_bytes(out, b"second", force=True)
    assert out.read_bytes() == b"second"
    assert temporaries(tmp_path) == []


def test_a_file_that_appears_while_writing_is_not_replaced(tmp_path):
    out = tmp_path / "o.bin"

    def write(tmp):
        Path(tmp).write_bytes(b"mine")
        out.write_bytes(b"someone else's")

    with pytest.raises(DecomposeError, match="appeared"):
        atomic_write(out, write)
    assert out.read_bytes() == b"someone else's"
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_umask_is_honoured(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = write_bytes(tmp_path / "o.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~mask


def test_errors_and_interrupts_leave_nothing_behind(tmp_path):
    out = tmp_path / "o.bin"
    out.write_bytes(b"precious")
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        def write(tmp, exc=exc):
            Path(tmp).write_bytes(b"partial")
            raise exc
        with pytest.raises(type(exc)):
            atomic_write(out, write, force=True)
        assert out.read_bytes() == b"precious"
        assert temporaries(tmp_path) == []


# ------------------------------------------------------------------------- odd targets
def test_folders_and_trailing_slashes_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    for target, match in ((tmp_path / "d", "is a folder"), (f"{tmp_path}/newdir/", "names a folder"),
                          ("", "empty")):
        with pytest.raises(DecomposeError, match=match) as e:
            write_bytes(target, b"x", force=True)
        one_line(e)
    assert not (tmp_path / "newdir").exists()


def test_fifo_and_device_targets_are_refused_even_with_force(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DecomposeError, match="FIFO.*even with --force"):
        write_bytes(fifo, b"x", force=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(DecomposeError, match="device.*even with --force"):
        write_bytes("/dev/null", b"x", force=True)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_symlink_rule(tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target.name)
    with pytest.raises(DecomposeError, match="symbolic link to the existing file"):
        write_bytes(link, b"new")
    assert target.read_bytes() == b"old"
    write_bytes(link, b"new", force=True)  # through the link: the file it points to is replaced
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_bytes() == b"new"

    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to("nowhere.bin")
    for force in (False, True):
        with pytest.raises(DecomposeError, match="does not exist"):
            write_bytes(dangling, b"x", force=force)
    assert not (tmp_path / "nowhere.bin").exists() and dangling.is_symlink()

    to_dev = tmp_path / "to_dev"
    to_dev.symlink_to("/dev/null")
    with pytest.raises(DecomposeError, match="device"):
        write_bytes(to_dev, b"x", force=True)
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(DecomposeError, match="cannot be followed"):
        write_bytes(loop, b"x", force=True)


def test_inputs_are_never_overwritten(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"the input")
    data = tmp_path / "data"
    (data / "cls").mkdir(parents=True)
    (data / "cls" / "a.png").write_bytes(b"image")
    hard = tmp_path / "hardlink.pt"
    os.link(model, hard)
    with protect_inputs(model, data):
        for target in (model, hard, data / "cls" / "a.png"):
            with pytest.raises(DecomposeError, match="which this command reads") as e:
                write_bytes(target, b"x", force=True)
            one_line(e)
        write_bytes(tmp_path / "other.pt", b"fine")  # anything else is written as usual
    assert model.read_bytes() == b"the input"
    assert (data / "cls" / "a.png").read_bytes() == b"image"
    with pytest.raises(DecomposeError, match="which this command reads"):
        write_bytes(model, b"x", force=True, inputs=[hard])  # explicit inputs too
    write_bytes(model, b"replaced", force=True)  # outside the block it is an ordinary file
    assert model.read_bytes() == b"replaced"


def test_names_too_long(tmp_path):
    with pytest.raises(DecomposeError, match="256 bytes long.*shorter name") as e:
        write_bytes(tmp_path / ("a" * 256), b"x")
    one_line(e)
    longest = tmp_path / ("b" * 255)  # the temporary name is shortened, the file keeps its name
    write_bytes(longest, b"x")
    assert longest.read_bytes() == b"x" and temporaries(tmp_path) == []
    wide = tmp_path / ("é" * 127)  # 254 bytes: shortened by bytes, not characters
    write_bytes(wide, b"y")
    assert wide.read_bytes() == b"y" and temporaries(tmp_path) == []
    deep = Path(*(["c" * 200] * 25))
    with pytest.raises(DecomposeError, match="longer than|bytes long"):
        write_bytes(tmp_path / deep, b"x")


def test_missing_folder_and_file_in_path(tmp_path):
    with pytest.raises(DecomposeError, match="does not exist"):
        write_bytes(tmp_path / "missing" / "o.bin", b"x")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(DecomposeError, match="is a file, not a folder|not a folder"):
        write_bytes(tmp_path / "f" / "o.bin", b"x")


# ------------------------------------------------------------------------- full disks
@pytest.mark.parametrize("where", ["_os_write", "_os_fsync"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, where, code):
    out = tmp_path / "o.bin"
    out.write_bytes(b"precious")

    def full(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(w, where, full)
    with pytest.raises(DecomposeError, match="no space left") as e:
        write_bytes(out, b"x" * 100_000, force=True)
    assert str(out) in one_line(e)
    assert out.read_bytes() == b"precious"
    assert temporaries(tmp_path) == []


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (root only); skips the test where mounting is not allowed."""
    path.mkdir()
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root; the patched-writer tests cover this case")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                         capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> None:
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()


def test_disk_full_on_a_real_tiny_file_system(tmp_path):
    with tmpfs(tmp_path / "full", "size=64k") as full:
        _fill(full)
        with pytest.raises(DecomposeError, match="no space left") as e:
            write_bytes(full / "o.bin", os.urandom(200_000))
        one_line(e)
        assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_read_only_folder(tmp_path):
    if IS_ROOT:  # root writes through permissions: use a read-only mount
        with tmpfs(tmp_path / "ro", "size=64k,ro") as ro:
            with pytest.raises(DecomposeError, match="cannot write to folder") as e:
                write_bytes(ro / "o.bin", b"x")
            one_line(e)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(DecomposeError, match="cannot write to folder"):
            write_bytes(ro / "o.bin", b"x")
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------------- signals
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from decompose.io.write import atomic_write
    def write(tmp):
        Path(tmp).write_bytes(b"x" * 100_000)
        Path(sys.argv[2]).write_text("ready")
        time.sleep(60)
    atomic_write(sys.argv[1], write)
""")


def _writer_until_ready(tmp_path: Path, out: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(ready)], env=env)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None, "the writer exited early"
        assert time.time() < deadline, "the writer never got going"
        time.sleep(0.05)
    return proc


def test_sigkill_during_a_write_then_the_next_run_leaves_nothing(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _writer_until_ready(tmp_path, out_dir / "model.pt")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = temporaries(out_dir)
    assert len(left) == 1 and left[0].startswith(".model.pt.")  # a kill cannot be caught ...
    assert stale_temporaries(out_dir) == [out_dir / left[0]]
    write_bytes(out_dir / "model.pt", b"second run")  # ... the next write cleans it up
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.pt"]


def test_sigterm_during_a_write_removes_the_temporary(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _writer_until_ready(tmp_path, out_dir / "model.pt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == -signal.SIGTERM  # the signal still ends the process
    assert list(out_dir.iterdir()) == []


def test_only_provably_stale_temporaries_of_this_writer_are_removed(tmp_path):
    host = w._host_tag()
    dead = _dead_pid()
    mine_stale = tmp_path / f".a.pt.{host}-{dead}-0123abcd{TMP_SUFFIX}"
    mine_live = tmp_path / f".b.pt.{host}-{os.getpid()}-0123abcd{TMP_SUFFIX}"
    parent_live = tmp_path / f".c.pt.{host}-{os.getppid()}-0123abcd{TMP_SUFFIX}"
    other_host = tmp_path / f".d.pt.ffffff-{dead}-0123abcd{TMP_SUFFIX}"
    if other_host.name.split(".")[-2].startswith(host):
        other_host = tmp_path / f".d.pt.eeeeee-{dead}-0123abcd{TMP_SUFFIX}"
    not_ours = tmp_path / f".e.pt.{host}-{dead}.tmp"
    for p in (mine_stale, mine_live, parent_live, other_host, not_ours):
        p.write_bytes(b"x")
    a_dir = tmp_path / f".f.pt.{host}-{dead}-0123abcd{TMP_SUFFIX}"
    a_dir.mkdir()
    a_link = tmp_path / f".g.pt.{host}-{dead}-0123abcd{TMP_SUFFIX}"
    a_link.symlink_to(mine_live.name)
    assert clean_stale_temporaries(tmp_path) == 1
    assert not mine_stale.exists()
    for p in (mine_live, parent_live, other_host, not_ours, a_dir, a_link):
        assert os.path.lexists(p), p


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
