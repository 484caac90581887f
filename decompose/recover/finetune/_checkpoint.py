"""What lets fine-tuning survive an interruption: checkpoint files, RNG states, the per-epoch
log, and the SIGINT/SIGTERM flag.

A checkpoint is a plain dict of tensors, numbers, strings, lists and tuples, so it reads back
with the weights-only loader (:func:`decompose.io.safeload.read_torch_file`); it is serialised in
memory and written by :func:`decompose.io.write.write_bytes` (atomic), so a kill at any moment
leaves the previous checkpoint intact. It carries a sha256 checksum of its content
(:func:`decompose.io.checksum.payload_digest`); a checkpoint whose content does not match is
refused, one without a checksum (written before it existed) is read as it is.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import DecomposeError
from ...io.checksum import ALGORITHM, payload_digest
from ...io.files import serialize, state_dict_mismatch
from ...io.safeload import read_torch_file
from ...io.write import write_bytes, write_text

FORMAT = "decompose-finetune"
VERSION = 1


# ------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python generator states, weights-only loadable."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(), "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------------------------ files
def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Serialise in memory (with a checksum), then write atomically over ``path`` (the run's
    own checkpoint: replaced every epoch)."""
    ck = {"format": FORMAT, "version": VERSION, **payload}
    ck["checksum"] = {"algorithm": ALGORITHM, "digest": payload_digest(ck)}
    write_bytes(path, serialize(ck), force=True, what="checkpoint")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a fine-tuning checkpoint with the weights-only loader and check its checksum."""
    p = Path(path)
    if not os.path.lexists(p):
        raise DecomposeError(f"no checkpoint at {p} to resume; run without --resume to start, "
                             "or give the run's --checkpoint")
    try:
        ck = read_torch_file(p, what="checkpoint")
    except DecomposeError as e:
        raise DecomposeError(f"{e}; or start over with --force") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise DecomposeError(f"{p} is not a decompose fine-tuning checkpoint; give the "
                             "--checkpoint that an earlier 'decompose finetune' wrote")
    version = ck.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DecomposeError(f"{p} has a malformed format version; start over with --force")
    if version > VERSION:
        raise DecomposeError(f"{p} was written by a newer decompose (checkpoint format "
                             f"{version}; this one reads up to {VERSION}); upgrade decompose")
    checksum = ck.get("checksum")
    if checksum is not None:
        ok = isinstance(checksum, dict) and checksum.get("algorithm") == ALGORITHM
        try:
            ok = ok and checksum.get("digest") == payload_digest(ck)
        except (ValueError, RuntimeError, TypeError):
            ok = False
        if not ok:
            raise DecomposeError(f"checkpoint {p} is corrupt: its content does not match the "
                                 "checksum stored with it; start over with --force")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise DecomposeError(f"checkpoint {p} lacks {', '.join(missing[:3])}; it is damaged or "
                             "incomplete, start over with --force")
    return ck


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "partial", "world_size",
                   "history", "best_top1", "best_epoch", "best_state", "before", "teacher",
                   "rng", "config")


def check_same_model(model: nn.Module, sd: dict[str, torch.Tensor], path: Any) -> None:
    """Raise unless ``sd`` has exactly the keys and shapes of ``model``'s state_dict."""
    mismatch = state_dict_mismatch(model.state_dict(), sd)
    if mismatch:
        raise DecomposeError(f"checkpoint {path} was made for another model ({mismatch})"
                             "; resume with the model it was made from, or start over with "
                             "--force")


def check_same_settings(now: dict[str, Any], saved: dict[str, Any], may_change: Iterable[str],
                        path: Any) -> None:
    """Raise when a setting outside ``may_change`` differs from the checkpoint's."""
    free = set(may_change) | {"_type", "_version"}  # checkpoints from before versioned configs
    diff = [k for k in now if k not in free and saved.get(k) != now[k]]
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:4])
        raise DecomposeError(f"checkpoint {path} was made with other settings ({shown}); resume "
                             "with the same settings, or start over with --force")


def write_log(path: str, records: list[dict[str, Any]], fields: Iterable[str]) -> None:
    """The whole per-epoch log, rewritten atomically (the run's own file: replaced every epoch,
    so a resumed run's log is exactly its checkpoint's history): JSON lines, or CSV for a
    ``.csv`` name."""
    f = io.StringIO(newline="")
    if str(path).lower().endswith(".csv"):
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    else:
        for r in records:
            f.write(json.dumps({k: r[k] for k in fields if k in r}) + "\n")
    write_text(path, f.getvalue(), force=True, what="log")


# ------------------------------------------------------------------------------------ signals
class StopFlag:
    """While active, SIGINT/SIGTERM set ``signal_name`` (the loop stops at the next batch
    boundary); a second signal raises KeyboardInterrupt at once (the last checkpoint stands).
    Only installed from the main thread; the previous handlers come back on exit."""

    def __init__(self, active: bool) -> None:
        self.signal_name: str | None = None
        self.active = active and threading.current_thread() is threading.main_thread()
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if self.active:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
