"""Loading model files without running code from them, and writing results atomically.

* Reading: :func:`decompose.io.safeload.read_torch_file`, i.e. ``torch.load(weights_only=True)``
  with an allowlist (every ``nn.Module`` class of ``torch.nn``, the classes of
  ``decompose.models``, and the classes the user names with ``--allow MODULE[:CLASS]`` /
  ``--arch MODULE:FN``; functions only with ``--allow-function MODULE:NAME``), the path checked
  before it is opened, the container checked (CRC-32, zip bombs) and memory bounded. Anything
  else is refused with the name of what the file asked for. ``trust=True`` (``--trust``) uses
  the full unpickler: only for files the user made.
* A decompose file is ``{"format": "decompose", "version": N, "model": module, "meta": {...},
  "checksum": {"algorithm": "sha256", "digest": ...}}``; a newer version than this code knows,
  malformed metadata or a checksum that does not match is an error (files without a checksum,
  written before it existed, load as "unverified").
* Writing: :mod:`decompose.io.write` (atomic, never over an existing file without ``force``,
  never over the command's inputs, regular files only).
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DecomposeError
from .checksum import ALGORITHM, model_digest
from .safeload import (
    _import,
    _short,
    allowed_classes,
    allowed_functions,
    allowlist,
    read_torch_file,
)
from .write import atomic_write, check_target, write_bytes

FORMAT = "decompose"
#: 2: factorized layers are LowRankConv modules (any method); 1: bare nn.Sequential ND layers,
#: upgraded to LowRankConv when read
FORMAT_VERSION = 2
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
MAX_MODULE_DEPTH = 200
MAX_META_DEPTH = 50
MAX_SHAPE_SIDE = 1 << 20


@dataclass
class Loaded:
    """A model read from a file, with what the file said about itself.

    ``checksum``: ``"verified"`` (a decompose file whose stored checksum matched),
    ``"unverified"`` (a decompose file written before checksums existed) or ``"none"`` (not a
    decompose file)."""

    model: nn.Module
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "module"  # "module", "decomposed" or "checkpoint"
    checksum: str = "none"


# -------------------------------------------------------------------------------- reading
def _read(path: Path, allow: Iterable[str], trust: bool, allow_functions: Iterable[str] = (),
          what: str = "model file") -> Any:
    if trust:
        return read_torch_file(path, trust=True, what=what)
    return read_torch_file(path, classes=allowed_classes(allow),
                           functions=allowed_functions(allow_functions), what=what)


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
    """Call the builder named by ``--arch`` and check that it returns an nn.Module.

    ``--arch MODULE:FN(key=literal, ...)`` imports MODULE (running its code) and calls FN with the
    literal keyword arguments: any callable of an importable module, so only name code you trust.
    """
    mod_name, fn_name, kwargs = parse_arch(spec)
    mod = _import(mod_name, "--arch module")
    try:
        fn = getattr(mod, fn_name)
    except AttributeError:
        raise DecomposeError(f"--arch: module {mod_name} has no {fn_name!r}") from None
    if not callable(fn):
        raise DecomposeError(f"--arch: {mod_name}.{fn_name} is a {type(fn).__name__}, not a "
                             "function that builds the model")
    try:
        model = fn(**kwargs)
    except DecomposeError:
        raise
    except SystemExit as e:
        raise DecomposeError(f"--arch {spec} called sys.exit({e.code}) instead of building the "
                             "model; fix the builder") from None
    except Exception as e:
        raise DecomposeError(f"--arch {spec} failed to build the model ({type(e).__name__}: "
                             f"{_short(e)})") from None
    if not isinstance(model, nn.Module):
        raise DecomposeError(f"--arch {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _is_state_dict(obj: Any) -> bool:
    return bool(obj) and isinstance(obj, dict) and all(isinstance(k, str) for k in obj) and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: dict) -> dict[str, torch.Tensor] | None:
    """The state_dict in ``obj``: ``obj`` itself, or one under the usual wrapper keys (searched
    breadth-first, a few levels deep, without recursion)."""
    level = [obj]
    for _ in range(8):
        nxt = []
        for d in level:
            if _is_state_dict(d):
                return d
            nxt += [d[k] for k in STATE_DICT_KEYS if isinstance(d.get(k), dict)]
        if not nxt:
            return None
        level = nxt
    return None


def _strip_prefix(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    wanted = set(model.state_dict())
    for prefix in ("module.", "model.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd) and not set(sd) <= wanted:
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _dtype_kind(t: torch.Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating-point"
    return "integer"


def state_dict_mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str | None:
    """How ``sd`` differs from a model's own state_dict ``own`` (keys, shapes and kinds of
    dtype: a float tensor may load into a float of another width, never an integer one), or
    None."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    bad_kind = [k for k in own if k in sd and k not in bad_shape
                and _dtype_kind(sd[k]) != _dtype_kind(own[k])]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
    if bad_shape:
        k = bad_shape[0]
        parts.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: file "
                     f"{tuple(sd[k].shape)} vs model {tuple(own[k].shape)})")
    if bad_kind:
        k = bad_kind[0]
        parts.append(f"{len(bad_kind)} dtype mismatches (e.g. {k}: file {sd[k].dtype} vs model "
                     f"{own[k].dtype}; converting would change the values)")
    return "; ".join(parts) or None


