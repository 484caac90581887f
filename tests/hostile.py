"""Hostile and damaged files for the tests: torch.save zips with a pickle of our own making."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import torch


def _empty_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({}, buf)
    return buf.getvalue()


def with_pickle(path: Path, pkl: bytes, extra: dict[str, bytes] | None = None,
                compress: int = zipfile.ZIP_STORED) -> Path:
    """A torch.save zip whose data.pkl is ``pkl`` (and extra members, e.g. storages)."""
    src = zipfile.ZipFile(io.BytesIO(_empty_zip()))
    prefix = src.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = pkl if info.filename.endswith("data.pkl") else src.read(info.filename)
            out.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            out.writestr(f"{prefix}/{name}", data, compress_type=compress)
    return path


def binint(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def call(module: str, name: str, *int_args: int) -> bytes:
    """A pickle that calls module.name(*int_args) (REDUCE)."""
    args = b"".join(binint(a) if a < 2**31 else b"\x8a\x08" + a.to_bytes(8, "little")
                    for a in int_args)
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + args + b"tR.")


def nested_dicts(depth: int, key: str = "state_dict") -> bytes:
    k = key.encode()
    item = b"X" + struct.pack("<I", len(k)) + k
    return b"\x80\x02}" + (item + b"}") * depth + b"s" * depth + b"."


def nested_lists(depth: int) -> bytes:
    return b"\x80\x02" + b"(" * depth + b"l" * depth + b"."


def zip_bomb(path: Path, megabytes: int = 200) -> Path:
    """A storage of ``megabytes`` MB of zeros, deflated to a few hundred KB."""
    n = megabytes * 2**20 // 4
    pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
           b"FloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu" + binint(n) + b"tQK\x00"
           + binint(n) + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR.")
    return with_pickle(path, pkl, {"data/0": b"\0" * (n * 4)}, compress=zipfile.ZIP_DEFLATED)
