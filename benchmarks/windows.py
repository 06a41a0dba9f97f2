"""Data-stage benchmark: read + validate + arrays on Ray, window index, peak memory.

    python benchmarks/windows.py [--series 100000] [--length 500] [--lookback 48] [--no-ray]

Generates the input once (in a child process, cached under --data-dir), then times the data
stage. Peak memory is the sum of PSS (proportional set size: shared pages, the Ray object store
included, counted once) over this process and every descendant (Ray's raylet, GCS and workers),
sampled every 0.1 s. Prints a table, then one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def generate(out: str, n_series: int, length: int, n_files: int) -> None:
    """Random-walk hourly series, n_files Parquet files of whole series; manifest.json holds
    the in-memory (Arrow) bytes of the input columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = np.datetime64("2023-01-01T00", "ns") + np.arange(length) * np.timedelta64(1, "h")
    nbytes = 0
    for f, ids in enumerate(np.array_split(np.arange(n_series), n_files)):
        n = len(ids)
        names = np.char.add("s", np.char.zfill(ids.astype(str), 7))
        y = 100 + np.cumsum(rng.normal(0, 1, (n, length)), axis=1)  # [n, T]
        table = pa.table({"unique_id": np.repeat(names, length), "ds": np.tile(t0, n),
                          "y": y.reshape(-1)})  # [n, T] -> [n * T]
        nbytes += table.nbytes
        pq.write_table(table, os.path.join(out, f"part-{f:04d}.parquet"), row_group_size=1 << 20)
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump({"series": n_series, "length": length, "input_bytes": nbytes}, fh)


class PeakMemory:
    """Samples the PSS of this process tree (or only its children: a job the benchmark
    started) in a thread; `peak` in bytes."""

    def __init__(self, interval: float = 0.1, children_only: bool = False) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.children_only = children_only    # the job's processes, not the benchmark's own
        self.samples: list[tuple[float, int]] = []      # (time.time(), PSS bytes)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [*([] if self.children_only else [me]), *me.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_full_info().pss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            pss = self.sample()
            self.samples.append((time.time(), pss))
            self.peak = max(self.peak, pss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.sample())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=100_000)
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--lookback", type=int, default=48)
    ap.add_argument("--horizon", type=int, default=24)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-ray", action="store_true", help="run the data stage in this process")
    ap.add_argument("--generate-only", action="store_true")
    args = ap.parse_args()
    data = args.data_dir or os.path.join("/tmp", f"bench-windows-{args.series}x{args.length}")
    if args.generate_only:
        return generate(data, args.series, args.length, args.files)
    if not os.path.exists(os.path.join(data, "manifest.json")):  # child: keeps our RSS clean
        subprocess.run([sys.executable, __file__, "--generate-only", "--data-dir", data,
                        "--series", str(args.series), "--length", str(args.length),
                        "--files", str(args.files)], check=True)
    with open(os.path.join(data, "manifest.json")) as fh:
        manifest = json.load(fh)
    print(json.dumps(run(args, data, manifest)))


def run(args, data: str, manifest: dict) -> dict:
    from pipeline import config as C
    from pipeline.data.prepare import local_runner, plan_windows, prepare
    from pipeline.data.scaling import fit_scaling
    from pipeline.data.windows import materialized_bytes
    cfg = C.load(None, [f"data.path={data}", "data.freq=1h", f"windows.lookback={args.lookback}",
                        f"windows.horizon={args.horizon}", "ray.num_cpus=2"])
    with PeakMemory() as mem:
        base = mem.sample()
        t = time.perf_counter()
        if args.no_ray:
            runner, started = local_runner, 0.0
        else:
            from pipeline.execution.ray_train import RayRunner, connect
            runner = RayRunner(cfg.ray)
            runner.started = connect(cfg.ray)
            started = time.perf_counter() - t
        idle = mem.sample()
        t = time.perf_counter()
        prep = prepare(cfg, runner)       # plans the window index too (timed again below)
        t = time.perf_counter() - t
        plan = prep.plan
        t0 = time.perf_counter()
        plan_windows(prep.arrays, cfg.windows)
        t_index = time.perf_counter() - t0
        t_prep = t - t_index                  # read + validate + arrays
        t = time.perf_counter()
        fit_scaling(prep.arrays, plan.cutoffs[-1], cfg.windows.scaling)
        t_scale = time.perf_counter() - t
        if runner is not local_runner:
            runner.__exit__(None, None, None)
    n_win = len(plan.train) + len(plan.val) + sum(len(b) for b in plan.backtest)
    mat = materialized_bytes(n_win, args.lookback, args.horizon)
    inp = manifest["input_bytes"]
    rows = [("series", f"{len(prep.arrays):,}"), ("rows", f"{prep.rows:,}"),
            ("lookback / horizon", f"{args.lookback} / {args.horizon}"),
            ("executor", "local" if args.no_ray else "ray (2 CPUs)"),
            ("ray start s", f"{started:.1f}"),
            ("read+validate+arrays s", f"{t_prep:.1f}"),
            ("rows/s", f"{prep.rows / t_prep:,.0f}"),
            ("window index s", f"{t_index:.2f}"), ("scaling stats s", f"{t_scale:.2f}"),
            ("windows", f"{n_win:,}"),
            ("input columns in memory MiB", f"{inp / 2**20:,.0f}"),
            ("arrays MiB", f"{prep.arrays.nbytes() / 2**20:,.0f}"),
            ("window index MiB", f"{plan.nbytes / 2**20:,.0f}"),
            ("materialized windows MiB", f"{mat / 2**20:,.0f}"),
            ("PSS before start MiB", f"{base / 2**20:,.0f}"),
            ("PSS idle (Ray up) MiB", f"{idle / 2**20:,.0f}"),
            ("peak PSS, all processes MiB", f"{mem.peak / 2**20:,.0f}"),
            ("peak / input columns", f"{mem.peak / inp:.2f}")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:>14}")
    return {"benchmark": "windows", "machine": platform.node(), "cpus": os.cpu_count(),
            "series": len(prep.arrays), "rows": prep.rows, "lookback": args.lookback,
            "horizon": args.horizon, "ray": not args.no_ray, "ray_start_s": round(started, 2),
            "prepare_s": round(t_prep, 2), "rows_per_s": round(prep.rows / t_prep),
            "index_s": round(t_index, 3), "scaling_s": round(t_scale, 3), "windows": n_win,
            "input_bytes": inp, "arrays_bytes": prep.arrays.nbytes(), "index_bytes": plan.nbytes,
            "materialized_bytes": mat, "pss_idle_bytes": idle, "peak_pss_bytes": mem.peak,
            "peak_over_input": round(mem.peak / inp, 3)}


if __name__ == "__main__":
    main()