def load_state_into(model: nn.Module, sd: dict[str, torch.Tensor], spec: str, path: Path) -> None:
    sd = _strip_prefix(sd, model)
    own = model.state_dict()
    # BatchNorm's step counter is absent from checkpoints saved before PyTorch 0.4.1 (the
    # shipped CIFAR ResNets among them); it only matters for momentum=None, so keep the model's.
    sd = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in sd},
          **sd}
    _check_tensors(sd.values(), path)
    mismatch = state_dict_mismatch(own, sd)
    if mismatch:
        raise DecomposeError(f"{path} does not match --arch {spec}: {mismatch}; "
                             "pass the --arch that built this checkpoint")
    model.load_state_dict(sd, strict=True)


# -------------------------------------------------------------------------------- checks
def _check_tensors(tensors: Iterable[Any], path: Path) -> None:
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise DecomposeError(f"{path} holds a {type(t).__name__} where a tensor belongs; the "
                                 "file is damaged or was not written by torch.save")
        if t.is_meta or t.device.type != "cpu":
            raise DecomposeError(f"{path} holds tensors without data (device {t.device}); save "
                                 "the model with its weights")
        if t.layout != torch.strided:
            raise DecomposeError(f"{path} holds {t.layout} tensors as weights; save dense "
                                 "weights")


def check_module(model: nn.Module, path: Path) -> None:
    """Refuse a module tree that is too deep to use (over :data:`MAX_MODULE_DEPTH` levels),
    holds something other than modules as children, or tensors without data as weights."""
    seen: set[int] = set()
    stack: list[tuple[nn.Module, int]] = [(model, 0)]
    while stack:
        m, depth = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if depth > MAX_MODULE_DEPTH:
            raise DecomposeError(f"{path} holds modules nested more than {MAX_MODULE_DEPTH} "
                                 "levels deep; refused (no real model is)")
        d = m.__dict__
        for key in ("_modules", "_parameters", "_buffers"):
            if not isinstance(d.get(key), dict):
                raise DecomposeError(f"{path} holds a broken {type(m).__name__} (no {key}); the "
                                     "file is damaged")
        for child in d["_modules"].values():
            if child is None:
                continue
            if not isinstance(child, nn.Module):
                raise DecomposeError(f"{path} holds a {type(child).__name__} among the layers "
                                     f"of a {type(m).__name__}; the file is damaged")
            stack.append((child, depth + 1))
        _check_tensors(d["_parameters"].values(), path)
        _check_tensors(d["_buffers"].values(), path)


def _json_like(value: Any, path: Path) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 0
    while stack:
        v, depth = stack.pop()
        nodes += 1
        if depth > MAX_META_DEPTH or nodes > 1_000_000:
            raise DecomposeError(f"{path} has malformed metadata (nested too deeply or too "
                                 "large); write the file again with decompose")
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise DecomposeError(f"{path} has malformed metadata (a {type(k).__name__} "
                                         "key); write the file again with decompose")
                stack.append((x, depth + 1))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, depth + 1) for x in v)
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            raise DecomposeError(f"{path} has malformed metadata (a {type(v).__name__} value); "
                                 "write the file again with decompose")


