"""Single-process and torchrun-launched training alike: ranks, devices, samplers, sums.

Under ``torchrun`` the environment holds RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR /
MASTER_PORT); without them everything here behaves as one process of a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ...errors import DecomposeError


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def on(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0


def distributed_env() -> Dist:
    """Rank, world size and local rank from torchrun's environment (one process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DecomposeError("RANK / WORLD_SIZE / LOCAL_RANK must be integers; launch with "
                             "torchrun") from None
    return Dist(rank, world, local) if world > 1 else Dist()


def resolve_device(name: str, d: Dist) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (this rank's GPU)."""
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise DecomposeError("--device cuda but no CUDA device is available; use --device cpu "
                             "or --device auto")
    if name == "cpu" or (name == "auto" and not cuda):
        return torch.device("cpu")
    index = d.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(d: Dist, device: torch.device) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) unless alone or already joined."""
    if not d.on or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=d.rank,
                                world_size=d.world)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DecomposeError(f"cannot start the {backend} process group ({first}); launch "
                             "with torchrun, which sets MASTER_ADDR and MASTER_PORT") from None


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined (once, at the end of a script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (the values themselves when alone)."""
    if not d.on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks take the same branch)."""
    if not d.on:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers(module: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank."""
    if d.on:
        for b in module.buffers():
            dist.broadcast(b, 0)


class EpochSampler(DistributedSampler):
    """A per-epoch seeded shuffle of this rank's shard (a DistributedSampler, also used for one
    process; call ``set_epoch`` each epoch) that can start part-way: ``skip`` samples done."""

    def __init__(self, dataset: Dataset, d: Dist, seed: int) -> None:
        super().__init__(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class Strided(Sampler):
    """Indices rank, rank + world, ...: an evaluation shard with no padding, so sums are exact."""

    def __init__(self, n: int, d: Dist) -> None:
        self.idx = list(range(d.rank, n, d.world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)
