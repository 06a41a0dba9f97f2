"""Training checkpoints: a job's whole training state after an epoch, so a job that is run
again — a Ray retry after its worker or node died, a rerun of the batch after a crash —
resumes where it stopped instead of starting over. Imports neither Ray nor MLflow.

A checkpoint is read back only when its key matches: a digest of the training config, the
job, its series' data and its starting weights, so a changed config or restated data never
resumes from a stale state. The file is written whole (a temporary name, then a rename; object
stores publish an object only once its upload completes) and removed when the job finishes.
"""
from __future__ import annotations

import hashlib
import io
import math
import time
import warnings
from collections.abc import Callable

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from pipeline.data.io import filesystem_for, write_bytes_atomic
from pipeline.errors import PipelineError


class Checkpoint:
    """The checkpoint file of one job at `uri` (a local path or any pyarrow filesystem URI,
    e.g. s3://…, which every node of a cluster can reach). `key` is computed on first use (it
    hashes the job's data). Saved at the end of an epoch when `minutes` have passed since the
    job started or last saved (0: after every epoch)."""

    def __init__(self, uri: str, key: Callable[[], str] | str, minutes: float = 10.0):
        self.uri, self.minutes = uri, minutes
        self._key = key
        self._last = time.monotonic()

    @property
    def key(self) -> str:
        if callable(self._key):
            self._key = self._key()
        return self._key

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.minutes * 60

    def load(self) -> dict | None:
        """The saved state, or None when there is none or it belongs to other training."""
        try:
            fs, path = filesystem_for(self.uri)
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                return None
            with fs.open_input_stream(path) as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu",
                                   weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint only costs the resume
            return None
        return state if state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        """Write `state`; a failure (full disk, no permission) is warned once and turns
        checkpoints off for this job: it never stops the training."""
        buf = io.BytesIO()
        torch.save({**state, "key": self.key}, buf)
        try:
            write_bytes_atomic(buf.getvalue(), self.uri)
        except (OSError, pa.ArrowException, PipelineError) as e:
            warnings.warn(f"checkpoint {self.uri} not written ({type(e).__name__}: {e}); "
                          "this job goes on without checkpoints", stacklevel=2)
            self.minutes = math.inf
        self._last = time.monotonic()

    def clear(self) -> None:
        """Remove the file (the job finished); a failure leaves a file no other run uses."""
        try:
            fs, path = filesystem_for(self.uri)
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_file(path)
        except (OSError, pa.ArrowException, PipelineError):
            pass


def digest(*parts) -> str:
    """SHA-1 over strings, bytes and buffers (numpy arrays: their bytes)."""
    h = hashlib.sha1()
    for p in parts:
        if p is None:
            h.update(b"\0none")
        elif isinstance(p, str):
            h.update(p.encode())
        else:
            h.update(memoryview(p).cast("B"))
        h.update(b"\0")
    return h.hexdigest()
