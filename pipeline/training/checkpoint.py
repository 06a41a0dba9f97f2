"""Training checkpoints: a job's whole training state after an epoch, so a job that is run
again — a Ray retry after its worker or node died, a rerun of the batch after a crash —
resumes where it stopped instead of starting over. Imports neither Ray nor MLflow.

A checkpoint is read back only when its key matches: a digest of the training config, the
job, its series' data and its starting weights, so a changed config or restated data never
resumes from a stale state. The file is written whole (a temporary name, then a rename; object
stores publish an object only once its upload completes) and removed when the job finishes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from pipeline import paths
from pipeline.config import Config
from pipeline.data.io import filesystem_for, write_bytes_atomic
from pipeline.data.series import SeriesArrays
from pipeline.errors import PipelineError
from pipeline.paths import join


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


def training_state(epoch: int, model, opt, sched, device: torch.device, results: list, *,
                   best: dict | None, bad: list[int], stopped: list[bool]) -> dict:
    """Everything the rest of a training loop depends on after `epoch`: weights, optimizer and
    schedule, the torch RNG of the CPU and of the training GPU (dropout, teacher forcing; the
    window order is a function of (seed, epoch, rank)), the best weights, each member's
    early-stopping counters and result so far (`pipeline.training.loop.FitResult`)."""
    return {"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict() if sched is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best": best, "bad": bad, "stopped": stopped,
            "results": [{"history": r.history, "best_val": r.best_val,
                         "best_epoch": r.best_epoch, "samples": r.samples,
                         "seconds": r.seconds, "attempt": r.attempt} for r in results]}


def fits(state: dict, model, members: int) -> bool:
    """`state` is of this pack: as many members, weights of the model's names and shapes
    (checked before anything is loaded: a failed load_state_dict may have copied part of it)."""
    mine, theirs = model.state_dict(), state.get("model", {})
    return len(state.get("results", ())) == members and mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape for k in mine)


# ------------------------------------------------------------------ the checkpoint of a pack

def for_pack(arrays: SeriesArrays, jobs: Sequence, cfg: Config, final: bool, name: str,
             start_weights: bytes, world: int = 1) -> Checkpoint | None:
    """The checkpoint of a pack of jobs (one job, or the groups trained packed):
    `<checkpoint dir>/<backtest|final>/<name>-<settings digest>.ckpt`, keyed by the weights the
    pack starts from (their shapes, seeded initialisation or warm start), the training settings,
    the number of DDP ranks and every member's data (`job_key`); None when checkpoints are
    off."""
    if cfg.train.checkpoint_minutes is None:
        return None
    conf = train_settings(cfg)
    uri = join(paths.checkpoint_root(cfg), "final" if final else "backtest",
               f"{name}-{digest(conf)[:8]}.ckpt")  # refit cutoffs and other configs apart

    def key() -> str:
        common = data_key(arrays)
        return digest(digest(start_weights),
                      *[job_key(arrays, j, conf, final, world, common) for j in jobs])
    return Checkpoint(uri, key, cfg.train.checkpoint_minutes)


def train_settings(cfg: Config) -> str:
    """The settings a job's training depends on (not where it runs, logs or checkpoints)."""
    conf = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k in ("data", "windows", "model", "train")}
    conf["data"].pop("path", None)
    for k in ("checkpoint_minutes", "checkpoint_dir", "device"):
        conf["train"].pop(k, None)
    return json.dumps(conf, sort_keys=True, default=str)


def data_key(arrays: SeriesArrays) -> str:
    """What every model depends on beyond its own series: all series ids and groups (the rows
    of a series or group embedding) and static values (the one-hot columns)."""
    parts = ["\x1f".join(map(str, arrays.ids))]
    if arrays.groups is not None:
        parts.append("\x1f".join(map(str, arrays.groups)))
    parts += ["\x1f".join(map(str, arrays.static[c])) for c in sorted(arrays.static)]
    return digest(*parts)


def job_key(arrays: SeriesArrays, job, conf: str, final: bool, world: int, common: str) -> str:
    """Digest of what one job's training depends on besides its starting weights: the training
    settings, the number of DDP ranks (their shards and schedule), `data_key`, and the job's
    series — values, mask and covariates."""
    series = np.sort(job.series)
    parts = [conf, job.name, str(final), str(world), common,
             np.ascontiguousarray(series.astype(np.int64))]
    for run in np.split(series, np.flatnonzero(np.diff(series) != 1) + 1):  # consecutive runs
        lo, hi = arrays.indptr[run[0]], arrays.indptr[run[-1] + 1]
        for a in (arrays.values, arrays.mask, arrays.past, arrays.future):
            parts.append(None if a is None else np.ascontiguousarray(a[lo:hi]))
    return digest(*parts)
