"""The Ray layer: the only module that imports ray.

`RayRunner(cfg)` is the runner the data stage maps its per-part function with: one Ray task per
argument tuple, results in submission order, the NumPy buffers coming back through the object
store without copies. `train` runs a plan of packs (`pipeline.training.plan.plan_packs`): one Ray
task per pack, one per member of an ensemble whose members do not pack on the device (a CPU:
`train.pack`), or Ray Train's TorchTrainer (DDP) for a global model over several workers. Ray joins
the cluster at `ray.address` (or RAY_ADDRESS) or starts a local instance, and shuts down only
what it started.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import ray
from ray.util.queue import Queue

from pipeline.config import Config, RayConfig
from pipeline.errors import InfraError, PipelineError
from pipeline.execution.failures import NodeWatch, ray_failure
from pipeline.models.ensemble import ensemble_members
from pipeline.progress import Display
from pipeline.training.jobs import run_pack, spreads_members, train_members
from pipeline.training.plan import Job
from pipeline.training.results import JobResult, ensemble_result, failed


def connect(cfg: RayConfig) -> bool:
    """Join the cluster at `ray.address` (or RAY_ADDRESS), or start a local instance.
    Returns True when this call started or joined Ray, False when it was already up."""
    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # no banners; token
    term = signal.getsignal(signal.SIGTERM)                           # auth stays on
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            # "local": a new instance of this job's own, never another job's `ray start`
            # cluster found on the machine
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
        raise InfraError(f"cannot start or join {where}: {e}") from None
    if callable(term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, term)   # the job's (Batch: run KILLED, exit 1), not
    return True                               # the one Ray's core worker installed (aborts)


def task(fn: Callable, cfg: RayConfig, retry_exceptions: bool, **options):
    """`fn` as a Ray task with the configured resources (`ray.task_num_cpus` /
    `ray.task_num_gpus`, fractions allowed: a scheduling label, not a memory cap) and
    `ray.max_retries` retries (of exceptions too, when `retry_exceptions`); `options`: more of
    Ray's task options (a scheduling strategy)."""
    return ray.remote(fn).options(num_cpus=cfg.task_num_cpus, num_gpus=cfg.task_num_gpus,
                                  max_retries=cfg.max_retries, retry_exceptions=retry_exceptions,
                                  **options)


