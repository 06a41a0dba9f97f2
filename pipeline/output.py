"""The pipeline's outputs (DESIGN.md §3): forecasts, backtest predictions and per-series metrics
as Parquet, hive-partitioned `<output.path>/<kind>/job=<config name>/cutoff=<data end>/`
(`pipeline.paths.partition`).

A partition is replaced whole and atomically (`pipeline.data.io.replace_partition`), so a rerun
of the same job on the same data leaves one copy. The data end is the latest timestamp of the
input; every row also carries its own series' `cutoff` (last known step).
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline.data.io import replace_partition

FORECAST_SCHEMA = [("unique_id", pa.string()), ("ds", pa.timestamp("ns")),
                   ("cutoff", pa.timestamp("ns")), ("step", pa.int16()),
                   ("y_hat", pa.float32())]
TRAILER = [("model", pa.string()), ("group", pa.string()), ("run_id", pa.string()),
           ("created_at", pa.timestamp("us", tz="UTC"))]


def to_table(cols: dict, run_id: str, created_at: datetime | None = None) -> pa.Table:
    """Long columns -> an Arrow table with the contract's column order and types."""
    n = len(cols["unique_id"]) if cols else 0
    created = created_at or datetime.now(timezone.utc)
    fields, arrays = [], []
    for name, typ in FORECAST_SCHEMA:
        fields.append(pa.field(name, typ))
        arrays.append(pa.array(cols.get(name, np.zeros(0)), type=typ))
    for name in sorted(k for k in cols if k.startswith("q_")) + (["y"] if "y" in cols else []):
        fields.append(pa.field(name, pa.float32()))
        arrays.append(pa.array(cols[name], type=pa.float32()))
    extra = [k for k in cols if k not in {f.name for f in fields} | {t[0] for t in TRAILER}]
    for name in extra:  # per-series metric columns and the like
        arr = pa.array(cols[name])
        fields.append(pa.field(name, arr.type))
        arrays.append(arr)
    for name, typ in TRAILER:
        value = {"run_id": run_id, "created_at": created}.get(name)
        arr = (pa.array(cols[name], type=typ) if name in cols
               else pa.repeat(pa.scalar(value, type=typ), n))  # no n-long Python list
        fields.append(pa.field(name, typ))
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def metrics_table(cols: dict, run_id: str) -> pa.Table:
    base = dict(cols)
    n = len(base["unique_id"])
    base["run_id"] = np.full(n, run_id, dtype=object)
    return pa.table(base)


def write(uri: str, table: pa.Table) -> str:
    """Replace partition folder `uri` (`paths.partition`) with `table`, atomically."""
    replace_partition(table, uri)
    return uri
