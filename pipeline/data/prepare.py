"""The data stage: input parts → per-part validation and arrays (mapped by a runner) → one
SeriesArrays, a report of every repaired or skipped series, and the window index (planned once,
here; each training job takes its series' windows from it).

The runner maps a function over argument tuples and returns the results in order. The default
runs in this process; `pipeline.execution.ray_train.RayRunner` fans the parts out as Ray tasks. Both
give identical arrays because the parts, and their order, are planned here.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.config import Config
from pipeline.config.recipes import after_load, before_load, resolve_threads
from pipeline.data import grid
from pipeline.data.calendar import Freq, parse_freq
from pipeline.data.io import Part, file_schema, list_parts, read_columns
from pipeline.data.loader import recent_steps
from pipeline.data.series import STATUS, SeriesArrays, season_of
from pipeline.data.validate import check_columns, load_part, timestamps_ns
from pipeline.data.windows import WindowPlan, plan_windows
from pipeline.errors import DataError
from pipeline.names import check_groups
from pipeline.progress import Display

Runner = Callable[[Callable, list[tuple]], list]
REPORT_SCHEMA = {"series": pl.String, "file": pl.String, "issue": pl.String,
                 "action": pl.String, "detail": pl.String}


def local_runner(fn: Callable, args: list[tuple], verb: str = "reading",
                 unit: str = "files") -> list:
    display = Display(verb, len(args), unit)
    out = []
    for a in args:
        out.append(fn(*a))
        display.update(1)
    display.close()
    return out


@dataclass
class Prepared:
    arrays: SeriesArrays
    report: pl.DataFrame      # series, file, issue, action, detail
    parts: int
    rows: int
    seconds: float
    plan: WindowPlan | None   # the windows of every usable series (train, validation,
                              # backtest), once `resolve`d
    cfg: Config | None = None  # the config resolved for this data (`recipe: auto`)
    recipe: dict | None = None  # what the recipe chose (dotted key -> value)
    levels: object = None     # data.hierarchy: the aggregated series' Levels
                              # (`pipeline.stages.levels`; the arrays hold them after the bottom)

    def skipped(self) -> dict[str, int]:
        counts = Counter(self.arrays.status.tolist())
        return {STATUS[k]: v for k, v in sorted(counts.items()) if k != 0}


def check_time_types(parts: list[Part], time_col: str) -> None:
    """Every file holds `time_col` in one kind (Datetime, Date or integer steps) and one time
    zone (or none); else an error naming two files that differ. Reads schemas only."""
    seen: dict[tuple, str] = {}
    for p in parts:
        if p.chunk or time_col not in (schema := file_schema(p)).names:
            continue
        t = pl.from_arrow(schema.empty_table().select([time_col])).schema[time_col]
        key = (grid.time_kind(t), grid.zone(t))
        seen.setdefault(key, p.path)
        if len(seen) > 1:
            (a, pa_), (b, pb) = list(seen.items())[:2]
            raise DataError(f"files disagree on column {time_col!r}: {pa_} holds "
                            f"{_kind(a)}, {pb} holds {_kind(b)}; one input holds one kind of "
                            "timestamp in one time zone")


def _kind(key: tuple) -> str:
    kind, tz = key
    return f"{kind} ({tz})" if tz else (f"{kind} (naive)" if kind == "datetime" else str(kind))


def resolve_freq(cfg: Config, parts: list[Part], sample_rows: int = 1_000_000) -> Freq:
    """`data.freq` with what the data says for the rest (time zone, kind, time of day, month
    start or end, weekday), or the frequency inferred from the first file's sample."""
    id_col, time_col = cfg.data.id_col, cfg.data.time_col
    check_columns(parts[0], cfg.data)
    df = pl.from_arrow(read_columns(parts[0], [id_col, time_col])).head(sample_rows)
    if grid.time_kind(df.schema[time_col]) is None:
        raise DataError(f"column {time_col!r} in {parts[0].path} has type "
                        f"{df.schema[time_col]}; expected a timestamp (Datetime or Date) or "
                        "an integer step")
    if grid.time_kind(df.schema[time_col]) != "int":
        df = df.with_columns(timestamps_ns(df, parts[0], id_col, time_col).alias("_ns"))
    try:
        found = grid.infer(df.drop("_ns", strict=False), id_col, time_col)
    except grid.MixedFrequency as e:
        raise DataError(f"{parts[0].path}: {e}") from None
    except ValueError:
        found = None
    if not cfg.data.freq:
        if found is None:
            raise DataError(f"cannot infer the frequency from {parts[0].path} (no series with "
                            "two timestamps); set data.freq")
        return found
    try:
        freq = parse_freq(cfg.data.freq)
    except ValueError as e:
        raise DataError(f"data.freq: {e}") from None
    return grid.complete(freq, df, time_col, found)


