"""torchrun support: which share of the work this process does, and summing results across processes.

Under `torchrun` (RANK and WORLD_SIZE set) the process group is created on first use: gloo on the CPU,
nccl on CUDA. A plain `meancache` run is rank 0 of a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import MeanCacheError, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every size-th one, starting at the rank, so shares differ by at most one."""
        return list(items[self.rank::self.size])

    def device(self, requested: str) -> str:
        """On CUDA each rank takes the GPU of its local rank."""
        return f"cuda:{self.local_rank}" if requested == "cuda" and self.size > 1 else requested

    def sum_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Elementwise sums over all ranks (float64), in the same key order everywhere."""
        if self.size == 1:
            return arrays
        summed = {}
        for name in sorted(arrays):
            tensor = torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float64))
            if dist.get_backend() == "nccl":
                tensor = tensor.cuda()
            dist.all_reduce(tensor)
            summed[name] = tensor.cpu().numpy()
        return summed

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def current_world() -> World:
    """The world this process belongs to, joining the process group when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def enable_context_parallel(pipe: Any, degree: int, world: World) -> None:
    """Split attention over `degree` GPUs with diffusers' context parallelism; MeanCache sits on top."""
    if degree < 2 or degree != world.size:
        raise UsageError(f"--context-parallel {degree} needs torchrun with exactly {degree} processes "
                         f"(this run has {world.size})")
    if not torch.cuda.is_available():
        raise MeanCacheError("--context-parallel needs CUDA GPUs: diffusers' context parallelism runs on accelerators")
    from diffusers import ContextParallelConfig

    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
