"""How a test (or benchmarks/soak.py) finds the processes it may kill: its own tasks report
their pids. Never a process found by its name or by a look at the machine's processes."""
from __future__ import annotations

import os
import pathlib


def reporting_pid(fn, path):
    """`fn` as a task body that first appends its worker's pid to `path` (a file the caller
    owns). Only `__name__` is copied: with `functools.wraps` cloudpickle would send the
    original function by reference instead of this wrapper (a closure goes by value, so Ray's
    workers need not import this module)."""
    def reporting(*args, **kwargs):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return fn(*args, **kwargs)
    reporting.__name__ = fn.__name__
    return reporting


def reported(path) -> list[int]:
    """The pids reported to `path` so far."""
    p = pathlib.Path(path)
    return [int(x) for x in p.read_text().split()] if p.exists() else []
