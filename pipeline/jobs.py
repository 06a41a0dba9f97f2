"""Training jobs. Global and per-group training are one code path: a plan of jobs (a job is
the set of series it trains on) run by the same job function, `run_job`, wherever the execution
layer places it (this process, a Ray task, a Ray Train worker).

A job's windows come from `pipeline.data.prepare.plan_windows`: training and validation end
before the oldest backtest cutoff, and the scaling statistics are fitted on the same prefix, so
nothing after that cutoff leaks into the model.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.checkpoint import Checkpoint, digest
from pipeline.config import Config
from pipeline.data.loader import WindowLoader
from pipeline.data.scaling import fit_scaling
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import plan_windows
from pipeline.models import build_model, make_loss
from pipeline.models.seq2seq import EncoderDecoder
from pipeline.names import model_file
from pipeline.train import (
    FitResult,
    TrainData,
    dist_info,
    fit,
    resolve_device,
    seed_everything,
)


@dataclass
class Job:
    name: str                 # "global" or the group value
    series: np.ndarray        # indices into the SeriesArrays
    group: str | None = None

    def member(self, n_series: int) -> np.ndarray:
        """[S] bool: true for the job's series."""
        out = np.zeros(n_series, bool)
        out[self.series] = True
        return out


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

    def model(self) -> EncoderDecoder:
        """The trained model, rebuilt from spec + weights."""
        from pipeline.models.seq2seq import load_model
        buf = io.BytesIO()
        torch.save({"format": 1, "spec": self.spec, "state_dict": state_dict(self.state)}, buf)
        buf.seek(0)
        return load_model(buf)


