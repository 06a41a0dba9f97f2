"""A realistic hourly demo dataset that also exercises validation.

Hourly demand-like series in several stores (groups), written hive-partitioned by store:
daily and weekly seasonality, trends, level shifts, noise, a temperature (past covariate) and a
promotion flag (future covariate) that lifts demand, a static category, unequal lengths ending
at the same hour. A few series carry defects on purpose: gaps in the timestamps, NaN targets,
too short to train, rows out of time order.
"""
from __future__ import annotations

import os
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

END = np.datetime64(datetime(2024, 6, 30, 23), "ns")
HOUR = np.timedelta64(1, "h")
CATEGORIES = ("grocery", "electronics", "apparel")


def _series(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    t = np.arange(n)
    hour_of_day = (t + 24 - n % 24) % 24  # aligned so that the last step is 23:00
    day = 1 + 0.6 * np.sin(2 * np.pi * (hour_of_day - 6) / 24).clip(-0.2)
    week = 1 + 0.25 * np.sin(2 * np.pi * t / 168 + rng.uniform(0, 2 * np.pi))
    level = rng.uniform(20, 200) * (1 + rng.uniform(-0.3, 0.6) * t / n)
    shift = np.where(t > rng.integers(n // 3, n), rng.uniform(0.7, 1.4), 1.0)
    promo = (rng.random(n // 24 + 1) < 0.1).repeat(24)[:n].astype(np.int8)
    temperature = 15 + 8 * np.sin(2 * np.pi * (hour_of_day - 9) / 24) + rng.normal(0, 1.5, n)
    noise = rng.normal(0, 0.08, n)
    y = level * day * week * shift * (1 + 0.3 * promo) * (1 + noise)
    return {"y": np.maximum(y, 0).round(2), "promo": promo, "temperature": temperature.round(1)}


def make_demo_data(out: str, n_series: int = 120, n_groups: int = 4, seed: int = 0,
                   flush_rows: int = 2_000_000, n_regions: int = 0) -> dict:
    """Write the dataset under `out` as out/store=<g>/part-0.parquet; returns what it wrote.
    Each store's file is written as its series are made (a row group every `flush_rows`
    rows) and renamed into place when complete, so a large dataset is never held whole.
    Stores are store_A, store_B, … (store_000, store_001, … above 26). `n_regions` > 0 adds
    a static `region` column (store g in region_<g mod n_regions>), nesting the stores for a
    hierarchy such as `[[], [region], [region, store]]`."""
    rng = np.random.default_rng(seed)
    ids = [f"S{i:04d}" for i in range(n_series)]
    groups = [_store(i % n_groups, n_groups) for i in range(n_series)]
    lengths = rng.integers(24 * 28, 24 * 56, n_series)
    defects = {"too_short": ids[1:4], "gaps": ids[4:7], "nan": ids[7:10], "unsorted": ids[10:11]}
    lengths[1:4] = rng.integers(48, 150, 3)
    stores = {g: _StoreFile(os.path.join(out, f"store={g}", "part-0.parquet"), flush_rows)
              for g in sorted(set(groups))}
    try:
        for i, (sid, g, n) in enumerate(zip(ids, groups, lengths, strict=True)):
            part = _defective(rng, sid, int(n), defects)
            if n_regions > 0:
                part["region"] = np.full(len(part["ds"]), f"region_{i % n_groups % n_regions}")
            stores[g].add(part)
        rows = sum(f.close() for f in stores.values())
    finally:
        for f in stores.values():
            f.abort()
    return {"path": out, "series": n_series, "groups": n_groups, "rows": rows,
            "defects": {k: list(v) for k, v in defects.items()}}


def _store(g: int, n_groups: int) -> str:
    return f"store_{chr(65 + g)}" if n_groups <= 26 else f"store_{g:03d}"


def _defective(rng: np.random.Generator, sid: str, n: int, defects: dict) -> dict:
    """One series' rows, with its defects."""
    cols = _series(rng, n)
    ds = END - (np.arange(n)[::-1]) * HOUR
    keep = np.ones(n, bool)
    if sid in defects["gaps"]:
        keep[rng.choice(np.arange(1, n - 1), 5, replace=False)] = False
    if sid in defects["nan"]:
        cols["y"][rng.choice(n, 3, replace=False)] = np.nan
    order = np.flatnonzero(keep)
    if sid in defects["unsorted"]:
        order = rng.permutation(order)
    return {"unique_id": np.full(len(order), sid), "ds": ds[order], "y": cols["y"][order],
            "temperature": cols["temperature"][order], "promo": cols["promo"][order],
            "category": np.full(len(order), CATEGORIES[int(sid[1:]) % 3])}


class _StoreFile:
    """One store's Parquet file, written row group by row group to a temporary name and
    renamed into place by `close` (`abort` removes an unfinished one)."""

    def __init__(self, path: str, flush_rows: int) -> None:
        self.path, self.flush_rows = path, flush_rows
        self.tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}")
        self.parts: list[dict] = []
        self.pending = self.rows = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, part: dict) -> None:
        self.parts.append(part)
        self.pending += len(part["ds"])
        if self.pending >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        table = pa.table({k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]})
        if self.writer is None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)
        self.rows += table.num_rows
        self.parts, self.pending = [], 0

    def close(self) -> int:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            os.replace(self.tmp, self.path)
        return self.rows

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def make_retail_data(out: str, n_series: int = 60, n_stores: int = 3, seed: int = 0) -> dict:
    """A monthly retail panel (month-start dates, sales >= 0) in `n_stores` stores, written as
    out/store=<g>/part-0.parquet: yearly seasonality, trends and noise, and on purpose three
    series of a year only (short), one with three months missing (a gap), and one that never
    sold (all zero). Returns what it wrote."""
    rng = np.random.default_rng(seed)
    months = np.arange(np.datetime64("2016-01"), np.datetime64("2024-07"))    # 8.5 years
    ids = [f"R{i:03d}" for i in range(n_series)]
    stores = [f"store_{chr(65 + i % n_stores)}" for i in range(n_series)]
    defects = {"short": ids[1:4], "gap": ids[4:5], "zero": ids[5:6]}
    parts: dict[str, list[dict]] = {}
    for sid, store in zip(ids, stores, strict=True):
        t = np.arange(len(months))
        level = rng.uniform(50, 800) * (1 + rng.uniform(-0.2, 0.5) * t / len(t))
        year = 1 + rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * t / 12 + rng.uniform(0, 6))
        y = np.maximum(level * year * (1 + rng.normal(0, 0.08, len(t))), 0).round(0)
        keep = np.ones(len(t), bool)
        if sid in defects["short"]:
            keep[:-12] = False
        elif sid in defects["gap"]:
            keep[50:53] = False
        elif sid in defects["zero"]:
            y[:] = 0.0
        parts.setdefault(store, []).append(
            {"unique_id": [sid] * int(keep.sum()), "ds": months[keep].astype("datetime64[D]"),
             "sales": y[keep], "category": [CATEGORIES[int(sid[1:]) % 3]] * int(keep.sum())})
    rows = 0
    for store, frames in parts.items():
        table = pa.table({k: np.concatenate([np.asarray(f[k]) for f in frames])
                          for k in frames[0]})
        os.makedirs(os.path.join(out, f"store={store}"), exist_ok=True)
        pq.write_table(table, os.path.join(out, f"store={store}", "part-0.parquet"))
        rows += table.num_rows
    return {"path": out, "series": n_series, "groups": n_stores, "rows": rows,
            "defects": defects}
