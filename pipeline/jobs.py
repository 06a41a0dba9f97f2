"""Training jobs. Global and per-group training are one code path: a plan of jobs (a job is
the set of series it trains on), grouped into packs, each pack trained by one function,
`run_pack`, wherever the execution layer places it (this process, a Ray task, a Ray Train
worker). A pack of one job trains its ordinary model; a pack of several (the groups with
`train.per_group.packed`) trains them together as one `PackedModel`.

An ensemble (`model.ensemble.members > 1`) trains inside the same call: for each lookback of
its members (`pipeline.models.ensemble.lookback_packs`), the pack's jobs × those members train
as one `PackedModel`, each member with its own windows, seed and loss; every job's members then
come back as one `Ensemble` in its JobResult (`members` lists each one's figures).

A job's windows come from `pipeline.data.windows.plan_windows`: training and validation end
before the oldest backtest cutoff, and the scaling statistics are fitted on the same prefix, so
nothing after that cutoff leaks into the model.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
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
from pipeline.device import resolve_device, seed_everything
from pipeline.distributed import dist_info
from pipeline.models import (
    PackedModel,
    build_model,
    make_loss,
    make_val_loss,
    model_from_spec,
    save_model,
)
from pipeline.models.ensemble import (
    Ensemble,
    Member,
    ensemble_members,
    lookback_packs,
    member_config,
)
from pipeline.models.seq2seq import EncoderDecoder
from pipeline.names import model_file
from pipeline.train import FitResult, TrainData, fit


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
    members: list[dict] = field(default_factory=list)  # an ensemble's: one dict per member
                                      # (index, lookback, loss, seed, ok, best_val, best_epoch,
                                      # epochs, n_windows, history; error when it had none)

    def model(self) -> torch.nn.Module:
        """The trained model (an EncoderDecoder, or an Ensemble), rebuilt from spec + weights,
        in eval mode."""
        return model_from_spec(self.spec, state_dict(self.state))


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


def model_spec(arrays: SeriesArrays, cfg: Config) -> dict:
    """The spec of the model a job of this config trains (what a warm start's champion must
    have): the single model's, or the Ensemble's of every member."""
    loader = loader_at(arrays, cfg, arrays.lengths)
    models = [new_model(loader.with_lookback(m.lookback), member_config(cfg, m), len(arrays),
                        n_groups(arrays)) for m in ensemble_members(cfg)]
    if cfg.model.ensemble.members == 1:
        return models[0].spec
    return Ensemble(models, cfg.model.ensemble.combine).spec


def n_groups(arrays: SeriesArrays) -> int:
    return 0 if arrays.groups is None else len(np.unique(arrays.groups.astype(str)))


NO_WINDOWS = ("no training windows: the series are too short for lookback + horizon + "
              "validation, or every series was skipped")


def run_pack(arrays: SeriesArrays, jobs: list[Job], cfg: Config, *, final: bool = False,
             logs: dict | None = None, inits: dict | None = None, progress: bool = False,
             wrap: Callable | None = None, plan: WindowPlan | None = None) -> list[JobResult]:
    """Train `jobs` as one pack and return one JobResult per job (weights on the CPU, history).
    Jobs without training windows are reported failed and left out of the pack; any other
    error is raised. `logs`: job name -> per-epoch callback (a logger that keeps an `errors`
    list, the tracking layer's EpochLogger, has them copied to the result, which says whether
    it logged; an ensemble's member 0 logs); `inits`: job name -> weights to start from (a warm
    start; an ensemble's weights start each member, a single model's member 0); `wrap(model) ->
    model` lets the execution layer wrap a pack of one (DDP) before training. An ensemble
    trains one pack per lookback of its members, one after another."""
    t0 = time.perf_counter()
    members = ensemble_members(cfg)
    if wrap is not None and len(members) > 1:
        raise ValueError(f"model.ensemble.members = {len(members)} trains packed, not under DDP "
                         "(ray.num_workers > 1); use one worker")
    done: dict[str, dict[int, tuple]] = {job.name: {} for job in jobs}
    ckpts = [_train_part(arrays, jobs, cfg, part, done, final=final, logs=logs or {},
                         inits=inits or {}, progress=progress, wrap=wrap, plan=plan)
             for part in lookback_packs(members)]
    out = [_job_result(job, cfg, members, done[job.name], t0, (logs or {}).get(job.name))
           for job in jobs]
    for ckpt in ckpts:
        if ckpt is not None and dist_info()[0] == 0:
            ckpt.clear()
    return out


def _train_part(arrays: SeriesArrays, jobs: list[Job], cfg: Config, part: list[Member],
                done: dict, *, final: bool, logs: dict, inits: dict, progress: bool,
                wrap: Callable | None, plan: WindowPlan | None):
    """Train the members `part` (one lookback) of every job with windows as one pack; each
    trained (model, FitResult, windows) goes to done[job name][member index]. Returns the
    pack's checkpoint (cleared once every part has trained), or None."""
    device = resolve_device(cfg.train.device)
    data_cfg = member_config(cfg, Member(0, part[0].lookback, cfg.model.loss, cfg.train.seed))
    same = data_cfg.windows.lookback == cfg.windows.lookback
    keep = []                                  # (job, member, data), job-major
    for job in jobs:
        data = job_data(arrays, job, data_cfg, device, final, plan if same else None)
        keep += [(job, m, data) for m in part] if len(data.train) else []
    if not keep:
        return None
    ensemble = cfg.model.ensemble.members > 1
    models = [_initial_model(arrays, keep[0][2].loader, member_config(cfg, m),
                             _member_init(inits.get(job.name), m, ensemble))
              for job, m, _ in keep]      # each initialised as the member trained alone would be
    core = (models[0] if len(models) == 1 else PackedModel.from_models(models)).to(device)
    packed = [Job(f"{j.name}/{m.index}", j.series, j.group) if ensemble else j
              for j, m, _ in keep]
    ckpt = checkpoint.for_pack(arrays, packed, cfg, final,
                               _pack_name(cfg, packed, part[0].lookback if ensemble else None),
                               state_bytes(core), dist_info()[1])
    fits = fit(wrap(core) if wrap else core, [d for *_, d in keep], cfg.train,
               _losses(cfg, [m for _, m, _ in keep]), progress=progress, checkpoint=ckpt,
               log=[logs.get(j.name) if m.index == 0 else None for j, m, _ in keep],
               seeds=[m.seed for _, m, _ in keep],
               val_loss=make_val_loss(cfg.model, cfg.train.val_metric))
    for g, ((job, m, data), res) in enumerate(zip(keep, fits, strict=True)):
        done[job.name][m.index] = (core if len(keep) == 1 else core.extract(g), res,
                                   len(data.train))
    return ckpt


