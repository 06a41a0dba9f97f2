"""Parquet in and out on any pyarrow filesystem: list input parts, read one, write atomically."""
from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.uploads import abort_uploads
from pipeline.errors import DataError, InfraError
from pipeline.paths import join, parent
from pipeline.secrets import redact

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
PARTITION_FILE = "part-0.parquet"   # a partition is this one file
TMP_PREFIX = ".tmp-"                # temporary files: dot-files, which dataset readers skip


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


def storage_error(e: OSError, what: str, doing: str = "reading") -> InfraError:
    """An I/O failure of the storage (a network error, an object store's 5xx, a full disk):
    worth retrying, unlike a corrupt file (ArrowInvalid, a DataError). Exit code 1. A full
    disk, a file-size limit or a quota is said as such (pyarrow's own text is longer)."""
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return InfraError(f"storage error {doing} {redact(what)}: {os.strerror(e.errno)} "
                          f"({errno.errorcode[e.errno]}); nothing was replaced")
    return InfraError(f"storage error {doing} {redact(what)}: {type(e).__name__}: "
                      f"{redact(str(e)).splitlines()[0][:300] if str(e) else ''}")


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI such as s3://bucket/key or gs://…"""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise DataError(f"cannot open filesystem for {redact(uri)!r}: {e}") from None
    except OSError as e:
        raise storage_error(e, uri) from None


