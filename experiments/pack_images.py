"""Pack an image folder tree into one file and unpack it elsewhere, bytes unchanged.

Carries the shared CIFAR-10 JPEGs (60,000 files, 55 MB of bytes but 236 MB on disk in 4 KB
blocks) to a GPU machine that cannot see ../shared, inside a folder git ignores. The pack is a
transport format only, never committed: the images stay where ../shared keeps them.

    python experiments/pack_images.py pack ../shared/data/cifar10 .devcache/cifar10.pack
    python experiments/pack_images.py unpack .devcache/cifar10.pack /tmp/cifar10

Format: 8 bytes magic, 8 bytes little-endian length of a JSON index, the index (a list of
``[relative path, size]``), then every file's bytes in index order. Unpacking checks the total.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

MAGIC = b"DCPACK01"


def pack(root: Path, out: Path) -> int:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    index = [[p.relative_to(root).as_posix(), p.stat().st_size] for p in files]
    head = json.dumps(index).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(head)) + head)
        for p in files:
            f.write(p.read_bytes())
    return len(files)


def unpack(src: Path, root: Path) -> int:
    with open(src, "rb") as f:
        if f.read(8) != MAGIC:
            raise SystemExit(f"{src} is not a pack written by this script")
        (n,) = struct.unpack("<Q", f.read(8))
        index = json.loads(f.read(n))
        for rel, size in index:
            dest = root / rel
            if ".." in Path(rel).parts:
                raise SystemExit(f"refusing a path outside {root}: {rel}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = f.read(size)
            if len(data) != size:
                raise SystemExit(f"{src} is truncated at {rel}")
            dest.write_bytes(data)
    return len(index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("verb", choices=("pack", "unpack"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    a = ap.parse_args()
    n = pack(a.src, a.dest) if a.verb == "pack" else unpack(a.src, a.dest)
    print(f"{a.verb}ed {n} files: {a.src} -> {a.dest}")


if __name__ == "__main__":
    main()
