"""Reading a ``torch.save`` file without running code from it, in bounded memory and time.

:func:`read_torch_file` is ``torch.load(weights_only=True)`` with these guards around it:

1. **The path** is checked before it is opened (:mod:`decompose.io.inputs`): FIFOs, devices,
   folders, missing files, names too long are one-line errors, never a hang.
2. **The container** is inspected before unpickling. A zip file (what ``torch.save`` writes) must
   parse, must not declare more content than ``4 x its size + 16 MiB`` (a zip bomb is refused
   unread), and every member's CRC-32 is verified, so a damaged file is an error instead of
   other weights. Anything else must start with the legacy ``torch.save`` magic number.
3. **Layers are restored, never called.** The allowlist (every ``torch.nn`` layer, decompose's
   own models, the classes passed with ``--allow``) is registered with the unpickler; each
   ``nn.Module`` class through a stand-in that creates an *uninitialised* instance when the file
   restores an object (pickle's NEWOBJ, what ``torch.save`` writes) but raises when the file tries
   to *call* the class (pickle's REDUCE), so a 549-byte file cannot make ``nn.Linear(100000,
   10000)`` allocate gigabytes. (Other allowed classes, e.g. an ``Enum``, are registered as they
   are: restoring them is a call.) Functions are only callable from a file when the user names
   them with ``--allow-function MODULE:NAME``.
4. **Memory is bounded.** On Linux the address space the load may add is capped (``RLIMIT_AS``)
   at ``256 MiB + 3 x the stored tensor bytes + 64 x the pickle bytes`` (legacy files:
   ``256 MiB + 64 x the file size``); ``DECOMPOSE_LOAD_LIMIT_MB`` raises the 256 MiB base (no cap
   once CUDA is initialised in the process: it maps address space of its own). A
   file that needs more is refused, whatever it is made of (``bytearray(10**10)``,
   ``torch.Tensor(10**5, 10**5)``, a lying storage size). A file of a few MB thus never takes
   more than about 0.5 GB. ``trust=True`` (``--trust``) runs the full unpickler with none of
   these limits.
5. **Errors are one line**: a refused global is named as refused (never with PyTorch's advice to
   set ``weights_only=False``), together with every other global the file needs and may not
   have (:func:`unallowed_globals`, read statically), as ``--allow`` flags for classes and
   ``--allow-function`` flags, apart, for functions; nesting too deep (``RecursionError``) and
   every other failure is "truncated or corrupt".
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
import re
import resource
import sys
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DecomposeError
from .inputs import open_input

ZIP_SLACK = 16 << 20
LOAD_BASE_BYTES = 256 << 20
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_REFUSED_MARK = "decompose-refused:"

#: modules whose callables would let a file run code; never offered for --allow
DANGEROUS_MODULES = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib",
    "runpy", "socket", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty",
    "multiprocessing", "io", "_io", "pathlib", "tempfile", "functools", "operator", "types",
    "inspect", "webbrowser", "urllib", "http", "requests", "shelve", "signal",
    "threading", "_thread", "asyncio", "select", "fcntl", "resource", "gc", "atexit",
    "torch._C", "torch.ops", "torch.hub", "torch.utils.cpp_extension", "numpy.lib",
})


#: tensor-op namespaces inside a dangerous module: functions that only compute on tensors
#: (``torch.nn.functional.gelu`` is ``torch._C._nn.gelu``, which transformers' GELUActivation
#: keeps as an attribute). Not allowed by default: hinted and allowed with --allow-function.
TENSOR_OP_MODULES = frozenset({"torch._C._nn", "torch._C._fft", "torch._C._linalg",
                               "torch._C._special"})


def _dangerous(module: str) -> bool:
    if module in TENSOR_OP_MODULES:
        return False
    return any(module == m or module.startswith(m + ".") for m in DANGEROUS_MODULES)


# ---------------------------------------------------------------------------- the allowlist
def _module_classes(mod: Any) -> list[type]:
    return [obj for obj in vars(mod).values()
            if inspect.isclass(obj) and issubclass(obj, nn.Module)]


def _torch_nn_classes() -> list[type]:
    out: set[type] = set()
    for name in dir(nn.modules):
        sub = getattr(nn.modules, name)
        if inspect.ismodule(sub):
            out.update(_module_classes(sub))
    out.update(_module_classes(nn))
    return sorted(out, key=lambda c: c.__module__ + c.__qualname__)


def _own_classes() -> list[type]:
    """nn.Module classes defined by this package (its model zoo and layers): trusted code."""
    import pkgutil

    from .. import models as zoo
    from ..methods import custom_modules
    out: list[type] = list(custom_modules())  # LowRankConv and the methods' helper modules
    for info in pkgutil.iter_modules(zoo.__path__):
        out += _module_classes(importlib.import_module(f"{zoo.__name__}.{info.name}"))
    return out


def _import(module: str, what: str) -> Any:
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", module or ""):
        raise DecomposeError(f"{what} {module!r} is not a module name; e.g. mypackage.models")
    try:
        return importlib.import_module(module)
    except DecomposeError:
        raise
    except (Exception, SystemExit) as e:  # ImportError, or the module failing on import
        raise DecomposeError(
            f"cannot import {what} {module!r} ({type(e).__name__}: {e}); check the name and that "
            f"it is on PYTHONPATH") from None


def _entry(entry: str, flag: str) -> tuple[str, str, Any]:
    mod_name, _, name = entry.partition(":")
    if _dangerous(mod_name):
        raise DecomposeError(f"{flag} {entry}: {mod_name} can run arbitrary code from a file; "
                             "refused")
    mod = _import(mod_name, "module")
    if not name:
        return mod_name, name, mod
    obj = mod
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise DecomposeError(f"{mod_name} has no {name!r}; check {flag} {entry}")
    return mod_name, name, obj


def allowed_classes(allow: Iterable[str] = ()) -> list[type]:
    """Classes the safe loader may rebuild: torch.nn, decompose.models, and ``allow`` entries.

    An entry is ``module`` (all nn.Module classes in it) or ``module:Class``. A ``module:name``
    that is not a class is refused (functions need ``--allow-function``).
    """
    classes: list[type] = list(_torch_nn_classes())
    classes += _own_classes()
    for entry in allow:
        mod_name, name, obj = _entry(entry, "--allow")
        if not name:
            classes += _module_classes(obj)
        elif inspect.isclass(obj):
            classes.append(obj)
        else:
            raise DecomposeError(
                f"--allow {entry}: {name} is a {type(obj).__name__}, not a class; --allow only "
                f"lets the loader rebuild classes. If the file must call it and you trust it, "
                f"pass --allow-function {entry}")
    return classes


def allowed_functions(allow_functions: Iterable[str] = ()) -> list[Any]:
    """Callables a file may call (``--allow-function module:name``), checked."""
    out = []
    for entry in allow_functions:
        mod_name, name, obj = _entry(entry, "--allow-function")
        if not name or not callable(obj):
            raise DecomposeError(f"--allow-function takes module:function, got {entry!r}")
        out.append(obj)
    return out


def allowlist(allow: Iterable[str] = ()) -> list[Any]:
    """Kept for scripts: the classes of :func:`allowed_classes`."""
    return allowed_classes(allow)


class _NoCall(type):
    """Metaclass of the stand-ins: calling one (pickle REDUCE) is refused."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            f"{_REFUSED_MARK} {cls._decompose_name} (the file calls this class's constructor with "
            "arguments instead of restoring an object)")


