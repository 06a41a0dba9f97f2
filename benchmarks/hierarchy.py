"""Hierarchies (issue #30): `run` on a hierarchical panel, then every reconciliation method on
the same base forecasts of its backtest: seconds, peak memory, and per-level MASE of the base
forecasts against each method's.

    python benchmarks/hierarchy.py [--series 120] [--epochs 10] [--steps 40] [--out DIR]

The panel is the demo data (`pipeline.data.demo`, hourly, `--series` bottom series in four
stores) with `data.hierarchy: [[], [store]]`; the run is configs/demo.yaml with Ray, tracking
and the statistical comparators off. Each method is scored by
`pipeline.stages.reconciled.level_metrics` on the run's backtest windows (the residuals of
MinTrace from those windows too); seconds and the peak of Python-tracked memory (numpy's
arrays included) are of that scoring: every backtest cutoff reconciled. The last line is one
JSON object with every figure. Not a test: the run trains (minutes at the default sizes on two
cores; `--epochs 1 --steps 2` for a dry run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.cli import execute  # noqa: E402
from pipeline.config.hierarchy import METHODS  # noqa: E402
from pipeline.data.demo import make_demo_data  # noqa: E402
from pipeline.forecasting.backtest import concat_columns  # noqa: E402
from pipeline.stages import reconciled as R  # noqa: E402


def run_demo(out: str, series: int, epochs: int, steps: int):
    """The demo panel written under `out`, and the finished `run` batch over it."""
    data = os.path.join(out, "data")
    make_demo_data(data, n_series=series, seed=0)
    b = execute(["run", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
                 "--set", f"data.path={data}", "--set", f"output.path={out}/outputs",
                 "--set", "data.hierarchy=[[], [store]]", "--set", "ray.enabled=false",
                 "--set", "tracking.enabled=false", "--set", "evaluate.comparators=[]",
                 "--set", f"train.epochs={epochs}", "--set", f"train.steps_per_epoch={steps}"])
    if b.exit_code != 0:
        sys.exit(f"the run failed (exit code {b.exit_code})")
    return b


def score_methods(b) -> list[dict]:
    """Per method: seconds, peak MiB and the per-level base and reconciled scores."""
    o, cfg = b.outcome, b.cfg
    rows = o.forecast.rows()                    # the bottom's, read back; the levels' kept
    cols = concat_columns([{k: f[k] for k in ("unique_id", "model")}
                           for f in (rows, o.forecast.levels)])
    slots = R.backtest_slots(o.data.arrays, cfg, o.scored.backtest.blocks,
                             R.published_models(cols, cfg.windows.horizon))
    out = []
    for method in METHODS:
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            table = R.level_metrics(o.data, cfg, slots, method)
        except Exception as e:  # a method the panel cannot take: say why, go on
            table, error = None, f"{type(e).__name__}: {e}"
        else:
            error = None
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        out.append({"method": method, "seconds": round(seconds, 3), "peak_mib": round(peak, 1),
                     "error": error,
                     "levels": None if table is None else table.to_dicts()})
    return out


def show(results: list[dict]) -> None:
    first = next(r for r in results if r["levels"])
    levels = list(dict.fromkeys(row["level"] for row in first["levels"]))
    base = {row["level"]: row["mase"] for row in first["levels"] if row["forecast"] == "base"}
    print(f"{'method':<32} {'s':>7} {'MiB':>7} " + " ".join(f"{lv[:12]:>12}" for lv in levels))
    print(f"{'base (MASE)':<32} {'':>7} {'':>7} " + " ".join(f"{base[lv]:>12.4f}"
                                                           for lv in levels))
    for r in results:
        if r["levels"] is None:
            print(f"{r['method']:<32} {r['seconds']:>7.2f} {r['peak_mib']:>7.1f} "
                  f"{r['error'][:60]}")
            continue
        rec = {row["level"]: row["mase"] for row in r["levels"] if row["forecast"] ==
               "reconciled"}
        print(f"{r['method']:<32} {r['seconds']:>7.2f} {r['peak_mib']:>7.1f} "
              + " ".join(f"{rec[lv]:>12.4f}" for lv in levels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", type=int, default=120)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=40, help="train.steps_per_epoch")
    p.add_argument("--out", default=None, help="default: a temporary folder")
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="hierarchy-bench-")
    t0 = time.perf_counter()
    b = run_demo(out, a.series, a.epochs, a.steps)
    run_s = time.perf_counter() - t0
    results = score_methods(b)
    c = b.outcome.forecast.coherence
    print(f"\nrun {run_s:.1f} s; reconciled in the run with {c.method_used} in "
          f"{c.seconds:.2f} s; backtest MASE per level:")
    show(results)
    print(json.dumps({"series": a.series, "epochs": a.epochs, "run_seconds": round(run_s, 1),
                      "methods": results}))


if __name__ == "__main__":
    main()