class Deadline:
    """`ray.task_timeout_minutes` from now: how long a `ray.get` may still wait (None: no
    limit)."""

    def __init__(self, cfg: RayConfig) -> None:
        self.minutes = cfg.task_timeout_minutes
        self.end = None if self.minutes is None else time.monotonic() + 60 * self.minutes

    def left(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def error(self, what: str) -> InfraError:
        return InfraError(f"{what} still running after ray.task_timeout_minutes = "
                          f"{self.minutes:g}; cancelled")


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
            self.started = False
            with contextlib.suppress(Exception):   # a dead node must not hide the error
                ray.shutdown()

    def __call__(self, fn: Callable, args: list[tuple], verb: str = "reading",
                 unit: str = "files") -> list:
        self.started |= connect(self.cfg)
        remote = task(fn, self.cfg, retry_exceptions=False,
                      scheduling_strategy="SPREAD")   # reads spread over the nodes
        refs = [remote.remote(*a) for a in args]
        deadline = Deadline(self.cfg)
        try:
            wait_all(refs, deadline, Display(verb, len(refs), unit), NodeWatch(self.cfg))
            return ray.get(refs, timeout=deadline.left())
        except ray.exceptions.GetTimeoutError:
            for r in refs:
                ray.cancel(r, force=True)
            raise deadline.error(f"a data task of {fn.__name__}") from None
        except ray.exceptions.RayError as e:
            if isinstance(getattr(e, "cause", None), PipelineError):   # the task's own error
                raise e.cause.with_traceback(None) from None
            raise ray_failure(e, f"a data task ({fn.__name__})",
                              1 + self.cfg.max_retries) or e from None


def wait_all(refs: list, deadline: Deadline, display: Display,
             nodes: NodeWatch | None = None) -> None:
    """Wait for every task, advancing `display` as each finishes (a heartbeat line off a
    terminal while none does); GetTimeoutError past the deadline; the InfraError of `nodes`
    (the pending tasks cancelled) when a dead node left them nowhere to run."""
    pending = list(refs)
    try:
        while pending:
            left = deadline.left()
            if left == 0:
                raise ray.exceptions.GetTimeoutError("deadline")
            done, pending = ray.wait(pending, num_returns=1, timeout=min(1.0, left or 1.0))
            display.update(len(done))
            if nodes is not None:
                nodes.check(pending, "reading")
    finally:
        display.close()


# ------------------------------------------------------------------ training on Ray

def _pack_task(arrays, jobs, cfg, final=False, logs=None, inits=None, plan=None
               ) -> list[JobResult]:
    results = run_pack(arrays, jobs, cfg, final=final, logs=logs, inits=inits, plan=plan)
    node = ray.get_runtime_context().get_node_id()
    for r in results:
        r.node = node
    return results


def _members_task(arrays, job, cfg, indices, final=False, log=None, init=None, plan=None
                  ) -> tuple[dict, list[str], str]:
    done = train_members(arrays, job, cfg, indices, final=final, log=log, init=init, plan=plan)
    return done, list(getattr(log, "errors", [])), ray.get_runtime_context().get_node_id()


def train(arrays, packs: list[list[Job]], cfg: Config, final: bool = False,
          loggers: dict | None = None, inits: dict | None = None, plan=None
          ) -> list[JobResult]:
    """Train every pack on Ray: one task per pack (the arrays go to the object store once and
    every task maps them without a copy), one task per member of an ensemble that does not
    pack (`spreads_members`), or the global job under Ray Train DDP when
    `ray.num_workers > 1`. A pack that raises is retried `ray.max_retries` times; if it still
    fails its jobs come back as failed JobResults and every other pack completes. `loggers`
    (job name -> the tracking layer's EpochLogger) travel with the tasks, which log each epoch
    into the job's existing run. `plan`: the data stage's window plan (`jobs.job_data`)."""
    connect(cfg.ray)
    if cfg.train.mode == "global" and cfg.ray.num_workers > 1:
        (job,) = [j for pack in packs for j in pack]
        return [train_global_ddp(arrays, job, cfg, final, (loggers or {}).get(job.name),
                                 (inits or {}).get(job.name), plan)]
    if spreads_members(cfg, packs):
        return _train_members(arrays, [p[0] for p in packs], cfg, final, loggers or {},
                              inits or {}, plan)
    ref, plan_ref = ray.put(arrays), ray.put(plan)
    remote = task(_pack_task, cfg.ray, retry_exceptions=True)
    epochs = Queue()                        # each job's epochs, for the progress display
    refs = [remote.remote(ref, pack, cfg, final,
                          {j.name: Reported(j.name, epochs, (loggers or {}).get(j.name))
                           for j in pack},
                          {j.name: (inits or {}).get(j.name) for j in pack}, plan_ref)
            for pack in packs]
    out, deadline = [], Deadline(cfg.ray)
    _watch(refs, deadline, epochs, sum(len(p) for p in packs), cfg.train.epochs,
           cfg.ray)
    for pack, r in zip(packs, refs, strict=True):
        value, errors = _get(r, pack, cfg, deadline)
        out += errors or value
    return out


def _train_members(arrays, jobs: list[Job], cfg: Config, final: bool, loggers: dict,
                   inits: dict, plan) -> list[JobResult]:
    """Every job's ensemble members as Ray tasks of their own (member 0's logs the job's
    epochs), assembled into one result per job as `run_pack` makes it: a job fails when one
    of its member tasks does."""
    ref, plan_ref = ray.put(arrays), ray.put(plan)
    remote = task(_members_task, cfg.ray, retry_exceptions=True)
    epochs, t0 = Queue(), time.perf_counter()
    members = [m.index for m in ensemble_members(cfg)]
    refs = {(j.name, i): remote.remote(
                ref, j, cfg, [i], final,
                Reported(f"{j.name} member {k + 1}/{len(members)}", epochs,
                         loggers.get(j.name) if i == members[0] else None),
                inits.get(j.name), plan_ref)
            for j in jobs for k, i in enumerate(members)}
    deadline = Deadline(cfg.ray)
    _watch(list(refs.values()), deadline, epochs, len(refs), cfg.train.epochs,
           cfg.ray, "members")
    out = []
    for job in jobs:
        done, log_errors, node, fails = {}, [], "", []
        for i in members:
            value, fails = _get(refs[(job.name, i)], [job], cfg, deadline)
            if fails:
                break
            done.update(value[0])
            log_errors += value[1]
            node = node or value[2]
        if fails:
            out += fails
            continue
        log = SimpleNamespace(errors=log_errors) if loggers.get(job.name) else None
        result = ensemble_result(job, cfg, done, t0, log)
        result.node = node
        out.append(result)
    return out


def _get(ref, jobs: list[Job], cfg: Config, deadline: Deadline) -> tuple:
    """A training task's value, or (None, its jobs as failed results)."""
    try:
        return ray.get(ref, timeout=deadline.left()), []
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None, [failed(j, deadline.error("its training task")) for j in jobs]
    except ray.exceptions.RayError as e:
        attempts = cfg.ray.max_retries + 1
        # the worker or its node died, every retry: Ray's failure in one line; else its own
        cause = ray_failure(e, f"the training task of {', '.join(j.name for j in jobs)}",
                            attempts)
        if cause is None and isinstance(e, ray.exceptions.RayTaskError):
            cause = e.cause if isinstance(e.cause, BaseException) else e.as_instanceof_cause()
        return None, [failed(j, cause or e, attempts) for j in jobs]


class Reported:
    """A job's `log` callback in its Ray task: each epoch's row goes to the driver's progress
    display (through a Ray queue) and to the job's own logger (the tracking layer's
    EpochLogger, whose `errors` it passes on); within an epoch, `tick` sends the step and the
    running loss at most every `every` seconds."""

    def __init__(self, job: str, queue: Queue, log=None, every: float = 2.0) -> None:
        self.job, self.queue, self.log, self.every = job, queue, log, every
        self.epoch, self.last = 0, 0.0

    def tick(self, step: int, loss) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            with contextlib.suppress(Exception):
                self.queue.put_nowait((self.job, {"epoch": self.epoch, "step": step,
                                                  "train_loss": loss()}))

    @property
    def errors(self) -> list[str]:
        return getattr(self.log, "errors", [])

    def __call__(self, row: dict) -> None:
        self.epoch = row["epoch"] + 1
        with contextlib.suppress(Exception):    # the display must never stop the training
            self.queue.put_nowait((self.job, row))
        if self.log is not None:
            self.log(row)


def _watch(refs: list, deadline: Deadline, epochs: Queue, jobs: int, total: int,
           ray_cfg: RayConfig, unit: str = "jobs") -> None:
    """The driver's display while the packs train: jobs (or members) done, and each job's
    latest epoch. A dead node that leaves the pending tasks (each reserving what `ray_cfg`
    asks of a task) nowhere to run ends the wait with its InfraError."""
    display = Display("training", jobs, unit)
    pending, nodes = list(refs), NodeWatch(ray_cfg)
    try:
        while pending and deadline.left() != 0:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            nodes.check(pending, "training")
            with contextlib.suppress(ray.exceptions.RayError):  # the display's queue died
                while not epochs.empty():                      # with its node: no figures
                    job, row = epochs.get_nowait()
                    display.update(0, job_status(job, row, total))
            display.update(len(refs) - len(pending) - display.done)
    finally:
        display.close()
        with contextlib.suppress(Exception):
            ray.kill(epochs.actor)


def job_status(job: str, row: dict, epochs: int) -> str:
    """A job's latest figures for the driver's line: an epoch's row (validation loss,
    samples/s) or a step's (`step`, running train loss)."""
    if "step" in row:
        return (f"{job} epoch {row['epoch'] + 1}/{epochs} step {row['step']} "
                f"loss {row['train_loss']:.4f}")
    return (f"{job} epoch {row['epoch'] + 1}/{epochs} val {row['val_loss']:.4f} "
            f"{row['samples_per_s']:,.0f}/s")


def _ddp_worker(config: dict) -> JobResult:
    """Ray Train's train_loop_per_worker: the same pack function, the model wrapped in DDP;
    each rank samples its own shard of the window index (see pipeline.training.loop.shard)."""
    import ray.train.torch as rtt  # Ray Train: seconds to import, for DDP only
    arrays = ray.get(config["arrays"])
    job = config["job"]
    rank0 = ray.train.get_context().get_world_rank() == 0
    (result,) = run_pack(arrays, [job], config["cfg"], final=config["final"],
                         logs={job.name: config["log"] if rank0 else None},
                         inits={job.name: config["init"]}, wrap=rtt.prepare_model,
                         plan=ray.get(config["plan"]))
    return result


def train_global_ddp(arrays, job: Job, cfg: Config, final: bool = False, log=None,
                     init=None, plan=None) -> JobResult:
    """Global training with Ray Train's TorchTrainer (DDP over `ray.num_workers` workers, on
    GPUs when the cluster has them and train.device allows). Returns rank 0's JobResult."""
    from ray.train import RunConfig, ScalingConfig  # Ray Train: for DDP only
    from ray.train.torch import TorchTrainer
    connect(cfg.ray)
    use_gpu = cfg.train.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"arrays": ray.put(arrays), "job": job, "cfg": cfg, "final": final,
                           "log": log, "init": init,     # rank 0 alone logs into the job's run
                           "plan": ray.put(plan)},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"{cfg.name}-{job.name}"),
    )
    try:
        result = _fit_within(trainer, Deadline(cfg.ray))
    except Exception as e:  # noqa: BLE001 - Ray Train wraps worker errors in its own types
        return failed(job, worker_error(e))
    return result.return_value


