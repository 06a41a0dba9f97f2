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
from pipeline.errors import InfraError, PipelineError


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
        raise InfraError(f"cannot start or join {where}: {e}") from None
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


# ------------------------------------------------------------------ training on Ray

def _run_job_task(arrays, job, cfg, final=False, log=None, init=None):
    from pipeline.jobs import run_job
    res = run_job(arrays, job, cfg, final=final, log=log, init=init)
    res.node = ray.get_runtime_context().get_node_id()
    return res


def train_per_group(arrays, jobs: list, cfg, final: bool = False, loggers: dict | None = None,
                    inits: dict | None = None) -> list:
    """One Ray task per job with `ray.task_num_cpus` / `ray.task_num_gpus` (fractions allowed;
    a scheduling label, not a memory cap). The arrays go to the object store once and every
    task maps them without a copy. A job that raises is retried `ray.max_retries` times; if it
    still fails it comes back as a failed JobResult and every other job completes. `loggers`
    (job name -> the tracking layer's EpochLogger) travel with the tasks, which log each epoch
    into the job's existing run."""
    from pipeline.jobs import failed
    connect(cfg.ray)
    ref = ray.put(arrays)
    task = ray.remote(_run_job_task).options(
        num_cpus=cfg.ray.task_num_cpus, num_gpus=cfg.ray.task_num_gpus,
        max_retries=cfg.ray.max_retries, retry_exceptions=True)
    refs = [task.remote(ref, job, cfg, final, (loggers or {}).get(job.name),
                        (inits or {}).get(job.name)) for job in jobs]
    out = []
    for job, r in zip(jobs, refs, strict=True):
        try:
            out.append(ray.get(r))
        except ray.exceptions.RayTaskError as e:
            out.append(failed(job, e.as_instanceof_cause(), attempts=cfg.ray.max_retries + 1))
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.RayError) as e:
            out.append(failed(job, e, attempts=cfg.ray.max_retries + 1))
    return out


def _ddp_worker(config: dict):
    """Ray Train's train_loop_per_worker: the same job function, the model wrapped in DDP;
    each rank samples its own shard of the window index (see pipeline.train.shard)."""
    import ray.train.torch as rtt

    from pipeline.jobs import run_job
    arrays = ray.get(config["arrays"])
    rank0 = ray.train.get_context().get_world_rank() == 0
    return run_job(arrays, config["job"], config["cfg"], wrap=rtt.prepare_model,
                   final=config.get("final", False), log=config.get("log") if rank0 else None,
                   init=config.get("init"))


def train_global_ddp(arrays, job, cfg, final: bool = False, log=None, init=None):
    """Global training with Ray Train's TorchTrainer (DDP over `ray.num_workers` workers, on
    GPUs when the cluster has them and train.device allows). Returns rank 0's JobResult."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.jobs import failed
    connect(cfg.ray)
    use_gpu = cfg.train.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"arrays": ray.put(arrays), "job": job, "cfg": cfg, "final": final,
                           "log": log, "init": init},   # rank 0 alone logs into the job's run
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"{cfg.name}-{job.name}"),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray Train wraps worker errors in its own types
        return failed(job, e)
    return result.return_value


def train(arrays, jobs: list, cfg, final: bool = False, loggers: dict | None = None,
          inits: dict | None = None) -> list:
    """Run the plan of jobs on Ray: per-group jobs as tasks (or packed into one task when
    `train.packed`), the global job in one task, or under Ray Train DDP when
    `ray.num_workers > 1`."""
    if cfg.train.mode == "global" and cfg.ray.num_workers > 1:
        return [train_global_ddp(arrays, jobs[0], cfg, final, (loggers or {}).get(jobs[0].name),
                                 (inits or {}).get(jobs[0].name))]
    if cfg.train.per_group.packed:
        connect(cfg.ray)
        from pipeline.jobs import failed
        task = ray.remote(_run_packed_task).options(
            num_cpus=cfg.ray.task_num_cpus, num_gpus=cfg.ray.task_num_gpus,
            max_retries=cfg.ray.max_retries, retry_exceptions=True)
        try:
            return ray.get(task.remote(ray.put(arrays), jobs, cfg, final, inits))
        except ray.exceptions.RayTaskError as e:   # the pack failed: every group reports it
            return [failed(j, e.as_instanceof_cause(), cfg.ray.max_retries + 1) for j in jobs]
        except ray.exceptions.RayError as e:
            return [failed(j, e, cfg.ray.max_retries + 1) for j in jobs]
    return train_per_group(arrays, jobs, cfg, final, loggers, inits)


def _run_packed_task(arrays, jobs, cfg, final=False, inits=None):
    from pipeline.jobs import run_packed
    return run_packed(arrays, jobs, cfg, final=final, inits=inits)
