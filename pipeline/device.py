"""Where and how the training loop computes: the device a config names, the autocast dtype,
and seeding every generator a run draws from. No Ray, no MLflow."""
from __future__ import annotations

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