def prepare(cfg: Config, runner: Runner = local_runner) -> Prepared:
    """`read` then `resolve`: the input as arrays, the config resolved for them and the
    window plan, in one call (the flows take the two steps apart)."""
    return resolve(read(cfg, runner))


def read(cfg: Config, runner: Runner = local_runner) -> Prepared:
    """Read, validate and regularize the input into SeriesArrays (DESIGN.md §3–4), with the
    bounds the recipe sets before any data is read (`config.recipes.before_load`); nothing
    resolved for the data yet (`resolve`), no window plan."""
    t0 = time.perf_counter()
    cfg = before_load(cfg)
    parts = list_parts(cfg.data.path, cfg.data.rows_per_task)
    if sum(p.num_rows for p in parts) == 0:
        raise DataError(f"input {cfg.data.path!r} is empty: 0 rows in {len(parts)} file(s)")
    check_time_types(parts, cfg.data.time_col)
    freq = resolve_freq(cfg, parts)
    inferred_from = None if cfg.data.freq else parts[0].path
    args = [(p, cfg.data, freq, cfg.windows, inferred_from) for p in parts]
    results = runner(load_part, args)
    arrays = SeriesArrays.concat([r[0] for r in results], labels=[p.label for p in parts])
    rows = [row for r in results for row in r[1]]
    del results
    if arrays.groups is not None:
        check_groups(arrays.groups, cfg.data.group_col)
    report = pl.DataFrame(rows or None, schema=REPORT_SCHEMA)
    return Prepared(arrays, report, len(parts), sum(p.num_rows for p in parts if p.chunk == 0),
                    time.perf_counter() - t0, None, cfg)


def resolve(data: Prepared) -> Prepared:
    """The config for this data — `recipe: auto` sized from the trainable series' lengths and
    season (`config.recipes.after_load`), `train.threads: auto` for where training runs,
    `window_recent`'s centre — and the window plan under it: `Prepared.cfg`, the config the run
    logs and its stages use."""
    t0 = time.perf_counter()
    arrays, cfg = data.arrays, data.cfg
    cfg, chosen = after_load(cfg, arrays.lengths[arrays.status == 0], season_of(cfg, arrays),
                             arrays.freq.auto_features())
    cfg = resolve_threads(cfg)
    cfg = resolve_recent_steps(cfg, arrays)
    cfg = resolve_clip(cfg, arrays)
    report = data.report
    if chosen:
        report = pl.DataFrame(padded_rows(report.to_dicts(), arrays, cfg.windows) or None,
                              schema=REPORT_SCHEMA)
    return dataclasses.replace(data, report=report, plan=plan_windows(arrays, cfg.windows),
                               cfg=cfg, recipe=chosen,
                               seconds=data.seconds + time.perf_counter() - t0)


def resolve_recent_steps(cfg: Config, arrays: SeriesArrays) -> Config:
    """`windows.recent_steps` fixed where `window_recent` leaves it to the season: a weekly
    season follows the median length (52 from two years of history, else 1), so a champion
    forecasting longer data later would otherwise centre its windows on another span than it
    was trained with (`champion_config` keeps the champion's windows section)."""
    if cfg.windows.scaling != "window_recent" or cfg.windows.recent_steps is not None:
        return cfg
    out = dataclasses.replace(cfg, windows=dataclasses.replace(
        cfg.windows, recent_steps=recent_steps(arrays, cfg), lookback_horizons=None))
    out.explicit = cfg.explicit
    return out


def padded_rows(rows: list[dict], arrays: SeriesArrays, windows) -> list[dict]:
    """The report's left-padded rows again for a lookback the recipe shortened after the parts
    were read: rows of series now long enough dropped, the others' detail rewritten."""
    need = windows.required_length
    length = dict(zip(map(str, arrays.ids.tolist()), arrays.lengths.tolist(), strict=True))
    out = []
    for row in rows:
        if row["action"] == "padded":
            n = length[row["series"]]
            if n >= need:
                continue
            row = {**row, "detail": f"{n} steps < {need} (lookback + horizon + backtest): "
                                    "windows left-padded"}
        out.append(row)
    return out


def resolve_clip(cfg: Config, arrays: SeriesArrays) -> Config:
    """`output.clip_at_zero: auto` as true when every observed value of the input is >= 0
    (sales, counts, demand), else false."""
    if cfg.output.clip_at_zero != "auto":
        return cfg
    observed = arrays.values[arrays.mask.astype(bool)]
    clip = bool(len(observed) and (observed[np.isfinite(observed)] >= 0).all())
    out = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, clip_at_zero=clip))
    out.explicit = cfg.explicit
    return out