def _stand_in(c: type) -> type:
    """A class that, used by NEWOBJ, returns an uninitialised ``c`` and refuses to be called."""
    target_new = c.__new__

    def __new__(cls, *args: Any) -> Any:
        if target_new is object.__new__:
            return object.__new__(c)
        return target_new(c, *args)

    return _NoCall(c.__name__, (), {"__new__": __new__, "_decompose_name":
                                    f"{c.__module__}.{c.__qualname__}"})


def _tuple_globals_supported() -> bool:
    """torch >= 2.6 accepts (object, "module.name") pairs in safe_globals."""
    try:
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (2, 6)


def safe_globals(classes: Iterable[type] = (), functions: Iterable[Any] = ()) -> list[Any]:
    """What :func:`torch.serialization.safe_globals` gets: a stand-in under each class's name,
    the class itself under a name no file can spell (so that BUILD accepts its instances), and
    the functions as they are."""
    out: list[Any] = []
    tuples = _tuple_globals_supported()
    for c in dict.fromkeys(classes):
        name = f"{c.__module__}.{c.__qualname__}"
        if tuples and issubclass(c, nn.Module):  # other classes (an Enum) may be restored by a call
            out.append((_stand_in(c), name))
            out.append((c, "\n" + name))  # a GLOBAL opcode's names never hold a newline
        else:
            out.append(c)
    out += list(functions)
    return out


