"""One process or many: the rank and world size ``torchrun`` (or ``accelerate launch``) gives a process.

Why a module of its own: the benchmark, the feature-cache build and training all shard work the same way, and
none of them may grow its own process pool or socket code: ``torch.distributed`` is the engine (``gloo`` on CPU,
``nccl`` on CUDA), set up from the environment variables ``torchrun`` exports. Without them everything runs as
a world of one, with no process group at all.

Multi-node: ``torchrun --nnodes N --node_rank R --nproc_per_node G --rdzv_backend c10d
--rdzv_endpoint HOST:PORT -m llavaseg.cli.train ...`` (the same command on every node).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["World", "world", "barrier", "shard", "all_gather_objects"]


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world(device: str = "cpu") -> World:
    """This process's place in the run, joining the process group on first use (``gloo`` for CPU devices,
    ``nccl`` for CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def barrier(place: World) -> None:
    if place.distributed:
        import torch.distributed as dist

        dist.barrier()


def shard(items: list[Any], place: World) -> list[Any]:
    """This rank's share of ``items``: every ``size``-th item from position ``rank`` (balanced, deterministic)."""
    return items[place.rank:: place.size]


def all_gather_objects(value: Any, place: World) -> list[Any]:
    """Every rank's ``value`` (picklable, small), in rank order; ``[value]`` in a world of one."""
    if not place.distributed:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * place.size
    dist.all_gather_object(gathered, value)
    return gathered
