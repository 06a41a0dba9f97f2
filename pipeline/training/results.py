"""What a training job returns (`JobResult`: its model as a spec and weights, its history and
figures, or its error), made from what it trained, an ensemble's from every member's."""
from __future__ import annotations

import io
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pipeline.config import Config
from pipeline.data.io import write_bytes_atomic
from pipeline.errors import InfraError
from pipeline.models import model_from_spec, save_model
from pipeline.models.ensemble import Ensemble, Member, ensemble_members
from pipeline.training.loop import FitResult

if TYPE_CHECKING:
    from pipeline.training.plan import Job


@dataclass
class JobResult:
    name: str
    group: str | None
    ok: bool
    error: str | None = None
    spec: dict | None = None          # build_model's arguments: rebuild with load_state
    state: bytes | None = None        # torch.save(state_dict), CPU tensors
    history: list[dict] = field(default_factory=list)
    best_val: float = float("nan")
    best_epoch: int = -1
    samples_per_s: float = 0.0
    seconds: float = 0.0
    n_series: int = 0
    n_windows: int = 0
    attempts: int = 1
    resumed_epoch: int = 0            # > 0: this attempt resumed from a checkpoint
    logged: bool = False              # the per-epoch history went to tracking from the worker
    node: str = ""                    # the Ray node that trained it ("" in this process)
    log_errors: list[str] = field(default_factory=list)
    members: list[dict] = field(default_factory=list)  # an ensemble's: one dict per member
                                      # (index, lookback, loss, seed, ok, best_val, best_epoch,
                                      # epochs, n_windows, history; error when it had none)
    _model: torch.nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def model(self) -> torch.nn.Module:
        """The trained model (an EncoderDecoder, or an Ensemble), rebuilt from spec + weights
        in eval mode once, on the first call; later calls (saving it, logging it, the backtest,
        the forecast) share that module."""
        if self._model is None:
            self._model = model_from_spec(self.spec, state_dict(self.state))
        return self._model

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}     # what travels is the bytes, not the module


def state_bytes(model: torch.nn.Module) -> bytes:
    """The model's weights on the CPU as bytes (what JobResult.state and warm starts carry)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def state_dict(data: bytes) -> dict:
    """Inverse of `state_bytes`."""
    return torch.load(io.BytesIO(data), weights_only=True)


NO_WINDOWS = ("no training windows: the series are too short for lookback + horizon + "
              "validation, or every series was skipped")


def ensemble_result(job: Job, cfg: Config, done: dict[int, tuple], t0: float,
                    log=None) -> JobResult:
    """The job's result from its members' (`train_members`), as `run_pack` makes it."""
    return job_result(job, cfg, ensemble_members(cfg), done, t0, log)


def job_result(job: Job, cfg: Config, members: list[Member], done: dict[int, tuple],
                t0: float, log) -> JobResult:
    """A job's result: its model (an Ensemble of the members that had windows, when the config
    has an ensemble), failed when none trained or one diverged."""
    if not done:
        return failed(job, ValueError(NO_WINDOWS))
    for model, res, _ in done.values():
        if why := diverged(model, res):
            return failed(job, FloatingPointError(why), res.attempt)
    if cfg.model.ensemble.members == 1:
        return trained_result(job, *done[0], t0, log)
    order = sorted(done)
    ens = Ensemble([done[i][0] for i in order], cfg.model.ensemble.combine)
    _, res, n_windows = done[order[0]]
    out = trained_result(job, ens, res, n_windows, t0, log)
    out.attempts = max(r.attempt for _, r, _ in done.values())
    out.resumed_epoch = max(r.resumed_epoch for _, r, _ in done.values())
    out.members = [_member_row(m, done.get(m.index)) for m in members]
    return out


def _member_row(m: Member, trained: tuple | None) -> dict:
    row = {"index": m.index, "lookback": m.lookback, "loss": m.loss, "seed": m.seed,
           "ok": trained is not None}
    if trained is None:
        return {**row, "error": NO_WINDOWS}
    _, res, n_windows = trained
    return {**row, "best_val": res.best_val, "best_epoch": res.best_epoch,
            "epochs": len(res.history), "n_windows": n_windows, "history": res.history}


def diverged(model: torch.nn.Module, res: FitResult) -> str | None:
    """Why a trained model is not usable (a loss or weight that is not finite), or None."""
    if not math.isfinite(res.best_val):
        return (f"training diverged: best validation loss {res.best_val} (the loss was never "
                "finite; check the inputs' ranges and train.lr)")
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and
           not torch.isfinite(v).all()]
    if bad:
        return f"training diverged: weights {bad[:3]} are not finite"
    return None


def trained_result(job: Job, model: torch.nn.Module, res: FitResult, n_windows: int,
                   t0: float, log=None) -> JobResult:
    """A finished job: its weights on the CPU as bytes, its history and figures."""
    out = JobResult(job.name, job.group, True, spec=model.spec, state=state_bytes(model),
                    history=res.history, best_val=res.best_val, best_epoch=res.best_epoch,
                    samples_per_s=res.samples_per_s, seconds=time.perf_counter() - t0,
                    n_series=len(job.series), n_windows=n_windows, attempts=res.attempt,
                    resumed_epoch=res.resumed_epoch)
    if log is not None:
        out.log_errors = list(getattr(log, "errors", []))
        out.logged = not out.log_errors
    return out


def save_result(result: JobResult, path: str) -> None:
    """The trained model as a file `pipeline.models.load_model` rebuilds (written atomically)."""
    buf = io.BytesIO()
    save_model(result.model(), buf)
    write_bytes_atomic(buf.getvalue(), path)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def failed(job: Job, exc: BaseException, attempts: int = 1) -> JobResult:
    """A job that raised: its error, one line (no terminal colours) plus the innermost frame;
    an InfraError (Ray's failure, already one line naming what died) as it is."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    text = ANSI.sub("", str(exc)).strip().splitlines()
    kind = "" if isinstance(exc, InfraError) else f"{type(exc).__name__}: "
    return JobResult(job.name, job.group, False,
                     error=f"{kind}{text[0] if text else ''}{where}",
                     n_series=len(job.series), attempts=attempts)