# ---------------------------------------------------------------------------- the container
def _inspect(f: Any, path: Path, size: int) -> tuple[str, int, int]:
    """('zip' | 'legacy', tensor bytes, pickle bytes) after the checks of the module docs."""
    head = f.read(len(LEGACY_MAGIC))
    f.seek(0)
    if size == 0:
        raise DecomposeError(f"{path} is empty (0 bytes); write the file again with torch.save")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return ("zip", *_inspect_zip(f, path, size))
    if head == LEGACY_MAGIC:
        return "legacy", 0, size
    if head[:2] == b"PK" or (len(head) < len(LEGACY_MAGIC) and LEGACY_MAGIC.startswith(head)):
        raise DecomposeError(f"{path} is truncated or corrupt ({size} bytes); write the file "
                             "again with torch.save")
    raise DecomposeError(f"{path} is not a PyTorch file (it does not start like a file "
                         "torch.save writes); give a model saved with torch.save")


def _inspect_zip(f: Any, path: Path, size: int) -> tuple[int, int]:
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            NotImplementedError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
        raise DecomposeError(f"{path} is truncated or corrupt ({_short(e)}); write the file "
                             "again with torch.save") from None
    declared = sum(max(i.file_size, 0) for i in infos)
    limit = 4 * size + ZIP_SLACK
    if declared > limit or len(infos) > size:
        raise DecomposeError(
            f"refused {path}: it declares {declared / 2**20:.0f} MiB of content in a "
            f"{size / 2**20:.1f} MiB file (at most {limit / 2**20:.0f} MiB allowed): a zip bomb "
            "or a damaged file; torch.save never writes one")
    pickle_bytes = sum(i.file_size for i in infos if i.filename.endswith(".pkl"))
    try:
        for i in infos:
            if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise DecomposeError(f"{path} uses zip compression method {i.compress_type}, "
                                     "which torch.load cannot read; write it again with "
                                     "torch.save")
            if i.CRC == 0 and i.file_size:
                continue  # written without checksums (torch.serialization.set_crc32_options)
            with zf.open(i) as member:
                while member.read(1 << 20):
                    pass
    except DecomposeError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, IndexError,
            KeyError, OverflowError, UnicodeDecodeError, RuntimeError) as e:
        why = _short(e)
        if "CRC" in why:
            why = f"the checksum of {why.rsplit(' ', 1)[-1]} does not match its content"
        raise DecomposeError(f"{path} is corrupt ({why}); write the file again with "
                             "torch.save") from None
    return declared - pickle_bytes, pickle_bytes


# ---------------------------------------------------------------------------- memory
def _vm_size() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def load_budget(kind: str, tensor_bytes: int, pickle_bytes: int) -> int:
    """Bytes of address space a load may add (see the module docs)."""
    base = LOAD_BASE_BYTES
    env = os.environ.get("DECOMPOSE_LOAD_LIMIT_MB")
    if env:
        with contextlib.suppress(ValueError):
            base = max(base, int(float(env) * 2**20))
    return base + 3 * tensor_bytes + 64 * pickle_bytes


def _cuda_initialized() -> bool:
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - no CUDA build: not initialised
        return False


class _OverBudget(Exception):
    pass


@contextlib.contextmanager
def memory_bound(extra: int) -> Iterator[None]:
    """Cap this process's address space at its current size + ``extra`` bytes (Linux only; a
    no-op elsewhere) for the duration of the block."""
    vm = _vm_size() if sys.platform.startswith("linux") else None
    if vm is None or _cuda_initialized():
        yield  # CUDA maps address space of its own at any time: no cap then
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = vm + extra
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft <= want:
        yield  # already capped at least as tightly
        return
    try:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    except MemoryError:
        raise _OverBudget() from None
    except RuntimeError as e:
        if "allocate" in str(e):
            raise _OverBudget() from None
        raise
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ---------------------------------------------------------------------------- messages
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_BLOCKED = re.compile(r"unsupported GLOBAL ([\w.]+) whose module")
_REDUCE = re.compile(r"call reduce for unrecognized function (.+?)(?: which belongs|$)", re.M)
_NEWOBJ = re.compile(r"Can only create new object .* but got (.+)$", re.M)
_BUILD = re.compile(r"Can only build .* but got (.+)$", re.M)


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and "weights_only" not in ln and "Weights only load failed" not in ln
             and "add_safe_globals" not in ln]
    text = lines[0] if lines else type(e).__name__
    return text[:200]


