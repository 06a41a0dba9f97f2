"""torch.distributed (DDP) as the training loop sees it: this process's rank and the world
size (0 and 1 without DDP), a mean over ranks, and each rank's shard of a window index. Ray
Train sets up the process group (`pipeline.execution.ray_train`); nothing here imports Ray."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.windows import WindowIndex


def dist_info() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def mean_over_ranks(value: float, device: torch.device) -> float:
    rank, world = dist_info()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def shard(index: WindowIndex | None, rank: int, world: int) -> WindowIndex | None:
    """Every world-th window from `rank`, cut to the same length on every rank (DDP needs the
    same number of steps everywhere)."""
    if world == 1 or index is None:
        return index
    per_rank = len(index) // world
    return index.take(np.arange(rank, per_rank * world, world))
