"""M4 Hourly: the pipeline's networks and recipe against the competition's published results.

    python benchmarks/m4.py [--data ../shared/data/m4] [--configs configs/m4_gru.yaml ...]

By default: each network alone (GRU, causal CNN, MLP: `configs/m4_{gru,cnn,mlp}.yaml`) and the
recipe's ensemble (`configs/m4_auto.yaml`, `recipe: auto` sizes the model); statsforecast's
AutoETS and AutoTheta (fit on the last 240 points) are scored beside them.

Converts the wide CSVs to the pipeline's long Parquet (a regular hourly index ending at the same
hour for every series: M4 gives no timestamps), runs the pipeline's data stage and final
training (early stopping on the last `windows.val_size` steps of the training part only: the
test part is never seen), forecasts h = 48, and scores with the competition's sMAPE, MASE
(m = 24) and OWA against Naive2. `--validation` scores on the last 48 hours of each training part
instead (the test CSV is not read): the split on which the recipe's choices were compared.
Prints the rows next to the published ones (test part only), then one JSON line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config as C  # noqa: E402
from pipeline.evaluation import metrics as E  # noqa: E402

PUBLISHED = {"Naive2": (18.383, 2.395, 1.000), "Seasonal naive": (13.912, 1.193, 0.627),
             "Theta": (18.138, 2.455, 1.006), "M4 MLP benchmark": (13.842, 2.607, 0.921),
             "M4 RNN benchmark": (14.698, 3.048, 1.036),
             "CNN entry (Trotta)": (14.006, 1.213, 0.634),
             "ES-RNN (Smyl, winner)": (9.328, 0.893, 0.440)}
H, M = 48, 24


def read_wide(path: str) -> dict[str, np.ndarray]:
    out = {}
    with open(path, newline="") as fh:
        rows = csv.reader(fh)
        next(rows)
        for row in rows:
            out[row[0]] = np.array([float(v) for v in row[1:] if v != ""])
    return out


def write_long(train: dict[str, np.ndarray], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    end = np.datetime64("2017-12-31T23", "ns")
    ids, ds, ys = [], [], []
    for sid, y in train.items():
        ids.append(np.full(len(y), sid))
        ds.append(end - np.arange(len(y))[::-1] * np.timedelta64(1, "h"))
        ys.append(y)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"unique_id": np.concatenate(ids), "ds": np.concatenate(ds),
                             "y": np.concatenate(ys)}), path)


def score(names: list[str], train, test, forecasts: dict[str, np.ndarray]) -> tuple:
    y = np.stack([test[n][:H] for n in names])
    yhat = np.stack([forecasts[n] for n in names])
    scale = E.mase_scale([train[n] for n in names], M)
    return float(np.mean(E.smape(y, yhat))), float(np.nanmean(E.mase(y, yhat, scale)))


def run_config(path: str, data: str, out: str, sets=(), use_ray: bool = False
               ) -> tuple[dict[str, np.ndarray], float, dict]:
    """Prepare, train the final model and forecast, in this process or (`use_ray`) with the
    training on a local Ray instance (an ensemble's members as tasks of their own on a CPU);
    CPU seconds of this process and, with Ray, of every process it started."""
    from pipeline.data.prepare import prepare
    from pipeline.forecasting.final import final_forecast
    from pipeline.training.jobs import run_jobs_locally
    from pipeline.training.plan import plan_jobs, plan_packs
    cfg = C.load(path, [f"data.path={data}", f"output.path={out}",
                        f"ray.enabled={str(use_ray).lower()}", *sets])
    t0 = time.process_time()
    w0 = time.perf_counter()
    prep = prepare(cfg)
    cfg = prep.cfg or cfg                          # `recipe: auto` resolved for the data
    arrays = prep.arrays
    jobs = plan_jobs(arrays, cfg)
    print(f"{path}: training {cfg.model.name} on {len(arrays)} series"
          + (f", {cfg.model.ensemble.members} members" if cfg.model.ensemble.members > 1 else ""),
          file=sys.stderr, flush=True)
    if use_ray:
        import ray

        from pipeline.execution.ray_train import train
        results = train(arrays, plan_packs(jobs, cfg), cfg, final=True)
        workers = children_cpu()                   # before Ray ends its processes
        ray.shutdown()
    else:
        results, workers = run_jobs_locally(arrays, jobs, cfg, final=True, progress=True), 0.0
    cols = final_forecast(arrays, jobs, {r.name: r.model() for r in results if r.ok}, cfg)
    cpu, wall = time.process_time() - t0 + workers, time.perf_counter() - w0
    fc = {}
    for sid in np.unique(cols["unique_id"]):
        rows = cols["unique_id"] == sid
        fc[str(sid)] = cols["y_hat"][rows][np.argsort(cols["step"][rows])]
    r = results[0]
    info = {"config": path, "model": cfg.model.name, "cpu_s": round(cpu, 1),
            "wall_s": round(wall, 1), "epochs": len(r.history), "best_epoch": r.best_epoch,
            "best_val": r.best_val, "samples_per_s": round(r.samples_per_s),
            "skipped": int((arrays.status != 0).sum()), "members": cfg.model.ensemble.members,
            "recipe": prep.recipe or None, "ray": use_ray, "threads": cfg.train.threads}
    return fc, cpu, info


def children_cpu() -> float:
    """User + system CPU seconds of this process's living descendants (Ray's processes)."""
    import psutil
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--data", default=os.path.join(here, "..", "shared", "data", "m4"))
    ap.add_argument("--configs", nargs="+", default=["configs/m4_gru.yaml",
                                                     "configs/m4_cnn.yaml",
                                                     "configs/m4_mlp.yaml",
                                                     "configs/m4_auto.yaml"])
    ap.add_argument("--work", default="/tmp/m4-bench")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU time = wall)")
    ap.add_argument("--comparators", nargs="*", default=["auto_ets", "auto_theta"],
                    help="statsforecast models scored beside the pipeline (none: --comparators)")
    ap.add_argument("--comparator-history", type=int, default=240,
                    help="fit each comparator on at most the last N points (10 seasons)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every config (e.g. train.epochs=2)")
    ap.add_argument("--ray", action="store_true",
                    help="train on a local Ray instance (members as tasks, a thread each)")
    ap.add_argument("--validation", action="store_true",
                    help="score on each training part's last 48 hours (the test part unread): "
                         "how recipe choices are made without the test part")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    train = read_wide(os.path.join(args.data, "Hourly-train.csv"))
    if args.validation:                # the training part's last 48 hours play the test part
        test = {k: v[-H:] for k, v in train.items()}
        train = {k: v[:-H] for k, v in train.items()}
    else:
        test = read_wide(os.path.join(args.data, "Hourly-test.csv"))
    names = sorted(train)
    long_path = os.path.join(args.work, "hourly", "train.parquet")
    write_long(train, long_path)
    hist = [train[n] for n in names]
    base = {"Naive2": dict(zip(names, E.naive2(hist, H, M), strict=True)),
            "Seasonal naive": dict(zip(names, E.seasonal_naive(hist, H, M), strict=True))}
    rows = {k: score(names, train, test, v) for k, v in base.items()}
    s2, m2 = rows["Naive2"]
    infos = []
    if args.comparators:
        from pipeline.evaluation import comparators
        w0 = time.perf_counter()
        got = comparators.forecast([h[-args.comparator_history:] for h in hist], H, M,
                                   args.comparators)
        seconds = time.perf_counter() - w0
        for name in args.comparators:
            label = {"auto_ets": "AutoETS", "auto_theta": "AutoTheta",
                     "auto_arima": "AutoARIMA",
                     "dynamic_theta": "DynOptTheta"}[name] + " (statsforecast)"
            rows[label] = score(names, train, test, dict(zip(names, got.columns[name],
                                                             strict=True)))
        infos.append({"model": "+".join(args.comparators), "wall_s": round(seconds, 1),
                      "history": args.comparator_history, "fallbacks": len(got.fallbacks)})
        print(f"comparators {args.comparators}: {seconds:.1f} s, {len(got.fallbacks)} "
              "fallbacks", file=sys.stderr, flush=True)
    for path in args.configs:
        fc, cpu, info = run_config(path, os.path.dirname(long_path), args.work, args.set,
                                   args.ray)
        rows[f"pipeline {info['model']} ({os.path.basename(path)})"] = score(names, train,
                                                                             test, fc)
        infos.append(info)
    print(f"\n{'method':<44} {'sMAPE':>8} {'MASE':>7} {'OWA':>7}   published")
    for name, (s, m) in rows.items():
        pub = None if args.validation else PUBLISHED.get(name)
        pub_text = f"{pub[0]:.3f} / {pub[1]:.3f} / {pub[2]:.3f}" if pub else ""
        print(f"{name:<44} {s:>8.3f} {m:>7.3f} {E.owa(s, m, s2, m2):>7.3f}   {pub_text}")
    for name, pub in PUBLISHED.items():
        if name not in rows and not args.validation:
            print(f"{name + ' (published)':<44} {pub[0]:>8.3f} {pub[1]:>7.3f} {pub[2]:>7.3f}")
    for info in infos:
        if "cpu_s" not in info:
            print(f"  {info['model']}: {info['wall_s']} s wall (last {info['history']} points)")
            continue
        print(f"  {info['model']}: {info['cpu_s']} s CPU, {info['wall_s']} s wall, "
              f"{info['epochs']} epochs (best {info['best_epoch'] + 1}), "
              f"{info['samples_per_s']:,} samples/s")
    print(json.dumps({"benchmark": "m4_hourly_validation" if args.validation else "m4_hourly",
                      "machine": platform.node(),
                      "cpus": os.cpu_count(),
                      "rows": {k: {"smape": s, "mase": m, "owa": E.owa(s, m, s2, m2)}
                               for k, (s, m) in rows.items()}, "runs": infos}))


if __name__ == "__main__":
    main()