def _inner(msg: str) -> str:
    """PyTorch's own reason, without its advice text."""
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1]
    return msg.split("Check the documentation of torch.load")[0].strip()


def refused(path: Path, name: str, why: str = "") -> DecomposeError:
    """The message for a file that asks for ``name``, which the safe loader does not allow."""
    return _refusal(path, [_split(name)], why)


def _split(name: str) -> tuple[str, str]:
    """``module.Name`` as PyTorch reports it -> (module, name); builtins come without module."""
    if "." not in name:
        return "builtins", name
    mod, _, attr = name.rpartition(".")
    return mod, attr


#: standard modules whose import alone does something visible; never imported to classify
_IMPORT_EFFECTS = frozenset({"antigravity", "this", "__hello__", "__phello__", "idlelib",
                             "turtle", "turtledemo", "tkinter"})
_MAX_HINTS = 30


def _kind(module: str, name: str) -> tuple[str, str]:
    """What ``module.name`` is, for the hint: ("dangerous" | "class" | "function" | "missing" |
    "other", the ``MODULE:NAME`` to pass).

    Telling a class from a function needs the object, so the module is imported, as ``--allow``
    itself would: this runs code installed here, never code from the file. Modules that can run
    arbitrary code (:data:`DANGEROUS_MODULES`) and standard modules whose import has visible
    effects are never imported.
    """
    if _dangerous(module):
        return "dangerous", f"{module}:{name}"
    top = module.split(".")[0]
    # a GLOBAL whose qualified name is split wrongly (PyTorch reports "a.b.Outer.Inner"): the
    # module is the longest importable prefix
    parts = (module + "." + name).split(".")
    if top in _IMPORT_EFFECTS or not all(re.fullmatch(r"[A-Za-z_]\w*", x) for x in parts):
        return "missing", f"{module}:{name}"
    for cut in range(len(parts) - 1, 0, -1):
        mod_name, attr = ".".join(parts[:cut]), parts[cut:]
        if _dangerous(mod_name):
            return "dangerous", f"{mod_name}:{'.'.join(attr)}"
        try:
            obj: Any = importlib.import_module(mod_name)
        except (Exception, SystemExit):
            continue
        for a in attr:
            obj = getattr(obj, a, None)
        entry = f"{mod_name}:{'.'.join(attr)}"
        if obj is None:
            return "missing", entry
        if inspect.isclass(obj):
            return "class", entry
        return ("function" if callable(obj) else "other"), entry
    return "missing", f"{module}:{name}"


def _refusal(path: Path, names: list[tuple[str, str]], why: str = "") -> DecomposeError:
    """One line for every global the file needs and may not have: ``--allow`` for classes,
    ``--allow-function`` for callables (named apart), what cannot be found here, and for a
    global of a module that can run code, only the advice not to load the file."""
    names = list(dict.fromkeys(names))
    kinds = [(f"{m}.{n}", *_kind(m, n)) for m, n in names]
    bad = [full for full, kind, _ in kinds if kind == "dangerous"]
    if bad:
        return DecomposeError(
            f"refused {path}: it asks for {', '.join(bad[:5])}, which the safe loader does not "
            f"allow{why}; it would run code on loading: do not load this file (its author meant "
            "it to run code here)")
    what = (f"it asks for {kinds[0][0]}, which the safe loader does not allow" if len(kinds) == 1
            else f"it asks for {len(kinds)} globals the safe loader does not allow "
                 f"({', '.join(full for full, _, _ in kinds[:_MAX_HINTS])}"
                 f"{', ...' if len(kinds) > _MAX_HINTS else ''})")
    by = {k: [entry for _, kind, entry in kinds if kind == k]
          for k in ("class", "function", "missing", "other")}
    hints = []
    if by["class"]:
        hints.append("if you trust this file, pass " + " ".join(
            f"--allow {e}" for e in by["class"][:_MAX_HINTS]))
    if by["function"]:
        hints.append(f"for the function{'s' if len(by['function']) > 1 else ''} it names, "
                     "only if you trust its author, also pass " + " ".join(
                         f"--allow-function {e}" for e in by["function"][:_MAX_HINTS]))
    if by["missing"]:
        hints.append("not importable here (install or put on PYTHONPATH the code that defines "
                     f"them, then pass --allow for classes): {', '.join(by['missing'][:10])}")
    if by["other"]:
        hints.append("not a class nor a function, which no flag allows: "
                     + ", ".join(by["other"][:10]))
    more = len(kinds) - _MAX_HINTS
    if more > 0:
        hints.append(f"{more} more not listed")
    return DecomposeError(f"refused {path}: {what}{why}; " + "; ".join(hints))


