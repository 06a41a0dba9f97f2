"""The whole main job at scale: `python -m pipeline run` on generated demo-like data, per
config, with the wall time of each stage and the peak memory of the job's processes.

    python benchmarks/scale.py [--series 20000] [--stores 20] [--run CONFIG[:KEY=VALUE,...]]...

The data is `make-demo-data`'s (hourly, 4-8 weeks per series, covariates, a static category,
defects) with `--series` series in `--stores` stores. Each run trains one epoch of
`--steps` steps, so the training work is fixed and what grows with the series shows: the
data stage, validation, backtest, forecast, writing and tracking (a fresh SQLite file per
run, Ray started by the job). Peak memory is the PSS of the job's process tree (driver, Ray
and its workers; shared pages counted once), not of this benchmark's own process, which made
the data. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.windows import PeakMemory  # noqa: E402
from pipeline.data.demo import make_demo_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ["configs/demo.yaml", "configs/demo.yaml:train.val_max_windows=null",
        "configs/per_group.yaml"]


def parse_wall(text: str) -> tuple[float | None, dict[str, float]]:
    """'wall time 71.4 s (data 18.3, train 16.9)' -> (71.4, {'data': 18.3, 'train': 16.9})."""
    m = re.search(r"^wall time\s+([\d.]+) s(?: \((.*)\))?$", text, re.M)
    if not m:
        return None, {}
    stages = dict(re.findall(r"(\w+) ([\d.]+)", m.group(2) or ""))
    return float(m.group(1)), {k: float(v) for k, v in stages.items()}


def run_one(spec: str, data: str, out: str, steps: int) -> dict:
    config, _, extra = spec.partition(":")
    sets = [s for s in extra.split(",") if s]
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", config,
           "--set", f"data.path={data}", "--set", f"output.path={out}",
           "--set", "train.epochs=1", "--set", f"train.steps_per_epoch={steps}",
           "--set", "evaluate.plots=3", "--set", "tracking.uri=null",
           *[a for s in sets for a in ("--set", s)]]
    stage_log = os.path.join(out + ".stages")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_STAGE_LOG": stage_log}
    env.pop("MLFLOW_TRACKING_URI", None)        # the embedded SQLite file under `out`
    t0 = time.perf_counter()
    with PeakMemory(interval=0.2, children_only=True) as mem:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n")
        raise SystemExit(f"{spec}: exit {proc.returncode}")
    wall, stages = parse_wall(proc.stdout)
    return {"config": config, "set": sets, "wall_s": wall, "process_s": seconds,
            "stages_s": stages, "peak_pss_mib": mem.peak / 2**20,
            "stage_peak_pss_mib": stage_peaks(stage_log, mem.samples)}


def arrow_bytes(path: str) -> int:
    """The input's in-memory Arrow size (every column, the hive key too), read batch by batch
    so the benchmark itself never holds it."""
    import pyarrow.dataset as ds
    return sum(b.nbytes for b in ds.dataset(path, format="parquet",
                                            partitioning="hive").to_batches())


def stage_peaks(stage_log: str, samples: list[tuple[float, int]]) -> dict[str, float]:
    """The peak PSS (MiB) sampled while each stage ran (`$PIPELINE_STAGE_LOG` lines: name,
    start, end), and `other` for samples outside every stage (start-up, reporting)."""
    spans = []
    if os.path.exists(stage_log):
        with open(stage_log) as f:
            spans = [(n, float(a), float(b)) for n, a, b in (ln.split() for ln in f if ln.strip())]
    out: dict[str, float] = {}
    for t, pss in samples:
        name = next((n for n, a, b in spans if a <= t <= b), "other")
        out[name] = max(out.get(name, 0.0), pss / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=20_000)
    ap.add_argument("--stores", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--run", action="append", help=f"CONFIG[:KEY=VALUE,...] (default {RUNS})")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        made = make_demo_data(os.path.join(tmp, "data"), n_series=args.series,
                              n_groups=args.stores, seed=3)
        size = arrow_bytes(made["path"])
        print(f"data: {made['series']:,} series, {made['rows']:,} rows in {args.stores} stores "
              f"({time.perf_counter() - t0:.1f} s to write), {size / 2**20:,.0f} MiB as Arrow",
              flush=True)
        rows = []
        for i, spec in enumerate(args.run or RUNS):
            rows.append(run_one(spec, made["path"], os.path.join(tmp, f"out{i}"), args.steps))
            r = rows[-1]
            print(f"  {spec}: {r['wall_s']} s", flush=True)
    stages = list(dict.fromkeys(k for r in rows for k in r["stages_s"]))
    print(f"\n{'config':<48} {'wall s':>7} " + " ".join(f"{s:>9}" for s in stages)
          + f" {'rows/s':>9} {'peak PSS MiB':>13} {'/ input':>8}")
    for r in rows:
        name = r["config"] + (" " + ",".join(r["set"]) if r["set"] else "")
        print(f"{name:<48} {r['wall_s']:>7.1f} "
              + " ".join(f"{r['stages_s'].get(s, 0.0):>9.1f}" for s in stages)
              + f" {made['rows'] / r['wall_s']:>9,.0f} {r['peak_pss_mib']:>13,.0f}"
              + f" {r['peak_pss_mib'] * 2**20 / size:>8.2f}")
    print("\npeak PSS MiB while each stage ran (driver, Ray and workers)")
    for r in rows:
        print(f"  {r['config']:<46} " + "  ".join(
            f"{k} {v:,.0f}" for k, v in r["stage_peak_pss_mib"].items()))
    print(json.dumps({"benchmark": "scale", "machine": platform.node(),
                      "cpus": os.cpu_count(), "series": made["series"], "rows": made["rows"],
                      "input_arrow_bytes": size,
                      "stores": args.stores, "steps": args.steps, "runs": rows}))


if __name__ == "__main__":
    main()
