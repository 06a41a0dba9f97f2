"""The pipeline's outputs (DESIGN.md §3): forecasts, backtest predictions and per-series metrics
as Parquet, hive-partitioned `<output.path>/<kind>/job=<config name>/data_end=<data end>/`
(`pipeline.paths.partition`).

A partition is replaced whole and atomically (`pipeline.data.io.replace_partition`), so a rerun
of the same job on the same data leaves one copy. The data end is the latest timestamp of the
input; every row also carries its own series' `cutoff` (last known step).
"""
from __future__ import annotations

import re
import warnings
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipeline import paths
from pipeline.config import Config
from pipeline.data import grid
from pipeline.data.calendar import Freq
from pipeline.data.io import replace_partition, replace_partition_stream, storage_error
from pipeline.data.uploads import abort_uploads
from pipeline.errors import InfraError
from pipeline.secrets import redact

FORECAST_SCHEMA = [("unique_id", pa.string()), ("ds", None), ("cutoff", None),
                   ("step", pa.int16()), ("y_hat", pa.float32())]   # ds, cutoff: as the input
TRAILER = [("model", pa.string()), ("group", pa.string()), ("run_id", pa.string()),
           ("created_at", pa.timestamp("us", tz="UTC"))]


def to_table(cols: dict, run_id: str, freq: Freq, created_at: datetime | None = None
             ) -> pa.Table:
    """Long columns -> an Arrow table with the contract's column order and types; `ds` and
    `cutoff` (grid ordinals in `cols`) as the input held time (`grid.to_arrow`)."""
    n = len(cols["unique_id"]) if cols else 0
    created = created_at or datetime.now(timezone.utc)
    fields, arrays = [], []
    for name, typ in FORECAST_SCHEMA:
        if typ is None:
            arr = grid.to_arrow(cols.get(name, np.zeros(0, np.int64)), freq)
        else:
            arr = pa.array(cols.get(name, np.zeros(0)), type=typ)
        fields.append(pa.field(name, arr.type))
        arrays.append(arr)
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


def frames_table(frames: list[dict], run_id: str, freq: Freq,
                 keys: list[str] | None = None) -> pa.Table:
    """The long column blocks as one Arrow table (each block converted on its own, the blocks
    consumed as they go, so the numpy rows and their Arrow copy are never both whole); a
    column some blocks lack is NaN there, as `backtest.concat_columns` makes it. `keys`: the
    columns (default: every block's), so that chunks of one output share a schema."""
    keys = keys or list(dict.fromkeys(k for f in frames for k in f))
    created, tables = datetime.now(timezone.utc), []
    while frames:
        f = frames.pop(0)
        n = len(next(iter(f.values())))
        tables.append(to_table({k: f[k] if k in f else np.full(n, np.nan, np.float32)
                                for k in keys}, run_id, freq, created))
        del f
    return pa.concat_tables(tables) if tables else to_table({}, run_id, freq, created)


def metrics_table(cols: dict, run_id: str, freq: Freq) -> pa.Table:
    """Per-series metric columns, `cutoff` as the input held time, and the run."""
    base = dict(cols)
    n = len(base["unique_id"])
    base["cutoff"] = grid.to_arrow(base["cutoff"], freq)
    base["run_id"] = np.full(n, run_id, dtype=object)
    return pa.table(base)


def write(cfg: Config, kind: str, end: str, table: pa.Table, flow: str = "run",
          below: dict[str, str] | None = None) -> str:
    """Replace one run's partition of output `kind` (with `below`'s keys under its data end,
    `paths.partition_values`) with `table` in one atomic step; returns where it went.
    `output.format`: `parquet` (a folder per partition holding one file,
    `data.io.replace_partition`) or `delta` (a Delta Lake table per kind, the partition
    replaced by one commit, which also detects a concurrent writer)."""
    if cfg.output.format == "delta":
        return write_delta(paths.table(cfg, kind),
                           paths.partition_values(cfg, kind, end, flow, below), table,
                           cfg.output.delta_retention_hours)
    uri = paths.partition(cfg, kind, end, flow, below)
    replace_partition(table, uri)
    return uri


