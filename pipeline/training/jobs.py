"""Training jobs. Global and per-group training are one code path: a plan of jobs (a job is
the set of series it trains on), grouped into packs, each pack trained by one function,
`run_pack`, wherever the execution layer places it (this process, a Ray task, a Ray Train
worker). A pack of one job trains its ordinary model; a pack of several (the groups with
`train.per_group.packed`) trains them together as one `PackedModel`.

An ensemble (`model.ensemble.members > 1`) trains inside the same call: for each lookback of
its members (`pipeline.models.ensemble.lookback_packs`), the pack's jobs × those members train
as one `PackedModel` (`train.pack`: on a GPU), or one after another, each alone with the
pack's steps and gradient clipping (on a CPU; the execution layer may hand each member to a
task of its own: `train_members`), each member with its own windows, seed and loss; every
job's members then come back as one `Ensemble` in its JobResult (`members` lists each one's
figures).

A job's windows come from `pipeline.data.windows.plan_windows`: training and validation end
before the oldest backtest cutoff, and the scaling statistics are fitted on the same prefix, so
nothing after that cutoff leaks into the model.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.loader import WindowLoader, loader_at
from pipeline.data.series import SeriesArrays
from pipeline.data.windows import WindowPlan, plan_windows
from pipeline.models import (
    PackedModel,
    build_model,
    make_loss,
    make_val_loss,
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
from pipeline.training import checkpoint
from pipeline.training.device import packs, resolve_device, seed_everything, torch_threads
from pipeline.training.distributed import dist_info
from pipeline.training.loop import TrainData, epoch_steps, fit
from pipeline.training.plan import Job, plan_packs
from pipeline.training.results import (
    JobResult,
    failed,
    job_result,
    state_bytes,
    state_dict,
)


def spreads_members(cfg: Config, job_packs: list[list[Job]]) -> bool:
    """Whether Ray trains an ensemble's members as tasks of their own
    (`pipeline.execution.ray_train.train`): Ray on, more than one member, one job per pack, and
    members that do not pack where the tasks run (`train.pack`; `auto` packs on GPUs: tasks with
    `ray.task_num_gpus`, or `train.device` cuda)."""
    gpu = cfg.ray.task_num_gpus > 0 or resolve_device(cfg.train.device).type == "cuda"
    return (cfg.ray.enabled and cfg.model.ensemble.members > 1
            and all(len(p) == 1 for p in job_packs)
            and not packs(cfg.train, torch.device("cuda" if gpu else "cpu")))


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
    with torch_threads(cfg.train.threads):
        ckpts = [c for part in lookback_packs(members)
                 for c in _train_part(arrays, jobs, cfg, part, done, final=final,
                                      logs=logs or {}, inits=inits or {}, progress=progress,
                                      wrap=wrap, plan=plan)]
    out = [job_result(job, cfg, members, done[job.name], t0, (logs or {}).get(job.name))
           for job in jobs]
    _clear(ckpts)
    return out


def train_members(arrays: SeriesArrays, job: Job, cfg: Config, indices: list[int], *,
                  final: bool = False, log=None, init: bytes | None = None,
                  plan: WindowPlan | None = None) -> dict[int, tuple]:
    """Members `indices` of the ensemble job `job`, each alone with its pack's steps per
    epoch, as `run_pack` trains them one after another (the execution layer's share of an
    ensemble for one task): member index -> (model, FitResult, windows), for those with
    windows. `ensemble_result` makes the job's result of every member's. `log` gets the
    epochs of the first of `indices` (a task's member, for the driver's display; it logs to
    the tracking run when that member is member 0)."""
    done: dict[str, dict[int, tuple]] = {job.name: {}}
    ckpts = []
    with torch_threads(cfg.train.threads):
        for part in lookback_packs(ensemble_members(cfg)):
            if any(m.index in indices for m in part):
                ckpts += _train_part(arrays, [job], cfg, part, done, final=final,
                                     logs={job.name: log}, inits={job.name: init},
                                     progress=False, wrap=None, plan=plan, only=set(indices),
                                     logged=min(indices))
    _clear(ckpts)
    return done[job.name]


def _clear(ckpts: list) -> None:
    for ckpt in ckpts:
        if ckpt is not None and dist_info()[0] == 0:
            ckpt.clear()


def _train_part(arrays: SeriesArrays, jobs: list[Job], cfg: Config, part: list[Member],
                done: dict, *, final: bool, logs: dict, inits: dict, progress: bool,
                wrap: Callable | None, plan: WindowPlan | None, only: set[int] | None = None,
                logged: int = 0) -> list:
    """Train the members `part` (one lookback) of every job with windows: as one pack, or
    (`train.pack`, `device.packs`) each alone with the pack's steps per epoch and its
    clipping arithmetic, so the weights are the pack's (bit for bit for MLPs on the CPU, to
    float rounding for convolutions and GRUs). Each trained (model, FitResult, windows) goes
    to done[job name][member index]. Returns the checkpoints (cleared once every part has
    trained). `only`: train just these member indices, each alone, whatever `train.pack`
    says (a Ray task's share of the pack); `logged`: the member whose epochs go to the job's
    log."""
    device = resolve_device(cfg.train.device)
    data_cfg = member_config(cfg, Member(0, part[0].lookback, cfg.model.loss, cfg.train.seed))
    same = data_cfg.windows.lookback == cfg.windows.lookback
    keep = []                                  # (job, member, data), job-major
    for job in jobs:
        data = job_data(arrays, job, data_cfg, device, final, plan if same else None)
        keep += [(job, m, data) for m in part] if len(data.train) else []
    if not keep:
        return []
    if len(keep) == 1 or (only is None and packs(cfg.train, device)):
        return [_fit_pack(arrays, keep, cfg, done, final, logs, inits, progress, wrap,
                          logged=logged)]
    alone = (epoch_steps([d for *_, d in keep], cfg.train), len(keep))  # the pack's
    return [_fit_pack(arrays, [one], cfg, done, final, logs, inits, progress, wrap, alone,
                      logged) for one in keep if only is None or one[1].index in only]


def _fit_pack(arrays: SeriesArrays, keep: list, cfg: Config, done: dict, final: bool,
              logs: dict, inits: dict, progress: bool, wrap: Callable | None,
              alone: tuple[int, int] | None = None, logged: int = 0):
    """Fit the (job, member, data) of `keep` as one module (a PackedModel when more than
    one); `alone`: (steps per epoch, the pack's size) when a member trains alone as in its
    pack. Returns the checkpoint, or None."""
    device = keep[0][2].loader.device
    ensemble = cfg.model.ensemble.members > 1
    models = [_initial_model(arrays, keep[0][2].loader, member_config(cfg, m),
                             _member_init(inits.get(job.name), m, ensemble))
              for job, m, _ in keep]      # each initialised as the member trained alone would be
    packed = len(models) > 1
    core = (PackedModel.from_models(models) if packed else models[0]).to(device)
    members = [Job(f"{j.name}/{m.index}", j.series, j.group) if ensemble else j
               for j, m, _ in keep]
    name = _pack_name(cfg, members, keep[0][1].lookback if ensemble else None)
    steps, width = alone or (None, None)
    if alone and ensemble:                                    # a member alone
        name += f"-m{keep[0][1].index}"
    ckpt = checkpoint.for_pack(arrays, members, cfg, final, name, state_bytes(core),
                               dist_info()[1])
    fits = fit(wrap(core) if wrap else core, [d for *_, d in keep], cfg.train,
               _losses(cfg, [m for _, m, _ in keep]), progress=progress, checkpoint=ckpt,
               log=[logs.get(j.name) if m.index == logged else None for j, m, _ in keep],
               seeds=[m.seed for _, m, _ in keep], steps=steps, width=width,
               val_loss=make_val_loss(cfg.model, cfg.train.val_metric))
    for g, ((job, m, data), res) in enumerate(zip(keep, fits, strict=True)):
        done[job.name][m.index] = (core.extract(g) if packed else core, res, len(data.train))
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