def state_bytes(model: torch.nn.Module) -> bytes:
    """The model's weights on the CPU as bytes (what JobResult.state and warm starts carry)."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def state_dict(data: bytes) -> dict:
    """Inverse of `state_bytes`."""
    return torch.load(io.BytesIO(data), weights_only=True)


def plan_jobs(arrays: SeriesArrays, cfg: Config) -> list[Job]:
    """One global job over every series, or one job per group value (sorted)."""
    if cfg.train.mode == "global":
        return [Job("global", np.arange(len(arrays)))]
    groups = arrays.groups.astype(str)
    return [Job(str(g), np.flatnonzero(groups == g), str(g)) for g in np.unique(groups)]


def job_data(arrays: SeriesArrays, job: Job, cfg: Config, device: torch.device,
             final: bool = False) -> TrainData:
    """The job's windows, scaling and loader (the loader holds all series; the index only the
    job's). final=True trains on every step (the forecast model), else before the oldest
    backtest cutoff."""
    plan = plan_windows(arrays, cfg.windows, eligible=job.member(len(arrays)), final=final)
    return TrainData(loader_at(arrays, cfg, plan.cutoffs[-1], device), plan.train, plan.val)


def loader_at(arrays: SeriesArrays, cfg: Config, cutoff: np.ndarray, device="cpu"
              ) -> WindowLoader:
    """A loader over every series with the scaling fitted before `cutoff` (per series)."""
    loc, scale = fit_scaling(arrays, cutoff, cfg.windows.scaling)
    return WindowLoader(arrays, cfg.windows.lookback, cfg.windows.horizon, loc, scale,
                        calendar=calendar_for(arrays, cfg), embedding=cfg.model.embedding,
                        device=device, window_scaling=cfg.windows.scaling == "window")


def calendar_for(arrays: SeriesArrays, cfg: Config) -> list[str]:
    from pipeline.data.calendar import auto_features
    return auto_features(arrays.freq_ns) if cfg.data.calendar == "auto" else list(cfg.data.calendar)


def new_model(loader: WindowLoader, cfg: Config, n_series: int, n_groups: int) -> EncoderDecoder:
    n_emb = {"series": n_series, "group": n_groups}.get(cfg.model.embedding, 0)
    return build_model(cfg.model, lookback=cfg.windows.lookback, horizon=cfg.windows.horizon,
                       past_size=loader.past_size, future_size=loader.future_size,
                       static_size=loader.static_size, num_embeddings=n_emb)


def n_groups(arrays: SeriesArrays) -> int:
    return 0 if arrays.groups is None else len(np.unique(arrays.groups.astype(str)))


def run_job(arrays: SeriesArrays, job: Job, cfg: Config, log=None, progress: bool = False,
            wrap=None, final: bool = False, init: bytes | None = None) -> JobResult:
    """Build the job's data and model, fit, and return the weights (on the CPU) and history.
    `wrap(model) -> model` lets the execution layer wrap the model (e.g. DDP) before training.
    `log(row)` gets each epoch's row; a logger that keeps an `errors` list (the tracking
    layer's EpochLogger) has them copied to the result, which says whether it logged.
    `init`: weights to start from (a warm start: torch.save'd state_dict of the same spec)."""
    t0 = time.perf_counter()
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    data = job_data(arrays, job, cfg, device, final)
    model = new_model(data.loader, cfg, len(arrays), n_groups(arrays))
    if init is not None:
        model.load_state_dict(state_dict(init))
    model = model.to(device)
    trained = wrap(model) if wrap is not None else model
    ckpt = job_checkpoint(arrays, job, cfg, final, model)
    res: FitResult = fit(trained, data, cfg.train, make_loss(cfg.model), log=log,
                         progress=progress, checkpoint=ckpt)
    out = trained_result(job, model, res, len(data.train), t0)
    out.attempts, out.resumed_epoch = res.attempt, res.resumed_epoch
    if ckpt is not None and dist_info()[0] == 0:
        ckpt.clear()
    if log is not None:
        out.log_errors = list(getattr(log, "errors", []))
        out.logged = not out.log_errors
    return out


def job_checkpoint(arrays: SeriesArrays, job: Job, cfg: Config, final: bool,
                   model: torch.nn.Module) -> Checkpoint | None:
    """`<checkpoint dir>/<backtest|final>/<model>-<job>-<config digest>.ckpt`, keyed by
    `job_key` and the weights it starts from (`model` before training: its shapes, seeded
    initialisation or warm start); None when checkpoints are off."""
    name = model_file(cfg.model.name, job.name).removesuffix(".pt")
    return _checkpoint(cfg, final, name, model,
                       lambda conf: job_key(arrays, job, conf, final))


def packed_checkpoint(arrays: SeriesArrays, jobs: list[Job], cfg: Config, final: bool,
                      packed: torch.nn.Module) -> Checkpoint | None:
    """One checkpoint for a pack of groups, `<model>-packed-….ckpt`, keyed by every member."""
    def key(conf: str) -> str:
        common = data_key(arrays)
        return digest(*[job_key(arrays, j, conf, final, common) for j in jobs])
    return _checkpoint(cfg, final, f"{cfg.model.name}-packed", packed, key)


def checkpoint_root(cfg: Config) -> str:
    """`train.checkpoint_dir`, default `<output.path>/<name>/checkpoints`; a local path is made
    absolute here, so workers that run elsewhere (Ray Train moves their working directory into
    the Ray session) use the same folder."""
    root = cfg.train.checkpoint_dir or f"{cfg.output.path.rstrip('/')}/{cfg.name}/checkpoints"
    return root if "://" in root else os.path.abspath(root)


def _checkpoint(cfg: Config, final: bool, name: str, model: torch.nn.Module,
                key: Callable[[str], str]) -> Checkpoint | None:
    """The checkpoint named `name`, keyed by the weights `model` starts from and `key(the
    training settings)`, computed on first use; None when checkpoints are off."""
    if cfg.train.checkpoint_minutes is None:
        return None
    conf, start = _train_conf(cfg), digest(state_bytes(model))
    uri = (f"{checkpoint_root(cfg).rstrip('/')}/{'final' if final else 'backtest'}/"
           f"{name}-{digest(conf)[:8]}.ckpt")     # refit cutoffs and other configs apart
    return Checkpoint(uri, lambda: digest(start, key(conf)), cfg.train.checkpoint_minutes)


def _train_conf(cfg: Config) -> str:
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


def job_key(arrays: SeriesArrays, job: Job, conf: str, final: bool,
            common: str | None = None) -> str:
    """Digest of what a job's training depends on besides its starting weights: the training
    settings (`_train_conf`), the number of DDP ranks (their shards and schedule), `data_key`,
    and the job's series — values, mask and covariates."""
    series = np.sort(job.series)
    parts = [conf, job.name, str(final), str(dist_info()[1]),
             common or data_key(arrays), np.ascontiguousarray(series.astype(np.int64))]
    for run in np.split(series, np.flatnonzero(np.diff(series) != 1) + 1):  # consecutive runs
        lo, hi = arrays.indptr[run[0]], arrays.indptr[run[-1] + 1]
        for a in (arrays.values, arrays.mask, arrays.past, arrays.future):
            parts.append(None if a is None else np.ascontiguousarray(a[lo:hi]))
    return digest(*parts)


def trained_result(job: Job, model: EncoderDecoder, res: FitResult, n_windows: int,
                   t0: float) -> JobResult:
    """A finished job: its weights on the CPU as bytes, its history and figures."""
    return JobResult(job.name, job.group, True, spec=model.spec, state=state_bytes(model),
                     history=res.history, best_val=res.best_val, best_epoch=res.best_epoch,
                     samples_per_s=res.samples_per_s, seconds=time.perf_counter() - t0,
                     n_series=len(job.series), n_windows=n_windows)


def save_result(result: JobResult, path: str) -> None:
    """The trained model as a file `pipeline.models.load_model` rebuilds (written atomically)."""
    from pipeline.models import save_model
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_model(result.model(), tmp)
    os.replace(tmp, path)


def failed(job: Job, exc: BaseException, attempts: int = 1) -> JobResult:
    """A job that raised: its error, one line plus the innermost frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return JobResult(job.name, job.group, False, error=f"{type(exc).__name__}: {exc}{where}",
                     n_series=len(job.series), attempts=attempts)


def run_jobs_locally(arrays: SeriesArrays, jobs: list[Job], cfg: Config, final: bool = False,
                     progress: bool = False, loggers: dict | None = None,
                     inits: dict | None = None) -> list[JobResult]:
    """Every job in this process, one after another (packed into one module when
    `train.per_group.packed`); a failing job does not stop the others. `loggers`: job name
    -> per-epoch log callback; `inits`: job name -> weights to start from."""
    if cfg.train.per_group.packed:
        try:
            return run_packed(arrays, jobs, cfg, final=final, inits=inits)
        except Exception as e:  # noqa: BLE001 - the pack failed: every group reports it
            return [failed(job, e) for job in jobs]
    out = []
    for job in jobs:
        try:
            out.append(run_job(arrays, job, cfg, final=final, progress=progress,
                               log=(loggers or {}).get(job.name),
                               init=(inits or {}).get(job.name)))
        except Exception as e:  # noqa: BLE001 - reported per job, the batch goes on
            out.append(failed(job, e))
    return out


def run_packed(arrays: SeriesArrays, jobs: list[Job], cfg: Config, progress: bool = False,
               final: bool = False, inits: dict | None = None) -> list[JobResult]:
    """Every per-group job trained together as one PackedModel in this process (or one Ray
    task); each group comes back as an ordinary model, as from separate jobs. Groups with no
    training windows are reported as failed and left out of the pack."""
    from pipeline.models.packed import PackedModel
    from pipeline.train import fit_packed
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    datas = [job_data(arrays, job, cfg, device, final) for job in jobs]
    out: dict[str, JobResult] = {}
    keep = []
    for job, data in zip(jobs, datas, strict=True):
        if len(data.train) == 0:
            out[job.name] = failed(job, ValueError("no training windows: the series are too "
                                                   "short, or every series was skipped"))
        else:
            keep.append((job, data))
    if keep:
        models = []
        for job, _ in keep:  # each initialised as run_job would initialise it
            seed_everything(cfg.train.seed)
            m = new_model(keep[0][1].loader, cfg, len(arrays), n_groups(arrays))
            if (inits or {}).get(job.name) is not None:
                m.load_state_dict(state_dict(inits[job.name]))
            models.append(m)
        packed = PackedModel.from_models(models).to(device)
        ckpt = packed_checkpoint(arrays, [job for job, _ in keep], cfg, final, packed)
        fits = fit_packed(packed, [d for _, d in keep], cfg.train, make_loss(cfg.model),
                          progress=progress, checkpoint=ckpt)
        for g, ((job, data), res) in enumerate(zip(keep, fits, strict=True)):
            out[job.name] = trained_result(job, packed.extract(g), res, len(data.train), t0)
            out[job.name].attempts, out[job.name].resumed_epoch = res.attempt, res.resumed_epoch
        if ckpt is not None:
            ckpt.clear()
    return [out[job.name] for job in jobs]
