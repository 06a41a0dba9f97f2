"""Ray's own failures as the pipeline's: a worker or node that died, a task killed for memory,
an object lost, an actor gone. Each becomes an `InfraError` (exit 1: worth retrying) whose
message is one line naming what died and where (node, address, pid, as far as Ray's exception
says), never Ray's multi-line text. A task's own exception (a RayTaskError whose cause is not
one of Ray's) is not Ray's failure: `ray_failure` returns None for it, and the caller handles
it as the task's error. `NodeWatch` finds the tasks a dead node stranded: those no live node
can run, which Ray would otherwise wait for forever.
"""
from __future__ import annotations

import contextlib
import re
import time

import ray
from ray import exceptions as rx

from pipeline.errors import InfraError

# (Ray's exception class, what happened), the first match wins: subclasses before bases
KINDS: list[tuple[type, str]] = [
    (rx.OutOfMemoryError, "was killed by Ray's memory monitor (out of memory)"),
    (rx.NodeDiedError, "died with its node"),
    (rx.LocalRayletDiedError, "died with this machine's Ray node (its raylet)"),
    (rx.WorkerCrashedError, "died: its worker process crashed or was killed"),
    (rx.OwnerDiedError, "lost its data: the object's owner died"),
    (rx.ObjectReconstructionFailedError, "lost its data: an object could not be rebuilt"),
    (rx.ObjectFetchTimedOutError, "lost its data: fetching an object timed out"),
    (rx.ObjectLostError, "lost its data: an object was lost"),
    (rx.ObjectStoreFullError, "failed: Ray's object store is full"),
    (rx.OutOfDiskError, "failed: the node is out of disk"),
    (rx.RayActorError, "died: an actor it used is gone"),
    (rx.TaskUnschedulableError, "cannot be scheduled: no node has its resources"),
    (rx.TaskCancelledError, "was cancelled"),
    (rx.RuntimeEnvSetupError, "failed: its runtime environment could not be set up"),
    (rx.RaySystemError, "failed: Ray system error"),
]
_NODE = re.compile(r"(?:\bnode[ _]?id|\bnode|\bID)[\s:=]+([0-9a-f]{16,})", re.I)
_IP = re.compile(r"\b(?:ip|address)[\s:=]+((?:\d{1,3}\.){3}\d{1,3})", re.I)
_PID = re.compile(r"\bpid[\s:=]+(\d+)", re.I)


def _inner(e: BaseException) -> BaseException:
    """Out of RayTaskError wrappers (a task that failed because one of Ray's failures reached
    it: a lost argument, a dead actor it called), to Ray's own failure inside, if any."""
    for _ in range(8):
        if isinstance(e, rx.RayTaskError) and isinstance(e.cause, BaseException):
            e = e.cause
        else:
            break
    return e


def where(e: BaseException) -> str:
    """Where it died, as far as the exception's text and fields say: `node 1a2b3c4d5e6f,
    10.0.0.2, pid 123`; "" when they say nothing."""
    text = f"{e}"
    found = []
    if m := _NODE.search(text):
        found.append(f"node {m.group(1)[:12]}")
    ip = getattr(e, "ip", None) or ((m := _IP.search(text)) and m.group(1))
    if ip:
        found.append(str(ip))
    pid = getattr(e, "pid", None) or ((m := _PID.search(text)) and m.group(1))
    if pid:
        found.append(f"pid {pid}")
    return ", ".join(found)


def ray_failure(e: BaseException, what: str, attempts: int = 1) -> InfraError | None:
    """`e` (raised by `ray.get`/`ray.wait` on `what`, e.g. "the training task of store_A")
    as one line, or None when it is the task's own exception, not one of Ray's failures.
    `attempts`: how many times Ray ran it (1 + ray.max_retries), said when more than one."""
    inner = _inner(e)
    if not isinstance(inner, rx.RayError) or isinstance(inner, rx.GetTimeoutError):
        return None
    said = next((s for kind, s in KINDS if isinstance(inner, kind)),
                f"failed in Ray ({type(inner).__name__})")
    at = where(inner) or where(e)
    tries = f" after {attempts} attempts (ray.max_retries = {attempts - 1})" \
        if attempts > 1 else ""
    return InfraError(f"{what} {said}{f' ({at})' if at else ''}{tries}; "
                      f"{type(inner).__name__} from Ray")


class NodeWatch:
    """The nodes alive when a stage submitted its tasks, checked while it waits (at most every
    `every` seconds): when one of them has died and no live node has the resources a task
    needs (`ray.task_num_cpus`/`task_num_gpus` of `cfg`), the tasks still pending can never be
    scheduled and Ray would wait for a node forever; `check` then cancels them and raises an
    InfraError naming the dead node(s). A node that died while others can still take the work
    is left to Ray's retries."""

    def __init__(self, cfg, every: float = 5.0) -> None:
        self.every = every                    # cfg: the RayConfig whose tasks are awaited
        need = {"CPU": cfg.task_num_cpus, "GPU": cfg.task_num_gpus}
        self.need = {k: float(v) for k, v in need.items() if v}
        self.start = {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes()
                      if n.get("Alive")}
        self.next = time.monotonic() + every

    def check(self, pending: list, what: str) -> None:
        """Raise when the `pending` tasks (refs) of `what` (e.g. "training") are stranded,
        cancelling them first."""
        if not pending or time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.every
        alive = [n for n in ray.nodes() if n.get("Alive")]
        dead = [k for k in self.start if k not in {n["NodeID"] for n in alive}]
        if not dead or any(all(n.get("Resources", {}).get(r, 0.0) >= q
                               for r, q in self.need.items()) for n in alive):
            return
        nodes = ", ".join(f"node {k[:12]}" + (f" ({self.start[k]})" if self.start[k] else "")
                          for k in dead)
        need = " and ".join(f"{q:g} {r}" for r, q in self.need.items()) or "the resources"
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise InfraError(f"{nodes} died during {what}, and no live node has the {need} a "
                         f"task needs: {len(pending)} task(s) can never run; "
                         "NodeDiedError from Ray")