def worker_error(e: BaseException) -> BaseException:
    """The exception a DDP worker raised, out of Ray Train's wrappers (whose message is a
    header line ending in ':' and the workers' tracebacks as text): a WorkerGroupError's
    `worker_failures` (world rank -> the worker's own exception; the lowest rank whose error
    is not one of Ray's, as the other ranks often fail only because it did), a
    ControllerError's `controller_failure`, the `__cause__` of Ray Train's other errors (v1's
    TrainingFailedError) and a RayTaskError's `cause`. `e` itself when nothing is inside: the
    deadline, a preemption, a worker that died (its health check failed), an NCCL hang."""
    for _ in range(8):                              # wrappers in wrappers; never a cycle
        inner = _wrapped(e)
        if inner is None:
            return e
        e = inner
    return e


def _wrapped(e: BaseException) -> BaseException | None:
    def ray_own(x: BaseException) -> bool:
        return type(x).__module__.startswith("ray.")
    if getattr(e, "worker_failures", None):
        return min(e.worker_failures.items(), key=lambda kv: (ray_own(kv[1]), kv[0]))[1]
    if isinstance(getattr(e, "controller_failure", None), BaseException):
        return e.controller_failure
    if isinstance(e, ray.exceptions.RayTaskError):
        return e.cause if isinstance(e.cause, BaseException) else None
    if type(e).__module__.startswith("ray.train") and e.__cause__ is not None:
        return e.__cause__
    return None


def _fit_within(trainer, deadline: Deadline):
    """trainer.fit(), given up on at the deadline (it runs in a thread; the run's Ray workers
    go when the job's Ray session ends)."""
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join(deadline.left())
    if thread.is_alive():
        raise deadline.error("the DDP training run")
    if "error" in box:
        raise box["error"]
    return box["result"]
