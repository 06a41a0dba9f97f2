"""Every wait of the tests from one place: how long a service, Ray, a subprocess or a polled
condition may take, scaled by one factor, `PIPELINE_TEST_TIMEOUT_SCALE` (default 1).

The defaults hold on a 2-core machine at load 10 (two other CPU-bound jobs beside the suite):
they are limits for something that never comes, not estimates, so they are generous. A slower
machine sets the factor (e.g. 3) rather than editing a test. Waits poll a condition
(`wait_until`) instead of sleeping a fixed time: they end as soon as what they wait for is there.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
ENV = "PIPELINE_TEST_TIMEOUT_SCALE"

# the limits, in seconds at scale 1
SERVICE = 300         # a service becomes healthy: PostgreSQL, `mlflow server`, moto
COMMAND = 900         # a command or flow run as a subprocess (the job, small settings)
QUICK = 240           # a subprocess that fails at once (bad input) or a short helper
STOP = 60             # a process we stopped (SIGTERM/SIGKILL) is reaped
EVENT = 600           # something a running job records (a finished trial, a task's pid)


def scale() -> float:
    """The factor from the environment (a positive number; 1 when unset or bad)."""
    try:
        value = float(os.environ.get(ENV, "1"))
    except ValueError:
        return 1.0
    return value if value > 0 else 1.0


def scaled(seconds: float) -> float:
    """`seconds` times the factor."""
    return seconds * scale()


def wait_until(predicate: Callable[[], T], seconds: float, what: str,
               every: float = 0.1) -> T:
    """Poll `predicate` every `every` seconds until it returns something truthy (returned), for
    at most `scaled(seconds)`; then an AssertionError naming `what`."""
    limit = scaled(seconds)
    end = time.monotonic() + limit
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {limit:.0f} s ({ENV}={scale():g})")
        time.sleep(every)
