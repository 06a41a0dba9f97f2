"""The Ray layer: the only module that imports ray.

`RayRunner(cfg)` is the runner `pipeline.data.prepare` maps its per-part function with: one
Ray task per argument tuple, results in submission order, the NumPy buffers coming back through
the object store without copies. It joins the cluster at `ray.address` (or RAY_ADDRESS) or
starts a local instance, and shuts down only what it started.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import ray

from pipeline.config import RayConfig
from pipeline.errors import PipelineError


def connect(cfg: RayConfig) -> bool:
    """Join the cluster at `ray.address` (or RAY_ADDRESS), or start a local instance.
    Returns True when this call started or joined Ray, False when it was already up."""
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise PipelineError(f"cannot start or join {where}: {e}") from None
    return True


class RayRunner:
    """Maps a function over argument tuples as Ray tasks, results in submission order.

    Ray starts on the first call (so bad paths and configs fail before paying for it) and
    stops when the `with` block ends, if this runner started it. A task that raises a
    PipelineError (e.g. a DataError) re-raises it here, unwrapped.
    """

    def __init__(self, cfg: RayConfig) -> None:
        self.cfg = cfg
        self.started = False

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()
            self.started = False

    def __call__(self, fn: Callable, args: list[tuple]) -> list:
        self.started |= connect(self.cfg)
        remote = ray.remote(fn).options(
            num_cpus=self.cfg.task_num_cpus, num_gpus=self.cfg.task_num_gpus,
            max_retries=self.cfg.max_retries, retry_exceptions=False)
        refs = [remote.remote(*a) for a in args]
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, PipelineError):
                raise type(cause)(*cause.args) from None
            raise


def ray_runner(cfg: RayConfig) -> RayRunner:
    return RayRunner(cfg)
