"""The soak of the nightly flow, short (benchmarks/soak.py, its own `mlflow server`, which it
stops and restarts): three runs with faults chosen in order (a training worker SIGKILLed by the
pid its task reported, the driver SIGKILLed during the commit, SIGTERM), then a clean run; every
check of the soak holds after each, nothing is lost, no run is left RUNNING."""
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
def test_three_faulted_nightly_runs_and_a_clean_one_lose_nothing(tmp_path):
    pytest.importorskip("mlflow")
    kinds = ["worker_kill", "commit_kill", "sigterm"]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--runs", "3",
                        "--kinds", ",".join(kinds), "--work", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=scaled(4 * COMMAND))
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert figures["runs"] == 4 and figures["faults"] == {k: 1 for k in kinds}
    assert figures["survived"] == 4 and figures["problems"] == []
    assert figures["data_lost"] == 0 and figures["running_left"] == 0