def list_parts(uri: str, rows_per_task: int) -> list[Part]:
    """The input's Parquet files, sorted by path, each split into chunks of at most
    `rows_per_task` rows (a chunk holds whole series: rows are routed by a hash of the id)."""
    fs, path = filesystem_for(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise storage_error(e, uri) from None
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
    except pa.ArrowInvalid as e:
        raise DataError(f"cannot read input {redact(uri)!r} as Parquet: {e}") from None
    except OSError as e:
        raise storage_error(e, uri) from None
    if not fragments:
        raise DataError(f"input {uri!r} holds no Parquet files")
    parts = []
    for frag in fragments:
        try:
            num_rows = frag.metadata.num_rows
        except pa.ArrowInvalid as e:
            raise DataError(f"Parquet file {frag.path!r} is corrupt or unreadable: {e}") from None
        except OSError as e:
            raise storage_error(e, frag.path) from None
        keys = pads.get_partition_keys(frag.partition_expression)
        n = max(1, math.ceil(num_rows / rows_per_task))
        parts += [Part(_uri(uri, fs, frag.path), num_rows, keys, k, n) for k in range(n)]
    return parts


def _uri(root: str, fs: pafs.FileSystem, path: str) -> str:
    """A part's URI on the root's filesystem: its scheme and its query (an object store's
    `?endpoint_override=…&scheme=http` must reach the task that reads the part)."""
    if "://" not in root:
        return path
    query = root.partition("?")[2]
    return f"{root.split('://', 1)[0]}://{path}" + (f"?{query}" if query else "")


def read_columns(part: Part, columns: list[str]) -> pa.Table:
    """Read `columns` of one part; hive partition keys fill columns missing from the file."""
    fs, path = filesystem_for(part.path)
    try:
        schema = pq.read_schema(path, filesystem=fs)
        in_file = [c for c in columns if c in schema.names]
        table = pq.read_table(path, columns=in_file, filesystem=fs)
    except pa.ArrowInvalid as e:
        raise DataError(f"Parquet file {part.path!r} is corrupt or unreadable: {e}") from None
    except OSError as e:
        raise storage_error(e, part.path) from None
    for col in columns:
        if col not in table.column_names and col in part.partition:
            table = table.append_column(col, pa.repeat(pa.scalar(str(part.partition[col])),
                                                       table.num_rows))
    return table


def file_schema(part: Part) -> pa.Schema:
    fs, path = filesystem_for(part.path)
    try:
        return pq.read_schema(path, filesystem=fs)
    except pa.ArrowInvalid as e:
        raise DataError(f"Parquet file {part.path!r} is corrupt or unreadable: {e}") from None
    except OSError as e:
        raise storage_error(e, part.path) from None


def fault_point(step: str, path: str) -> None:
    """A named step of a commit. The fault tests kill the writing process here
    (`PIPELINE_FAULT_AT=<step>` or `<step>@<part of the path>` in its environment: SIGKILL, as
    a crash or the OOM killer would); otherwise nothing happens."""
    at = os.environ.get("PIPELINE_FAULT_AT")
    if at and at.partition("@")[0] == step and at.partition("@")[2] in path:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(uri: str, write: Callable[[pafs.FileSystem, str], None]) -> None:
    """`write(fs, path)` to a temporary name beside `uri`, then rename over it: readers see the
    old file or the new one, whole, never a part (POSIX rename replaces atomically). Object
    stores publish an object only when its upload completes, so there `write` gets `uri`'s
    own path: the single PUT is the atomic step. Temporary files are dot-files, which every
    Parquet dataset reader skips; crash leftovers are swept by `sweep`. A local file gets
    `file_mode()`, whatever made it."""
    fs, path = filesystem_for(uri)
    parent = os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        try:
            write(fs, path)
        except BaseException:
            abort_uploads(uri, folder=False)    # a failed upload leaves no parts behind
            raise
        fault_point("object-written", path)
        return
    tmp = os.path.join(parent, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        try:
            write(fs, tmp)
        except OSError as e:            # a full disk, a file-size limit: the old file stays
            raise storage_error(e, uri, "writing") from None
        os.chmod(tmp, file_mode())      # a file made by mkstemp (streamed) is 0600
        _fsync(tmp)
        fault_point("tmp-written", path)
        os.replace(tmp, path)
        _fsync(parent)                      # the rename itself survives a power cut
        fault_point("replaced", path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_mode() -> int:
    """The mode of every output file: what `open()` gives a new file, 0666 less the process
    umask (0644 under the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep(folder_uri: str) -> list[str]:
    """Remove the crash leftovers of earlier commits in a local folder: temporary files
    (`.tmp-…`) and the `.old-…` / `.tmp-…` folders of the swap this module used before. Call
    it holding the folder's lock (nobody else is writing there). Returns what it removed."""
    fs, path = filesystem_for(folder_uri)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(path):
        return []
    gone = []
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name.startswith((TMP_PREFIX, ".old-")):
            shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
            gone.append(full)
    return gone


def write_parquet_atomic(table: pa.Table, uri: str) -> None:
    write_atomic(uri, lambda fs, path: pq.write_table(table, path, filesystem=fs))


def write_bytes_atomic(data: bytes, uri: str) -> None:
    def put(fs: pafs.FileSystem, path: str) -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)
    write_atomic(uri, put)


def replace_partition_stream(tables: Iterable[pa.Table], uri: str) -> str:
    """`replace_partition` of the concatenation of `tables`, written as they come (a row
    group each) into a local temporary file, then put in place as one file: a rename on a
    local disk, one upload to an object store (which must not see a partial upload if making
    a later table fails). A reader never sees part of it. Every table must have the first
    one's schema."""
    sweep(uri)
    sweep(parent(uri))
    abort_uploads(uri)
    target = join(uri, PARTITION_FILE)
    fs, path = filesystem_for(target)
    local = isinstance(fs, pafs.LocalFileSystem)
    folder = os.path.dirname(path) if local else None
    if folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".parquet", dir=folder)
    os.close(fd)
    try:
        writer, wrote = None, False
        try:
            for table in tables:
                if writer is None:
                    writer, wrote = pq.ParquetWriter(tmp, table.schema), True
                writer.write_table(table)
            if writer is not None:
                done, writer = writer, None
                done.close()            # its footer: a full disk can refuse this too
        except OSError as e:            # a full disk, a file-size limit: the old file stays
            raise storage_error(e, target, "writing") from None
        finally:
            if writer is not None:      # an error above: close what it opened, quietly
                with contextlib.suppress(OSError):
                    writer.close()
        if not wrote:
            raise ValueError("replace_partition_stream: no table to write")
        write_atomic(target, lambda f, p: os.replace(tmp, p) if local else
                     pafs.copy_files(tmp, p, destination_filesystem=f))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def replace_partition(table: pa.Table, uri: str) -> str:
    """Write `table` as the whole content of partition folder `uri`, replacing what was there,
    in one atomic step: the partition is one file, `part-0.parquet`, replaced by `write_atomic`
    (a rename on a local disk, one PUT on an object store). A reader sees the old partition or
    the new one, never none, half or both. Crash leftovers in the folder and beside it are
    swept first, and on S3 the multipart uploads a killed writer left under it aborted
    (`uploads.abort_uploads`; the caller holds the partition's lock). Returns the file's
    URI."""
    sweep(uri)
    sweep(parent(uri))
    abort_uploads(uri)
    target = join(uri, PARTITION_FILE)
    write_parquet_atomic(table, target)
    return target