# ---------------------------------------------------------------------------- every global
def _pickle_globals(f: Any, kind: str) -> list[tuple[str, str]] | None:
    """Every (module, name) the pickle in ``f`` names with GLOBAL, in order, read statically
    (nothing is unpickled); None when the file cannot be read this way."""
    import io
    import pickletools
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
    try:
        f.seek(0)
        if kind == "zip":
            with zipfile.ZipFile(f) as zf:
                pkl = [i for i in zf.infolist() if i.filename.endswith("/data.pkl")
                       or i.filename == "data.pkl"]
                if len(pkl) != 1:
                    return None
                streams = [io.BytesIO(zf.read(pkl[0]))]
                count = 1
        else:  # legacy: magic, protocol, sys_info, the object, storage keys; then raw bytes
            streams, count = [f], 5
        out: list[tuple[str, str]] = []
        for stream in streams:
            for _ in range(count):
                for op, arg, _pos in pickletools.genops(stream):
                    if op.name == "GLOBAL" and isinstance(arg, str) and " " in arg:
                        mod, name = arg.split(" ", 1)
                        # Python 2 names (protocol 2: __builtin__.set), as PyTorch maps them
                        if (mod, name) in NAME_MAPPING:
                            mod, name = NAME_MAPPING[(mod, name)]
                        elif mod in IMPORT_MAPPING:
                            mod = IMPORT_MAPPING[mod]
                        out.append((mod, name))
        return list(dict.fromkeys(out))
    except Exception:  # noqa: BLE001 - a file this cannot parse: the first refusal is named
        return None
    finally:
        with contextlib.suppress(Exception):
            f.seek(0)


def _allowed_names(allowed: list[Any]) -> set[str] | None:
    """Global names the weights-only unpickler accepts: PyTorch's defaults and ``allowed``
    (what :func:`safe_globals` registered)."""
    try:
        from torch import _weights_only_unpickler as wou
        names = set(wou._get_allowed_globals())
    except Exception:  # noqa: BLE001 - another PyTorch: the first refusal is named
        return None
    for g in allowed:
        if isinstance(g, tuple):
            names.add(g[1])
        else:
            names.add(f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}")
            names.add(f"{getattr(g, '__module__', '')}.{getattr(g, '__name__', '')}")
    return names


def unallowed_globals(f: Any, kind: str, allowed: list[Any]) -> list[tuple[str, str]] | None:
    """Every global of the file that ``allowed`` (a :func:`safe_globals` list) does not cover,
    as (module, name), in the order the file names them; None when it cannot be told.

    For zip files the set is :func:`torch.serialization.get_unsafe_globals_in_checkpoint`
    (PyTorch >= 2.5), which reads the pickle statically but joins module and name with a dot;
    the split comes from reading the GLOBAL opcodes here, which also covers legacy files.
    """
    found = _pickle_globals(f, kind)
    if found is None:
        return None
    unsafe: set[str] | None = None
    if kind == "zip" and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        try:
            f.seek(0)
            with torch.serialization.safe_globals(allowed):
                unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        except Exception:  # noqa: BLE001 - fall back to the allowlist itself
            unsafe = None
        finally:
            with contextlib.suppress(Exception):
                f.seek(0)
    if unsafe is None:
        names = _allowed_names(allowed)
        if names is None:
            return None
        return [(m, n) for m, n in found if f"{m}.{n}" not in names]
    return [(m, n) for m, n in found if f"{m}.{n}" in unsafe]