def write_stream(cfg: Config, kind: str, end: str, tables, flow: str = "run") -> str:
    """`write` of the concatenation of `tables` (an iterable of tables of one schema),
    written as they come: the Parquet partition file is put in place once whole. A Delta
    partition is replaced by one commit of them all."""
    if cfg.output.format == "delta":
        return write(cfg, kind, end, pa.concat_tables(list(tables)), flow)
    uri = paths.partition(cfg, kind, end, flow)
    replace_partition_stream(tables, uri)
    return uri


def write_delta(uri: str, keys: dict[str, str], table: pa.Table,
                retention_hours: int | None = None) -> str:
    """Overwrite the rows of partition `keys` in the Delta table at `uri` (created on first
    use, partitioned by the keys) with `table`: one commit, atomic on local disks and object
    stores alike. A concurrent commit to the same partition fails this one cleanly (nothing of
    it is visible): InfraError, retry later. Then, with `retention_hours`
    (`output.delta_retention_hours`), the files no version of the last that many hours reads
    are vacuumed (`vacuum`)."""
    from deltalake import write_deltalake  # optional: output.format delta only
    from deltalake.exceptions import CommitFailedError, DeltaError
    for k, v in keys.items():
        table = table.append_column(k, pa.repeat(pa.scalar(v, pa.string()), table.num_rows))
    base, options = delta_location(uri)
    predicate = " AND ".join(f"{k} = '{v}'" for k, v in keys.items())
    abort_uploads(paths.join(uri, *(f"{k}={v}" for k, v in keys.items())))   # dead writers'
    try:
        write_deltalake(base, table, mode="overwrite", predicate=predicate,
                        partition_by=list(keys), schema_mode="merge",
                        storage_options=options or None)
    except CommitFailedError as e:
        raise InfraError(f"another writer committed to {redact(base)} ({predicate}) at the "
                         f"same time; nothing of this run was written there ({e})") from None
    except (DeltaError, OSError) as e:
        os_error = delta_os_error(e)
        if os_error is None:
            raise
        raise storage_error(os_error, f"{base} ({predicate})", "writing") from None
    if retention_hours is not None:
        vacuum(base, options, retention_hours)
    return f"{base} ({predicate})"


def delta_os_error(e: Exception) -> OSError | None:
    """The operating system's error under a Delta write's failure: deltalake (Rust) says it
    only in its text, `… File too large (os error 27)`; None when there is none (a schema
    clash, a bad predicate: not the storage's fault)."""
    if isinstance(e, OSError) and e.errno:
        return e
    found = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(found.group(1)), str(e)) if found else None


def vacuum(base: str, options: dict, hours: int) -> list[str]:
    """Delete the files of the Delta table at `base` that no version of the last `hours`
    hours reads (0: every file the latest version does not read); the write stands if this
    fails (a warning). Returns the files removed."""
    from deltalake import DeltaTable
    try:
        return DeltaTable(base, storage_options=options or None).vacuum(
            retention_hours=int(hours), dry_run=False, enforce_retention_duration=False)
    except Exception as e:  # noqa: BLE001 - the commit is done; cleaning up is not essential
        warnings.warn(f"vacuuming the Delta table {redact(base)} failed "
                      f"({type(e).__name__}: {redact(str(e))[:200]}); the write stands",
                      stacklevel=2)
        return []


def delta_location(uri: str) -> tuple[str, dict[str, str]]:
    """A table URI without its query, and the object-store options its query gave pyarrow
    (`?endpoint_override=host:port&scheme=http` -> AWS_ENDPOINT_URL, AWS_ALLOW_HTTP);
    credentials come from the environment."""
    base, _, query = uri.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    options = {}
    if "endpoint_override" in params:
        scheme = params.get("scheme", "https")
        endpoint = params["endpoint_override"]
        options["AWS_ENDPOINT_URL"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
        options["AWS_ALLOW_HTTP"] = "true" if scheme == "http" else "false"
    if "region" in params:
        options["AWS_REGION"] = params["region"]
    return base, options
