"""Checksums that make a damaged file an error instead of a model with other weights.

A decompose file (format version 1 and later) stores ``checksum = {"algorithm": "sha256",
"digest": ...}`` beside its model. The digest covers, in a fixed order:

* every tensor of the model's ``state_dict`` (name, dtype, shape and raw bytes, names sorted);
* the module tree: each submodule's name, class name and the hyper-parameters that decide what it
  computes (stride, padding, dilation, groups, channels, eps, ...), when present;
* the file's ``meta`` (JSON-like values).

Fine-tuning checkpoints store the same kind of digest over every tensor and plain value of the
checkpoint. On loading, a digest that differs is an error; a file without one (written before
checksums existed) is read as "unverified".
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

ALGORITHM = "sha256"
#: module attributes covered by the structure digest (whichever a module has)
STRUCTURE_ATTRS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
    "padding_mode", "output_padding", "transposed", "in_features", "out_features",
    "num_features", "eps", "affine", "track_running_stats", "momentum", "negative_slope",
    "start_dim", "end_dim", "dim", "output_size", "ceil_mode", "count_include_pad",
    "divisor_override", "return_indices", "p", "inplace", "approximate", "min_val", "max_val",
    "num_groups", "normalized_shape", "elementwise_affine", "upscale_factor", "scale_factor",
    "mode", "align_corners", "beta", "threshold", "lambd", "alpha", "upper", "lower",
)
_MAX_DEPTH = 200


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.layout != torch.strided:
        return repr((str(t.layout), tuple(t.shape))).encode()
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    try:
        return t.view(torch.uint8).numpy().tobytes()
    except (RuntimeError, TypeError):  # a dtype without a byte view (quantized): its values
        return repr(t.dequantize().tolist() if t.is_quantized else t.tolist()).encode()


def _leaf(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        h.update(b"T" + repr((str(value.dtype), tuple(value.shape))).encode())
        h.update(_tensor_bytes(value))
    elif isinstance(value, bool) or value is None:
        h.update(b"B" + repr(value).encode())
    elif isinstance(value, int):
        h.update(b"I" + str(value).encode())
    elif isinstance(value, float):
        h.update(b"F" + (value.hex() if math.isfinite(value) else repr(value)).encode())
    elif isinstance(value, str):
        h.update(b"S" + value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, bytes):
        h.update(b"Y" + value)
    else:
        h.update(b"O" + type(value).__name__.encode())


def update(h: Any, obj: Any) -> None:
    """Feed ``obj`` (nested dicts, lists, tuples, tensors and plain values) into hash ``h`` in a
    stable order, without recursion (dict keys sorted by their text)."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise ValueError("nested too deeply to checksum")
        if isinstance(value, dict):
            keys = sorted(value, key=lambda k: (type(k).__name__, str(k)))
            h.update(b"{" + str(len(keys)).encode())
            for k in reversed(keys):
                stack.append((value[k], depth + 1))
                stack.append((k, depth + 1))
        elif isinstance(value, (list, tuple)):
            h.update((b"[" if isinstance(value, list) else b"(") + str(len(value)).encode())
            for v in reversed(value):
                stack.append((v, depth + 1))
        else:
            _leaf(h, value)


def structure(model: nn.Module) -> list[Any]:
    """The module tree as plain values: (name, class name, [(attribute, value), ...])."""
    out: list[Any] = []
    for name, m in model.named_modules():
        attrs = []
        for a in STRUCTURE_ATTRS:
            v = m.__dict__.get(a, None)
            if v is None or isinstance(v, (bool, int, float, str, tuple, list)):
                if a in m.__dict__:
                    attrs.append((a, list(v) if isinstance(v, tuple) else v))
        out.append((name, type(m).__name__, attrs))
    return out


def model_digest(model: nn.Module, meta: dict[str, Any] | None) -> str:
    """The digest a decompose file stores (see the module docs)."""
    h = hashlib.sha256(b"decompose-model-v1")
    update(h, dict(model.state_dict()))
    update(h, structure(model))
    update(h, meta or {})
    return h.hexdigest()


def payload_digest(payload: dict[str, Any]) -> str:
    """The digest a fine-tuning checkpoint stores: all of it but its ``checksum`` entry."""
    h = hashlib.sha256(b"decompose-checkpoint-v1")
    update(h, {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()


__all__ = ["ALGORITHM", "model_digest", "payload_digest", "structure", "update"]
