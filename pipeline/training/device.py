"""Where and how the training loop computes: the device a config names, the autocast dtype,
the torch threads, whether a pack trains packed, and seeding every generator a run draws from.
No Ray, no MLflow."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from pipeline.config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA unless fp32 is asked for; none on the CPU unless bf16 is."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@contextlib.contextmanager
def torch_threads(threads: int | str):
    """torch's intra-op threads set to `threads` inside the block ("auto": left as they are),
    restored after it."""
    before = torch.get_num_threads()
    if threads != "auto" and threads != before:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def packs(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether members that may train as one pack do (`train.pack`): always, never, or (auto)
    on a GPU, where one packed kernel fills the device; on a CPU the members' kernels are
    already large enough, and one after another they skip the members that stopped early."""
    return cfg.pack == "always" or (cfg.pack == "auto" and device.type == "cuda")