def valid_shape(shape: Any) -> bool:
    """A sample shape: 1 to 5 positive integers, each at most :data:`MAX_SHAPE_SIDE`."""
    return (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 5
            and all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SHAPE_SIDE
                    for s in shape))


def check_meta(meta: Any, path: Path) -> dict[str, Any]:
    """The metadata of a decompose file, checked: a dict of JSON-like values whose known
    fields have their types (``input_shape``, ``layers``, ``source``, ``arch``, ``config``)."""
    if not isinstance(meta, dict):
        raise DecomposeError(f"{path} has malformed metadata (a {type(meta).__name__}, not a "
                             "dict); write the file again with decompose")
    _json_like(meta, path)
    problems = []
    if "input_shape" in meta and meta["input_shape"] is not None \
            and not valid_shape(meta["input_shape"]):
        problems.append("input_shape is not a list of positive integers")
    if "layers" in meta and not (isinstance(meta["layers"], list)
                                 and all(isinstance(x, dict) for x in meta["layers"])):
        problems.append("layers is not a list of records")
    for key in ("source", "arch"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            problems.append(f"{key} is not text")
    for key in ("config", "totals"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            problems.append(f"{key} is not a record")
    if problems:
        raise DecomposeError(f"{path} has malformed metadata ({'; '.join(problems)}); write the "
                             "file again with decompose")
    return dict(meta)


def _decompose_file(obj: dict, p: Path) -> Loaded:
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DecomposeError(f"{p} is a decompose file with a malformed format version "
                             f"({str(version)[:20]!r}); write it again with decompose")
    if version > FORMAT_VERSION:
        raise DecomposeError(f"{p} was written by a newer decompose (file format {version}; this "
                             f"one reads up to {FORMAT_VERSION}); upgrade decompose to read it")
    model = obj.get("model")
    if not isinstance(model, nn.Module):
        raise DecomposeError(f"{p} is a decompose file without a model (it holds a "
                             f"{type(model).__name__}); write it again with decompose")
    meta = check_meta(obj.get("meta") or {}, p)
    check_module(model, p)
    checksum = obj.get("checksum")
    status = "unverified"
    if checksum is not None:
        if not (isinstance(checksum, dict) and checksum.get("algorithm") == ALGORITHM
                and isinstance(checksum.get("digest"), str)):
            raise DecomposeError(f"{p} has a malformed checksum record; the file is damaged, "
                                 "write it again with decompose")
        try:
            digest = model_digest(model, meta)
        except (ValueError, RuntimeError, TypeError) as e:
            raise DecomposeError(f"{p} cannot be checked ({_short(e)}); the file is "
                                 "damaged") from None
        if digest != checksum["digest"]:
            raise DecomposeError(f"{p} is corrupt: its weights do not match the checksum stored "
                                 "with them; write the file again with decompose")
        status = "verified"
    if version < 2:
        model = upgrade_legacy_layers(model)
    return Loaded(model, p, meta, "decomposed", status)


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


def load_model(path: str | os.PathLike, arch: str | None = None, allow: Iterable[str] = (),
               trust: bool = False, allow_functions: Iterable[str] = ()) -> Loaded:
    """Read a model file safely.

    Accepts a pickled ``nn.Module`` (``torch.save(model)``), a file written by decompose, or a
    checkpoint / state_dict together with ``arch`` (``module:function`` that builds the model;
    ``state_dict`` and similar wrapper keys and a ``module.`` prefix are handled; CUDA tensors are
    loaded on the CPU).

    Args:
        path: the file.
        arch: builder for checkpoints, e.g. ``"decompose.models.cifar_resnet:resnet20"``: the
            module is imported and the callable called with the literal keyword arguments given
            (``module:fn(depth=56)``), so name only code you trust.
        allow: extra modules (``"pkg.mod"``: its nn.Module classes) or classes
            (``"pkg.mod:Class"``) the safe loader may rebuild. The module of ``arch`` is
            allowed too. Classes only; see ``allow_functions``.
        trust: use the full unpickler (runs code from the file). Default False.
        allow_functions: callables (``"pkg.mod:function"``) the file may call while loading;
            only for files whose author you trust.

    Raises:
        DecomposeError: one line, for every file that cannot be used (see docs/reliability.md).
    """
    p = Path(os.fspath(path))
    allow = list(allow)
    if arch:
        allow.append(parse_arch(arch)[0])
    obj = _read(p, allow, trust, allow_functions)
    try:
        return _interpret(obj, p, arch)
    except RecursionError:
        raise DecomposeError(f"{p} is nested too deeply to be a model file; refused") from None


def _interpret(obj: Any, p: Path, arch: str | None) -> Loaded:
    if isinstance(obj, nn.Module):
        check_module(obj, p)
        return Loaded(obj, p, {}, "module")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _decompose_file(obj, p)
    if isinstance(obj, dict):
        sd = _find_state_dict(obj)
        if sd is None:
            for key in STATE_DICT_KEYS:
                if isinstance(obj.get(key), nn.Module):
                    check_module(obj[key], p)
                    return Loaded(obj[key], p, {}, "module")
            keys = sorted(k if isinstance(k, str) else type(k).__name__ for k in obj)[:6]
            raise DecomposeError(f"{p} holds a dict with keys {[k[:40] for k in keys]} but no "
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


def load(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a model (see :func:`load_model` for the arguments) and return only the module."""
    return load_model(path, **kwargs).model


# -------------------------------------------------------------------------------- writing
def default_output(path: str | os.PathLike) -> Path:
    """``model.pt`` -> ``model.decomposed.pt`` next to the input."""
    p = Path(path)
    return p.with_name(f"{p.stem}.decomposed{p.suffix or '.pt'}")


def check_writable(out: str | os.PathLike, force: bool = False,
                   inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Fail early (before any work) if ``out`` may not be written: see
    :func:`decompose.io.write.check_target`. Returns ``out``."""
    check_target(out, force, inputs)
    return Path(os.fspath(out))


def serialize(obj: Any) -> bytes:
    """``torch.save`` into memory (so that a full disk can only fail in the writer, where it is
    a one-line error, never inside torch)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _local_hook(model: nn.Module) -> str | None:
    """``name (hook)`` of the first module holding a forward (pre-)hook that pickle cannot
    reach by name (a function defined inside another), else None."""
    for name, m in model.named_modules():
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for h in hooks.values():
                fn = getattr(h, "__func__", h)
                if "<locals>" in getattr(fn, "__qualname__", ""):
                    return f"{name or type(model).__name__} ({fn.__qualname__.rsplit('.', 1)[-1]})"
    return None


def save_model(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None,
               force: bool = False) -> Path:
    """Write ``model`` (whole module) plus ``meta`` (JSON-like) atomically, with a format version
    and a checksum of its weights, structure and meta; see :func:`load_model`. The file is
    serialised in memory first, then written by :func:`decompose.io.write.write_bytes`."""
    check_target(path, force)
    from ..engine.params import parametrized
    found = parametrized(model)
    if found:
        name, kinds = next(iter(found.items()))
        raise DecomposeError(
            f"cannot save this model: {name or type(model).__name__} has a weight "
            f"parametrization ({', '.join(kinds)}){' and more' if len(found) > 1 else ''}, which "
            "torch cannot pickle; save it with decompose.save, which bakes parametrizations "
            "into plain weights, exactly")
    meta = dict(meta or {})
    payload = {"format": FORMAT, "version": FORMAT_VERSION, "model": model, "meta": meta}
    try:
        payload["checksum"] = {"algorithm": ALGORITHM, "digest": model_digest(model, meta)}
        data = serialize(payload)
    except (pickle.PicklingError, AttributeError, TypeError, ValueError) as e:
        hook = _local_hook(model)
        if hook is not None:
            raise DecomposeError(
                f"cannot save this model: {hook} holds a hook that is a local function, which "
                "cannot be pickled (transformers installs such hooks on the first forward of "
                "models that capture hidden states); save its state_dict instead and rebuild "
                "it with --arch") from None
        raise DecomposeError(f"cannot save this model ({_short(e)}); models with lambdas or local "
                             "classes cannot be pickled") from None
    except RuntimeError as e:
        raise DecomposeError(f"cannot save this model ({_short(e)})") from None
    return write_bytes(path, data, force)


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


__all__ = ["FORMAT", "FORMAT_VERSION", "Loaded", "allowlist", "atomic_write", "build_arch",
           "check_meta", "check_module", "check_writable", "default_output", "load",
           "load_model", "load_state_into", "parse_arch", "save_model", "serialize",
           "state_dict_mismatch", "valid_shape"]
