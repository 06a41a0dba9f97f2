"""The data stage: input parts → per-part validation and arrays (mapped by a runner) → one
SeriesArrays, a report of every repaired or skipped series, and the window index (planned once,
here; each training job takes its series' windows from it).

The runner maps a function over argument tuples and returns the results in order. The default
runs in this process; `pipeline.execution.RayRunner` fans the parts out as Ray tasks. Both give
identical arrays because the parts, and their order, are planned here.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from pipeline.config import Config
from pipeline.data.calendar import parse_freq
from pipeline.data.io import Part, list_parts, read_columns
from pipeline.data.series import STATUS, SeriesArrays
from pipeline.data.validate import load_part, timestamps_ns
from pipeline.data.windows import WindowPlan, plan_windows
from pipeline.errors import DataError
from pipeline.names import check_groups

Runner = Callable[[Callable, list[tuple]], list]
REPORT_SCHEMA = {"series": pl.String, "file": pl.String, "issue": pl.String,
                 "action": pl.String, "detail": pl.String}


def local_runner(fn: Callable, args: list[tuple]) -> list:
    return [fn(*a) for a in args]


@dataclass
class Prepared:
    arrays: SeriesArrays
    report: pl.DataFrame      # series, file, issue, action, detail
    parts: int
    rows: int
    seconds: float
    plan: WindowPlan          # the windows of every usable series (train, validation, backtest)

    def skipped(self) -> dict[str, int]:
        counts = Counter(self.arrays.status.tolist())
        return {STATUS[k]: v for k, v in sorted(counts.items()) if k != 0}


def infer_freq(part: Part, id_col: str, time_col: str, sample_rows: int = 1_000_000) -> int:
    """The most common positive step between consecutive timestamps of a series."""
    df = pl.from_arrow(read_columns(part, [id_col, time_col])).head(sample_rows)
    if not isinstance(df.schema[time_col], pl.Datetime | pl.Date):
        raise DataError(f"column {time_col!r} in {part.path} has type {df.schema[time_col]}; "
                        "expected a timestamp (Datetime or Date)")
    df = df.with_columns(timestamps_ns(df, part, id_col, time_col))   # out of range: named
    steps = (df.sort(id_col, time_col).select(pl.col(time_col).diff().over(id_col).alias("d"))
             .filter(pl.col("d") > 0)["d"])
    if len(steps) == 0:
        raise DataError(f"cannot infer the frequency from {part.path} (no series with two "
                        "timestamps); set data.freq")
    return int(steps.mode().sort()[0])


def resolve_freq(cfg: Config, parts: list[Part]) -> int:
    if cfg.data.freq:
        try:
            return parse_freq(cfg.data.freq)
        except ValueError as e:
            raise DataError(f"data.freq: {e}") from None
    return infer_freq(parts[0], cfg.data.id_col, cfg.data.time_col)


def prepare(cfg: Config, runner: Runner = local_runner) -> Prepared:
    """Read, validate and regularize the input into SeriesArrays (DESIGN.md §3–4)."""
    t0 = time.perf_counter()
    parts = list_parts(cfg.data.path, cfg.data.rows_per_task)
    if sum(p.num_rows for p in parts) == 0:
        raise DataError(f"input {cfg.data.path!r} is empty: 0 rows in {len(parts)} file(s)")
    freq_ns = resolve_freq(cfg, parts)
    args = [(p, cfg.data, freq_ns, cfg.windows.min_length) for p in parts]
    results = runner(load_part, args)
    arrays = SeriesArrays.concat([r[0] for r in results], labels=[p.label for p in parts])
    rows = [row for r in results for row in r[1]]
    del results
    if arrays.groups is not None:
        check_groups(arrays.groups, cfg.data.group_col)
    report = pl.DataFrame(rows or None, schema=REPORT_SCHEMA)
    return Prepared(arrays, report, len(parts), sum(p.num_rows for p in parts if p.chunk == 0),
                    time.perf_counter() - t0, plan_windows(arrays, cfg.windows))