def _classify(path: Path, e: BaseException,
              everything: list[tuple[str, str]] | None = None) -> DecomposeError:
    """The one-line error for a failed weights-only load; ``everything``: the file's globals
    the loader does not allow (:func:`unallowed_globals`), listed at once when known."""
    msg = str(e)
    inner = _inner(msg)
    if _REFUSED_MARK in msg:
        name = msg.split(_REFUSED_MARK, 1)[1].strip().split(" ", 1)[0]
        return DecomposeError(f"refused {path}: it calls the constructor of {name} with arguments "
                              "of its own instead of restoring a saved object (how a small file "
                              "can allocate gigabytes); torch.save never writes that")
    for pattern in (_UNSUPPORTED, _BLOCKED):
        m = pattern.search(msg)
        if m:
            first = _split(m.group(1))
            names = [first] + [g for g in (everything or []) if g != first]
            return _refusal(path, names)
    for pattern, what in ((_REDUCE, "call"), (_NEWOBJ, "create"), (_BUILD, "build")):
        m = pattern.search(inner)
        if m:
            return DecomposeError(f"refused {path}: it tries to {what} "
                                  f"{m.group(1).strip()[:120]}, which the safe loader does not "
                                  "allow; torch.save never writes that")
    if "persistent_load" in inner:
        return DecomposeError(f"refused {path}: it refers to data that is not a tensor storage; "
                              "torch.save never writes that")
    if "TorchScript" in msg:
        return DecomposeError(f"{path} is a TorchScript archive (torch.jit.save), not a model "
                              "saved with torch.save; decompose the model it was exported from")
    if isinstance(e, RecursionError):
        return DecomposeError(f"{path} is nested too deeply to be a model file; refused")
    return DecomposeError(f"{path} is truncated or corrupt ({_short(Exception(inner)) if inner else type(e).__name__}); "
                          "write the file again with torch.save")


# ---------------------------------------------------------------------------- reading
def read_torch_file(path: str | os.PathLike, *, classes: Iterable[type] = (),
                    functions: Iterable[Any] = (), trust: bool = False,
                    what: str = "model file") -> Any:
    """``torch.load`` of ``path`` on the CPU with the guards of the module docs.

    ``classes``: classes the file may restore (see :func:`allowed_classes`); ``functions``:
    callables it may call. Raises a one-line :class:`DecomposeError` for anything else.
    """
    p = Path(os.fspath(path))
    with open_input(p, what) as f:
        size = os.fstat(f.fileno()).st_size
        kind, tensor_bytes, pickle_bytes = _inspect(f, p, size)
        f.seek(0)
        if trust:
            try:
                return torch.load(f, map_location="cpu", weights_only=False)
            except DecomposeError:
                raise
            except (Exception, SystemExit) as e:
                raise DecomposeError(f"{p} could not be loaded ({type(e).__name__}: "
                                     f"{_short(e)})") from None
        budget = load_budget(kind, tensor_bytes, pickle_bytes)
        allowed = safe_globals(classes, functions)
        try:
            with torch.serialization.safe_globals(allowed), \
                    memory_bound(budget), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes about the file: errors say it
                return torch.load(f, map_location="cpu", weights_only=True)
        except DecomposeError:
            raise
        except _OverBudget:
            raise DecomposeError(
                f"refused {p}: loading it needs more than {budget / 2**20:.0f} MiB of memory, "
                f"far more than a {size / 2**20:.1f} MiB file of weights can hold; a hostile or "
                "damaged file (DECOMPOSE_LOAD_LIMIT_MB raises the limit)") from None
        except (Exception, SystemExit) as e:
            everything = None
            if _UNSUPPORTED.search(str(e)) or _BLOCKED.search(str(e)):
                everything = unallowed_globals(f, kind, allowed)
            raise _classify(p, e, everything) from None


__all__ = ["DANGEROUS_MODULES", "TENSOR_OP_MODULES", "allowed_classes", "allowed_functions", "allowlist",
           "load_budget", "memory_bound", "read_torch_file", "refused", "safe_globals",
           "unallowed_globals"]
