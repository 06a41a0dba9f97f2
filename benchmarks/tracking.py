"""Tracking cost with many groups: what logging G per-group jobs costs in each run layout.

    python benchmarks/tracking.py [--groups 1000] [--uri sqlite:///...]

For G groups, the tracking a per-group pipeline run does after training and backtest:
`per_model` (one job run: a per-group Parquet table + summary metrics) against `per_group`
(one child run per group, its training figures, 10-epoch loss history and backtest metrics),
each into a fresh experiment of the same store (a fresh SQLite file by default). Models are not
logged in either (per_model keeps them as files; flavor logging is per promoted group).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import polars as pl
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import tracking  # noqa: E402
from pipeline.config import Config, TrackingConfig  # noqa: E402
from pipeline.tracking import read as registry  # noqa: E402
from pipeline.training.results import JobResult  # noqa: E402


def results(groups: int, rng) -> list[JobResult]:
    return [JobResult("cnn_direct", f"g{g:05d}", True, best_val=float(rng.random()),
                      best_epoch=9, samples_per_s=1000.0, seconds=1.0, n_series=10,
                      history=[{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1),
                                "samples_per_s": 1000.0, "lr": 1e-3} for e in range(10)])
            for g in range(groups)]


def layout(uri: str, child_runs: str, groups: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cfg = Config(name=f"bench_{child_runs}",
                 tracking=TrackingConfig(uri=uri, child_runs=child_runs))
    res = results(groups, rng)
    table = pl.DataFrame({"group": [r.group for r in res],
                          "backtest_mase": rng.random(groups) + 0.5,
                          "seasonal_naive_mase": rng.random(groups) + 1.0,
                          "best_val": [r.best_val for r in res]})
    tr = tracking.Tracker(uri)
    t0 = time.perf_counter()
    tr.start(cfg.name, "bench", {"batch_id": "bench", "cutoff": "bench"}, cfg.flat())
    if child_runs == "per_group":
        for r in res:
            tr.log_job(tr.child("cnn_direct", r.group), r)
        tr.log_group_table(None, "cnn_direct", table, runs=True)
    else:
        tr.log_group_table(tr.child("cnn_direct", "all"), "cnn_direct", table, runs=False)
    tr.finish()
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    board = registry.leaderboard(cfg.name, "mase", uri=uri)
    return {"layout": child_runs, "groups": groups, "runs": len(tr.children) + 1,
            "log_seconds": round(seconds, 2), "leaderboard_seconds":
            round(time.perf_counter() - t1, 2), "leaderboard_rows": len(board),
            "failures": len(tr.failures)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=1000)
    p.add_argument("--uri", help="tracking URI (default: a fresh SQLite file)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.uri or f"sqlite:///{tmp}/bench.db"
        rows = [layout(uri, c, args.groups) for c in ("per_model", "per_group")]
    peak = psutil.Process().memory_info().rss / 2**20
    print(f"{'layout':<10} {'groups':>7} {'runs':>6} {'log s':>8} {'groups/s':>9} "
          f"{'leaderboard s':>14} {'rows':>6}")
    for r in rows:
        print(f"{r['layout']:<10} {r['groups']:>7,} {r['runs']:>6,} {r['log_seconds']:>8.2f} "
              f"{r['groups'] / max(r['log_seconds'], 1e-9):>9,.0f} "
              f"{r['leaderboard_seconds']:>14.2f} {r['leaderboard_rows']:>6,}")
    ratio = rows[1]["log_seconds"] / max(rows[0]["log_seconds"], 1e-9)
    print(f"per_group / per_model logging time: {ratio:.1f}x; RSS {peak:.0f} MiB")
    print(json.dumps({"benchmark": "tracking", "machine": platform.node(),
                      "uri": tracking.redact(uri), "rows": rows,
                      "per_group_over_per_model": round(ratio, 2), "rss_mib": round(peak)}))


if __name__ == "__main__":
    main()
