"""Parquet in and out on any pyarrow filesystem: list input parts, read one, write atomically."""
from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


@dataclass(frozen=True)
class Part:
    """One unit of input work: a Parquet file, or chunk `chunk` of `n_chunks` of its series."""

    path: str
    num_rows: int
    partition: dict = field(default_factory=dict)  # hive keys of the file's folder
    chunk: int = 0
    n_chunks: int = 1

    @property
    def label(self) -> str:
        if self.n_chunks == 1:
            return self.path
        return f"{self.path} [chunk {self.chunk + 1}/{self.n_chunks}]"


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/key or gs://…"""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise DataError(f"cannot open filesystem for {uri!r}: {e}") from None


def list_parts(uri: str, rows_per_task: int) -> list[Part]:
    """The input's Parquet files, sorted by path, each split into chunks of at most
    `rows_per_task` rows (a chunk holds whole series: rows are routed by a hash of the id)."""
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"input path {uri!r} does not exist")
    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(path, recursive=True)
        files = [f.path for f in fs.get_file_info(selector) if f.type == pafs.FileType.File
                 and f.path.endswith(PARQUET_SUFFIXES)
                 and not any(p.startswith(("_", ".")) for p in f.path[len(path):].split("/"))]
        if not files:
            raise DataError(f"input {uri!r} holds no Parquet files "
                            f"(*{', *'.join(PARQUET_SUFFIXES)})")
    else:
        files = [path]
    try:
        dataset = pads.dataset(files, filesystem=fs, format="parquet",
                               partitioning=pads.HivePartitioning.discover(infer_dictionary=False),
                               partition_base_dir=path if len(files) > 1 or files[0] != path
                               else None)
        fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read input {uri!r} as Parquet: {e}") from None
    if not fragments:
        raise DataError(f"input {uri!r} holds no Parquet files")
    parts = []
    for frag in fragments:
        try:
            num_rows = frag.metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"Parquet file {frag.path!r} is corrupt or unreadable: {e}") from None
        keys = pads.get_partition_keys(frag.partition_expression)
        n = max(1, math.ceil(num_rows / rows_per_task))
        parts += [Part(_uri(uri, fs, frag.path), num_rows, keys, k, n) for k in range(n)]
    return parts


def _uri(root: str, fs: pafs.FileSystem, path: str) -> str:
    if "://" not in root:
        return path
    return f"{root.split('://', 1)[0]}://{path}"


def read_columns(part: Part, columns: list[str]) -> pa.Table:
    """Read `columns` of one part; hive partition keys fill columns missing from the file."""
    fs, path = filesystem_for(part.path)
    try:
        schema = pq.read_schema(path, filesystem=fs)
        in_file = [c for c in columns if c in schema.names]
        table = pq.read_table(path, columns=in_file, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"Parquet file {part.path!r} is corrupt or unreadable: {e}") from None
    for col in columns:
        if col not in table.column_names and col in part.partition:
            table = table.append_column(col, pa.array([part.partition[col]] * table.num_rows))
    return table


def file_schema(part: Part) -> pa.Schema:
    fs, path = filesystem_for(part.path)
    try:
        return pq.read_schema(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"Parquet file {part.path!r} is corrupt or unreadable: {e}") from None


def write_atomic(uri: str, write: Callable[[pafs.FileSystem, str], None]) -> None:
    """`write(fs, path)` to a temporary name beside `uri`, then rename: readers see all or
    nothing. Object stores publish an object only when its upload completes, so there `write`
    gets `uri`'s own path and there is no rename."""
    fs, path = filesystem_for(uri)
    parent = os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            write(fs, tmp)
            fs.move(tmp, path)
        finally:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)
    else:
        write(fs, path)


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    write_atomic(uri, lambda fs, path: pq.write_table(table, path, filesystem=fs))


def write_bytes_atomic(data: bytes, uri: str) -> None:
    def put(fs: pafs.FileSystem, path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)
    write_atomic(uri, put)


def replace_partition(table: pa.Table, uri: str) -> None:
    """Write `table` as the whole content of partition folder `uri`, replacing what was there.

    Local: the new folder is written beside it under a temporary name, then swapped in by two
    renames: a reader sees the old partition or the new one (or, for the instant between the
    renames, none), never half of one; a crash while writing leaves the old one in place.
    Object stores have no rename: the new file is uploaded under a fresh name, then the old
    files are deleted (a reader may briefly see both)."""
    fs, path = filesystem_for(uri)
    parent, name = os.path.dirname(path), os.path.basename(path)
    fs.create_dir(parent, recursive=True)
    token = uuid.uuid4().hex
    if not isinstance(fs, pafs.LocalFileSystem):
        old = [f.path for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]
        pq.write_table(table, f"{path}/part-{token}.parquet", filesystem=fs)
        for f in old:
            fs.delete_file(f)
        return
    tmp = os.path.join(parent, f".tmp-{token}-{name}")
    trash = os.path.join(parent, f".old-{token}")
    os.makedirs(tmp)
    try:
        pq.write_table(table, os.path.join(tmp, "part-0.parquet"))
        if os.path.exists(path):
            os.rename(path, trash)
        os.rename(tmp, path)
    finally:
        for leftover in (tmp, trash):
            if os.path.exists(leftover):
                shutil.rmtree(leftover)
