"""Loading model files without running code from them, and writing results atomically.

* ``torch.load(..., weights_only=True)`` with an allowlist: every ``nn.Module`` class of
  ``torch.nn``, the classes of ``decompose.models``, and the classes of modules the user names
  (``--allow MODULE`` / ``--arch MODULE:FN``). Anything else is refused with the class name and
  the flag that allows it. ``trust=True`` (``--trust``) uses the full unpickler: only for files
  the user made.
* Outputs are written to a temporary file in the target folder and renamed into place, so a
  crash never leaves a partial file, and an existing file is only replaced with ``force=True``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pickle
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DecomposeError

FORMAT = "decompose"
#: 2: factorized layers are LowRankConv modules (any method); 1: bare nn.Sequential ND layers,
#: upgraded to LowRankConv when read
FORMAT_VERSION = 2
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


@dataclass
class Loaded:
    """A model read from a file, with what the file said about itself."""

    model: nn.Module
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "module"  # "module", "decomposed" or "checkpoint"


# -------------------------------------------------------------------------------- allowlist
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
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError, or the module failing on import
        raise DecomposeError(
            f"cannot import {what} {module!r} ({type(e).__name__}: {e}); check the name and that "
            f"it is on PYTHONPATH") from None


def allowlist(allow: Iterable[str] = ()) -> list[Any]:
    """Classes the safe loader may rebuild: torch.nn, decompose.models, and ``allow`` entries.

    An entry is ``module`` (all nn.Module classes in it) or ``module:Class``.
    """
    classes: list[Any] = list(_torch_nn_classes())
    classes += _own_classes()
    for entry in allow:
        mod_name, _, cls_name = entry.partition(":")
        mod = _import(mod_name, "module")
        if cls_name:
            obj = getattr(mod, cls_name, None)
            if obj is None:
                raise DecomposeError(f"{mod_name} has no {cls_name!r}; check --allow {entry}")
            classes.append(obj)
        else:
            classes += _module_classes(mod)
    return classes


_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _refused(path: Path, err: Exception) -> DecomposeError:
    m = _UNSUPPORTED.search(str(err))
    if m:
        name = m.group(1)
        mod = name.rsplit(".", 1)[0]
        return DecomposeError(
            f"{path} wants to build {name}, which is not on the safe-load allowlist; if you trust "
            f"that code pass --allow {mod} (or --trust if you made this file yourself)")
    first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return DecomposeError(f"{path} could not be loaded safely ({first}); pass --trust only if "
                          "you made this file yourself")


# -------------------------------------------------------------------------------- reading
def _read(path: Path, allow: Iterable[str], trust: bool) -> Any:
    if not path.exists():
        raise DecomposeError(f"file not found: {path}; check the path")
    if path.is_dir():
        raise DecomposeError(f"{path} is a folder; give the model file inside it")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(allowlist(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except DecomposeError:
        raise
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise _refused(path, e) from None
        raise DecomposeError(f"{path} is not a PyTorch model file or is corrupt ({_short(e)}); "
                             "save models with torch.save") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, TypeError) as e:
        msg = str(e)
        if "PytorchStreamReader" in msg or "zip archive" in msg or isinstance(e, EOFError):
            raise DecomposeError(f"{path} is truncated or corrupt ({_short(e)}); "
                                 "write the file again with torch.save") from None
        if isinstance(e, PermissionError):
            raise DecomposeError(f"cannot read {path}: permission denied; check its "
                                 "permissions") from None
        if isinstance(e, OSError):
            raise DecomposeError(f"{path} is truncated or corrupt ({_short(e)}); "
                                 "write the file again with torch.save") from None
        raise DecomposeError(f"{path} is not a PyTorch model file or is corrupt ({_short(e)}); "
                             "save models with torch.save") from None


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text[:200]


def parse_arch(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``module:callable`` or ``module:callable(key=literal, ...)`` -> (module, name, kwargs)."""
    m = re.fullmatch(r"\s*([\w.]+):(\w+)\s*(?:\((.*)\))?\s*", spec)
    if not m:
        raise DecomposeError(f"--arch must look like module:function, e.g. "
                             f"decompose.models.cifar_resnet:resnet20, got {spec!r}")
    kwargs: dict[str, Any] = {}
    if m.group(3) and m.group(3).strip():
        try:
            call = ast.parse(f"f({m.group(3)})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except Exception:
            raise DecomposeError(f"--arch arguments must be key=value literals, got {spec!r}") from None
    return m.group(1), m.group(2), kwargs


def build_arch(spec: str) -> nn.Module:
    """Call the builder named by ``--arch`` and check that it returns an nn.Module."""
    mod_name, fn_name, kwargs = parse_arch(spec)
    mod = _import(mod_name, "--arch module")
    try:
        fn = getattr(mod, fn_name)
    except AttributeError:
        raise DecomposeError(f"--arch: module {mod_name} has no {fn_name!r}") from None
    try:
        model = fn(**kwargs)
    except DecomposeError:
        raise
    except Exception as e:
        raise DecomposeError(f"--arch {spec} failed to build the model ({type(e).__name__}: "
                             f"{_short(e)})") from None
    if not isinstance(model, nn.Module):
        raise DecomposeError(f"--arch {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _find_state_dict(obj: dict) -> dict[str, torch.Tensor] | None:
    if obj and all(isinstance(k, str) for k in obj) and all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict):
            found = _find_state_dict(inner)
            if found is not None:
                return found
    return None


def _strip_prefix(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    wanted = set(model.state_dict())
    for prefix in ("module.", "model.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd) and not set(sd) <= wanted:
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def state_dict_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str | None:
    """How ``sd`` differs from a model's own state_dict ``own`` (keys and shapes), or None."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
    if bad_shape:
        k = bad_shape[0]
        parts.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: file "
                     f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
    return "; ".join(parts) or None


def load_state_into(model: nn.Module, sd: dict[str, torch.Tensor], spec: str, path: Path) -> None:
    sd = _strip_prefix(sd, model)
    own = model.state_dict()
    # BatchNorm's step counter is absent from checkpoints saved before PyTorch 0.4.1 (the
    # shipped CIFAR ResNets among them); it only matters for momentum=None, so keep the model's.
    sd = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in sd},
          **sd}
    mismatch = state_dict_mismatch(own, sd)
    if mismatch:
        raise DecomposeError(f"{path} does not match --arch {spec}: {mismatch}; "
                             "pass the --arch that built this checkpoint")
    model.load_state_dict(sd, strict=True)


def load_model(path: str | os.PathLike, arch: str | None = None, allow: Iterable[str] = (),
               trust: bool = False) -> Loaded:
    """Read a model file safely.

    Accepts a pickled ``nn.Module`` (``torch.save(model)``), a file written by decompose, or a
    checkpoint / state_dict together with ``arch`` (``module:function`` that builds the model;
    ``state_dict`` and similar wrapper keys and a ``module.`` prefix are handled; CUDA tensors are
    loaded on the CPU).

    Args:
        path: the file.
        arch: builder for checkpoints, e.g. ``"decompose.models.cifar_resnet:resnet20"``.
        allow: extra modules (``"pkg.mod"``) or classes (``"pkg.mod:Class"``) the safe loader may
            rebuild. The module of ``arch`` is allowed too.
        trust: use the full unpickler (runs code from the file). Default False.
    """
    p = Path(path)
    allow = list(allow)
    if arch:
        allow.append(parse_arch(arch)[0])
    obj = _read(p, allow, trust)
    if isinstance(obj, nn.Module):
        return Loaded(obj, p, {}, "module")
    if isinstance(obj, dict) and obj.get("format") == FORMAT and isinstance(obj.get("model"), nn.Module):
        version = obj.get("version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DecomposeError(f"{p} was written by a newer decompose (format version "
                                 f"{version!r}, this one reads up to {FORMAT_VERSION}); upgrade "
                                 "decompose to load it")
        model = obj["model"]
        if version < 2:
            model = upgrade_legacy_layers(model)
        return Loaded(model, p, dict(obj.get("meta") or {}), "decomposed")
    if isinstance(obj, dict):
        sd = _find_state_dict(obj)
        if sd is None:
            for key in STATE_DICT_KEYS:
                if isinstance(obj.get(key), nn.Module):
                    return Loaded(obj[key], p, {}, "module")
            raise DecomposeError(f"{p} holds a dict with keys {sorted(map(str, obj))[:6]} but no "
                                 "model or state_dict; save the model with torch.save(model)")
        if not arch:
            raise DecomposeError(f"{p} is a checkpoint (weights only, no architecture); pass "
                                 "--arch module:function that builds the model, e.g. --arch "
                                 "decompose.models.cifar_resnet:resnet20")
        model = build_arch(arch)
        load_state_into(model, sd, arch, p)
        meta = {"arch": arch}
        return Loaded(model, p, meta, "checkpoint")
    raise DecomposeError(f"{p} holds a {type(obj).__name__}, not a model; save the model with "
                         "torch.save(model) or its state_dict with --arch")


def upgrade_legacy_layers(model: nn.Module) -> nn.Module:
    """Turn the bare ``nn.Sequential`` decoupled layers of a format-1 file into LowRankConv
    modules with the same parameters (the same function)."""
    from ..methods.nd.layers import upgrade_legacy
    new = upgrade_legacy(model)
    if new is not None:
        return new
    for name, m in list(model.named_modules()):
        up = upgrade_legacy(m) if name else None
        if up is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, up)
    return model


def load(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a model (see :func:`load_model` for the arguments) and return only the module."""
    return load_model(path, **kwargs).model


# -------------------------------------------------------------------------------- writing
def default_output(path: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.decomposed.pt`` next to the input."""
    p = Path(path)
    return p.with_name(f"{p.stem}.decomposed{p.suffix or '.pt'}")


def check_writable(out: str | os.PathLike, force: bool = False) -> Path:
    """Fail early (before any work) if ``out`` exists without ``force`` or cannot be written."""
    o = Path(out)
    if o.exists() and o.is_dir():
        raise DecomposeError(f"output {o} is a folder; give a file name, e.g. {o / 'model.pt'}")
    if o.exists() and not force:
        raise DecomposeError(f"{o} exists; pass --force to overwrite it or choose --output")
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.is_dir():
        raise DecomposeError(f"output folder {parent} does not exist; create it or choose --output")
    if not os.access(parent, os.W_OK):
        raise DecomposeError(f"cannot write to folder {parent}; choose --output somewhere writable")
    return o


def atomic_write(out: str | os.PathLike, write: Any, force: bool = False) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``out``."""
    o = check_writable(out, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{o.name}.", suffix=".tmp", dir=o.parent)
    os.close(fd)
    try:
        write(tmp)
        if o.exists() and not force:  # appeared meanwhile
            raise DecomposeError(f"{o} exists; pass --force to overwrite it or choose --output")
        os.replace(tmp, o)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return o


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None,
               force: bool = False) -> Path:
    """Write ``model`` (whole module) plus ``meta`` (JSON-like) atomically; see :func:`load_model`."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "model": model,
               "meta": dict(meta or {})}
    try:
        return atomic_write(path, lambda tmp: torch.save(payload, tmp), force)
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise DecomposeError(f"cannot save this model ({_short(e)}); models with lambdas or local "
                             "classes cannot be pickled") from None


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))
