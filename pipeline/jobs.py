"""Training jobs. Global and per-group training are one code path: a plan of jobs (a job is
the set of series it trains on), grouped into packs, each pack trained by one function,
`run_pack`, wherever the execution layer places it (this process, a Ray task, a Ray Train
worker). A pack of one job trains its ordinary model; a pack of several (the groups with
`train.per_group.packed`) trains them together as one `PackedModel`.

A job's windows come from `pipeline.data.windows.plan_windows`: training and validation end
before the oldest backtest cutoff, and the scaling statistics are fitted on the same prefix, so
nothing after that cutoff leaks into the model.
"""
from __future__ import annotations

import io
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data.io import write_bytes_atomic
from pipeline.data.loader import WindowLoader, loader_at
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import WindowPlan, plan_windows
from pipeline.distributed import dist_info
from pipeline.models import PackedModel, build_model, make_loss, save_model
from pipeline.models.seq2seq import EncoderDecoder, load_model
from pipeline.names import model_file
from pipeline.train import FitResult, TrainData, fit, resolve_device, seed_everything


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


def plan_packs(jobs: list[Job], cfg: Config) -> list[list[Job]]:
    """The jobs trained together: all of them in one pack with `train.per_group.packed`, else
    one pack per job."""
    return [jobs] if cfg.train.per_group.packed and jobs else [[job] for job in jobs]


def job_data(arrays: SeriesArrays, job: Job, cfg: Config, device: torch.device,
             final: bool = False, plan: WindowPlan | None = None) -> TrainData:
    """The job's windows, scaling and loader (the loader holds all series; the index only the
    job's). final=True trains on every step (the forecast model), else before the oldest
    backtest cutoff; `plan`: the data stage's plan of every series for these windows, of which
    the job takes its series' (else they are planned here)."""
    member = job.member(len(arrays))
    plan = plan.of(member) if plan is not None and not final else \
        plan_windows(arrays, cfg.windows, eligible=member, final=final)
    return TrainData(loader_at(arrays, cfg, plan.cutoffs[-1], device), plan.train, plan.val)


def new_model(loader: WindowLoader, cfg: Config, n_series: int, n_groups: int) -> EncoderDecoder:
    n_emb = {"series": n_series, "group": n_groups}.get(cfg.model.embedding, 0)
    return build_model(cfg.model, lookback=cfg.windows.lookback, horizon=cfg.windows.horizon,
                       past_size=loader.past_size, future_size=loader.future_size,
                       static_size=loader.static_size, num_embeddings=n_emb)


def n_groups(arrays: SeriesArrays) -> int:
    return 0 if arrays.groups is None else len(np.unique(arrays.groups.astype(str)))


def run_pack(arrays: SeriesArrays, jobs: list[Job], cfg: Config, *, final: bool = False,
             logs: dict | None = None, inits: dict | None = None, progress: bool = False,
             wrap: Callable | None = None, plan: WindowPlan | None = None) -> list[JobResult]:
    """Train `jobs` as one pack and return one JobResult per job (weights on the CPU, history).
    Jobs without training windows are reported failed and left out of the pack; any other
    error is raised. `logs`: job name -> per-epoch callback (a logger that keeps an `errors`
    list, the tracking layer's EpochLogger, has them copied to the result, which says whether
    it logged); `inits`: job name -> weights to start from (a warm start); `wrap(model) ->
    model` lets the execution layer wrap a pack of one (DDP) before training."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.train.device)
    out: dict[str, JobResult] = {}
    keep: list[tuple[Job, TrainData]] = []
    for job in jobs:
        data = job_data(arrays, job, cfg, device, final, plan)
        if len(data.train):
            keep.append((job, data))
        else:
            out[job.name] = failed(job, ValueError(
                "no training windows: the series are too short for lookback + horizon + "
                "validation, or every series was skipped"))
    if keep:
        members = [job for job, _ in keep]
        models = [_initial_model(arrays, keep[0][1].loader, cfg, (inits or {}).get(j.name))
                  for j in members]       # each initialised as a job trained alone would be
        core = (models[0] if len(models) == 1 else PackedModel.from_models(models)).to(device)
        ckpt = checkpoint.for_pack(arrays, members, cfg, final, _pack_name(cfg, members),
                                   state_bytes(core), dist_info()[1])
        logs = [(logs or {}).get(j.name) for j in members]
        fits = fit(wrap(core) if wrap else core, [d for _, d in keep], cfg.train,
                   make_loss(cfg.model), log=logs, progress=progress, checkpoint=ckpt)
        for g, ((job, data), res, log) in enumerate(zip(keep, fits, logs, strict=True)):
            model = core if len(keep) == 1 else core.extract(g)
            out[job.name] = trained_result(job, model, res, len(data.train), t0, log)
            if why := diverged(model, res):
                out[job.name] = failed(job, FloatingPointError(why), res.attempt)
        if ckpt is not None and dist_info()[0] == 0:
            ckpt.clear()
    return [out[job.name] for job in jobs]


def run_job(arrays: SeriesArrays, job: Job, cfg: Config, *, log=None, init: bytes | None = None,
            **kwargs) -> JobResult:
    """One job trained alone: `run_pack` with a pack of one."""
    return run_pack(arrays, [job], cfg, logs={job.name: log}, inits={job.name: init},
                    **kwargs)[0]


def _initial_model(arrays: SeriesArrays, loader: WindowLoader, cfg: Config,
                   init: bytes | None) -> EncoderDecoder:
    seed_everything(cfg.train.seed)
    model = new_model(loader, cfg, len(arrays), n_groups(arrays))
    if init is not None:
        model.load_state_dict(state_dict(init))
    return model


def _pack_name(cfg: Config, members: list[Job]) -> str:
    """The checkpoint's name: the job's model file name, or `<model>-packed` for a pack."""
    if len(members) == 1:
        return model_file(cfg.model.name, members[0].name).removesuffix(".pt")
    return f"{cfg.model.name}-packed"


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


def trained_result(job: Job, model: EncoderDecoder, res: FitResult, n_windows: int,
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


def failed(job: Job, exc: BaseException, attempts: int = 1) -> JobResult:
    """A job that raised: its error, one line plus the innermost frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    return JobResult(job.name, job.group, False, error=f"{type(exc).__name__}: {exc}{where}",
                     n_series=len(job.series), attempts=attempts)


def run_jobs_locally(arrays: SeriesArrays, jobs: list[Job], cfg: Config, final: bool = False,
                     progress: bool = False, loggers: dict | None = None,
                     inits: dict | None = None, plan: WindowPlan | None = None
                     ) -> list[JobResult]:
    """Every pack in this process, one after another; a failing pack does not stop the others
    (each of its jobs reports the error)."""
    out = []
    for pack in plan_packs(jobs, cfg):
        try:
            out += run_pack(arrays, pack, cfg, final=final, progress=progress, logs=loggers,
                            inits=inits, plan=plan)
        except Exception as e:  # noqa: BLE001 - reported per job, the batch goes on
            out += [failed(job, e) for job in pack]
    return out