def _losses(cfg: Config, members: list[Member]):
    """One loss function for the pack when its members share one (vmapped), else one each."""
    fns = {name: make_loss(cfg.model if name == cfg.model.loss else
                           dataclasses.replace(cfg.model, loss=name))
           for name in dict.fromkeys(m.loss for m in members)}
    return next(iter(fns.values())) if len(fns) == 1 else [fns[m.loss] for m in members]


def _member_init(init: bytes | None, member: Member, ensemble: bool) -> dict | None:
    """The weights member `member` starts from: its slice of an ensemble's weights, or a
    single model's (member 0 only, in an ensemble)."""
    if init is None:
        return None
    weights = state_dict(init)
    if not ensemble:
        return weights
    prefix = f"members.{member.index}."
    if any(k.startswith("members.") for k in weights):
        mine = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        return mine or None
    return weights if member.index == 0 else None


def _job_result(job: Job, cfg: Config, members: list[Member], done: dict[int, tuple],
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


def run_job(arrays: SeriesArrays, job: Job, cfg: Config, *, log=None, init: bytes | None = None,
            **kwargs) -> JobResult:
    """One job trained alone: `run_pack` with a pack of one."""
    return run_pack(arrays, [job], cfg, logs={job.name: log}, inits={job.name: init},
                    **kwargs)[0]


def _initial_model(arrays: SeriesArrays, loader: WindowLoader, cfg: Config,
                   init: dict | None) -> EncoderDecoder:
    seed_everything(cfg.train.seed)
    model = new_model(loader, cfg, len(arrays), n_groups(arrays))
    if init is not None:
        model.load_state_dict(init)
    return model


def _pack_name(cfg: Config, members: list[Job], lookback: int | None = None) -> str:
    """The checkpoint's name: the job's model file name, or `<model>-packed` for a pack (an
    ensemble's: `<model>-<job>-L<lookback>` or `<model>-packed-L<lookback>`)."""
    jobs = list(dict.fromkeys(j.name.rsplit("/", 1)[0] if lookback else j.name for j in members))
    name = model_file(cfg.model.name, jobs[0]).removesuffix(".pt") if len(jobs) == 1 else \
        f"{cfg.model.name}-packed"
    return name if lookback is None else f"{name}-L{lookback}"


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
    """A job that raised: its error, one line (no terminal colours) plus the innermost frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" ({tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno})" if tb else ""
    text = ANSI.sub("", str(exc)).strip().splitlines()
    return JobResult(job.name, job.group, False,
                     error=f"{type(exc).__name__}: {text[0] if text else ''}{where}",
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
