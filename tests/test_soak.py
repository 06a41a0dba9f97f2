"""The soak of the nightly flow, short (benchmarks/soak.py, its own `mlflow server`, which it
stops and restarts): two runs with faults chosen in order (the driver SIGKILLed during the
commit, then SIGTERM during training), then a clean run; every check of the soak holds after
each, nothing is lost, no run is left RUNNING. A training worker SIGKILLed by its reported pid is
the soak's third fault kind; its retry is pinned by tests/test_cluster.py and
tests/test_ray_failures.py, so the suite's short soak leaves it to `benchmarks/soak.py`."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from timeouts import COMMAND, scaled

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray
def test_two_faulted_nightly_runs_and_a_clean_one_lose_nothing(tmp_path):
    pytest.importorskip("mlflow")
    kinds = ["commit_kill", "sigterm"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--runs", "2",
                        "--kinds", ",".join(kinds), "--work", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=scaled(4 * COMMAND))
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert figures["runs"] == 3 and figures["faults"] == {k: 1 for k in kinds}
    assert figures["survived"] == 3 and figures["problems"] == []
    assert figures["data_lost"] == 0 and figures["running_left"] == 0
