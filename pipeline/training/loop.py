"""The training loop: `fit(model, data, cfg, loss_fn, log=callback)` trains a *pack* of G
members (one module, one TrainData each). Imports neither Ray nor MLflow; the execution layer
calls it in this process, Ray tasks or Ray Train workers.

G = 1: an ordinary model (cuDNN GRU, plain conv; possibly wrapped in DDP) on batches [B, ...].
G > 1: a `PackedModel` (G per-group models, or an ensemble's members) on batches stacked
[G, B, ...]; each member draws its batches exactly as it would alone (with its own seed, when
`seeds` are given), the loss is the sum of the members' means (each member its own loss
function, when given one each) and gradients are clipped per member, so each member's weights
equal training it alone. Early stopping and best weights are per member; training ends when
every member has stopped.

Losses get the windows' scaling and weights too (`loss(pred, target, mask, loc, scale,
weight)`): sMAPE uses loc and scale, MASE the loader's weights. `train.sampling: series` draws
series-balanced batches (`pipeline.data.loader.SeriesSampler`), optionally favouring recent
windows (`train.recency_halflife`).

Batches are gathered from the series arrays by index arithmetic (`WindowLoader`); on a GPU the
arrays sit on the device and batches are gathered there, with no DataLoader workers. The window
order comes from a torch.Generator seeded with (seed, epoch, rank), so the same seed and data on
the CPU give bit-identical weights. Under torch.distributed (DDP, packs of one), each rank trains
on its shard of the window index and the validation loss is averaged over ranks, so all stop
together. On CUDA, bf16 autocast unless train.precision says fp32.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data.loader import SeriesSampler, WindowBatch, WindowLoader, stack_batches
from pipeline.data.windows import WindowIndex
from pipeline.models.losses import member_losses
from pipeline.progress import Progress
from pipeline.training.checkpoint import fits, training_state
from pipeline.training.device import autocast_dtype
from pipeline.training.distributed import dist_info, mean_over_ranks, shard
from pipeline.training.valset import ValBatches, val_sample

Log = Callable[[dict], None]


@dataclass
class TrainData:
    loader: WindowLoader
    train: WindowIndex
    val: WindowIndex | None = None


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = -1
    best_val: float = math.inf
    seconds: float = 0.0
    samples: int = 0
    resumed_epoch: int = 0      # the first epoch this call trained (> 0: from a checkpoint)
    train_seconds: float = 0.0  # of `seconds`: the training steps (the pack's, this call's)
    val_seconds: float = 0.0    # and validation
    attempt: int = 1            # 1 + the attempts before it that left a checkpoint

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The window order of one epoch: a function of (seed, epoch, rank) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + rank)


def epoch_steps(data: Sequence[TrainData], cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: `steps_per_epoch`, else one pass over the largest member's
    windows (smaller members then cycle through fresh permutations)."""
    return cfg.steps_per_epoch or max(math.ceil(len(d.train) / cfg.batch_size) for d in data)


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # foreach: one kernel per step for all parameters, bit-identical to the per-parameter loop
    opt = cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    elif cfg.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr,
                                                    total_steps=max(total_steps, 1))
    else:
        sched = None
    return opt, sched


# ------------------------------------------------------------------ the pack

@torch.no_grad()
def clip_grad_norm_per_member(module: nn.Module, max_norm: float, width: int | None = None
                              ) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) for each member on its own: member g's slice of
    every gradient is scaled by min(1, max_norm / (norm_g + 1e-6)), norm_g being the L2 norm
    over member g's slices only. Every parameter carries the member in dim 0 (a PackedModel's
    do), or `width` is given: an ordinary model, a member taken out of a pack of `width`,
    whose norm is summed over its parameters as that pack sums it (torch's reduction order
    over [parameters, G] depends on G), so the member alone gets its pack's gradients bit for
    bit. Returns the norms before clipping, [G]."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    members = 1 if width else grads[0].shape[0]
    if any(g.shape[0] != members for g in grads) and not width:
        raise ValueError("every parameter must have the member in dim 0")
    # [G, *shape] -> [G, n] -> [G]: each member's squared norm, summed over parameters
    squares = torch.stack([g.reshape(members, -1).float().square().sum(1) for g in grads])
    if width:                                          # [P, 1] laid out as its pack's [P, G]
        squares = squares.expand(-1, width).contiguous()
    norms = squares.sum(0)[:members].sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).reshape(members, *[1] * (g.dim() - 1)) if not width
               else scale.to(g.dtype))
    return norms


def pack_losses(model: nn.Module, batches: Sequence[WindowBatch], loss_fn, amp, train: bool
                ) -> torch.Tensor:
    """Forward one batch per member (stacked [G, B, ...] when G > 1); [G] losses."""
    b = batches[0] if len(batches) == 1 else stack_batches(batches)
    return batch_losses(model, b, loss_fn, amp, train, len(batches))


def batch_losses(model: nn.Module, b: WindowBatch, loss_fn, amp, train: bool, members: int
                 ) -> torch.Tensor:
    """[G] losses of a batch ready for the model (stacked [G, B, ...] when G > 1)."""
    with torch.autocast(b.x.device.type, dtype=amp, enabled=amp is not None):
        pred = model(b.x, b.xf, b.static, b.idx, target=b.y if train else None).float()
    return member_losses(loss_fn, pred, b.y, b.y_mask, members, b.loc, b.scale, b.weight)


def train_epoch(model, data: Sequence[TrainData], steps: int | None, opt, sched, loss_fn,
                cfg: TrainConfig, amp, gens: Sequence[torch.Generator],
                samplers: Sequence[SeriesSampler | None] | None = None, tick=None,
                width: int | None = None) -> tuple[list, int]:
    """One epoch of `steps` steps (None: one pass, the last batch smaller; packs of one only);
    returns (each member's mean train loss, samples per member). `samplers`: each member's
    series-balanced sampler (`train.sampling: series`), or None: window permutations.
    `tick(step, loss)` after each step, `loss()` the running mean train loss (it syncs the
    device: a progress display calls it only when it prints). `width`: a member alone,
    clipped as a member of its pack of `width` is (`clip_grad_norm_per_member`)."""
    model.train()
    samplers = samplers or [None] * len(data)
    streams = [d.loader.batches(d.train, cfg.batch_size, shuffle=True, generator=g,
                                steps=steps, sampler=smp)
               for d, g, smp in zip(data, gens, samplers, strict=True)]
    total, n = 0.0, 0
    for step, batches in enumerate(zip(*streams, strict=True), 1):
        losses = pack_losses(model, batches, loss_fn, amp, train=True)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()        # member g's gradient is that of its own loss
        if cfg.grad_clip and (len(data) > 1 or width):
            clip_grad_norm_per_member(getattr(model, "module", model), cfg.grad_clip, width)
        elif cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        total += losses.detach() * len(batches[0])  # stays on the device: no sync per step
        n += len(batches[0])
        if tick is not None:
            tick(step, lambda t=total, k=n: float(torch.as_tensor(t).mean()) / k)
    return [float(t) / max(n, 1) for t in torch.as_tensor(total).reshape(-1)], n


@torch.no_grad()
def validate(model, val: ValBatches, loss_fn, amp) -> list[float]:
    """Each member's mean validation loss over its own windows (NaN where it has none)."""
    model.eval()
    if not any(val.n_val):
        return [math.nan] * len(val.n_val)
    sums = torch.zeros(len(val.n_val))
    for batch, real in val:
        losses = batch_losses(model, batch, loss_fn, amp, False, len(real))
        sums += losses.cpu() * real
    return [float(s) / n if n else math.nan for s, n in zip(sums, val.n_val, strict=True)]


# ------------------------------------------------------------------ the loop

def _display(cfg: TrainConfig, logs: list, steps: int, progress: bool, rank: int) -> Progress:
    """Rank 0's progress display; a log callback with a `tick` follows the steps too (the
    pack's first that has one: its members share the steps)."""
    follow = next((lg.tick for lg in logs if hasattr(lg, "tick")), None) if rank == 0 else None
    return Progress(cfg.epochs, enabled=progress and rank == 0, steps=steps, follow=follow)


def _save_if_due(checkpoint, epoch: int, core, opt, sched, device, s, t0: float) -> None:
    if checkpoint.due():
        s.set_seconds(time.perf_counter() - t0)
        checkpoint.save(training_state(epoch, core, opt, sched, device, s.results,
                                       best=s.best, bad=s.bad, stopped=s.stopped))


def fit(model: nn.Module, data: Sequence[TrainData], cfg: TrainConfig,
        loss_fn: nn.Module | Sequence[nn.Module], *,
        log: Log | Sequence[Log | None] | None = None, progress: bool = True,
        checkpoint=None, seeds: Sequence[int] | None = None, val_loss: nn.Module | None = None,
        steps: int | None = None, width: int | None = None) -> list[FitResult]:
    """Train the pack (`model` and one TrainData per member) in place; each member's weights
    of its best validation epoch are restored at the end (its last epoch's when it never
    improved). `loss_fn`: one for every member, or one per member. `log`: one callback, or one
    per member, gets each epoch's row. `seeds`: each member's seed for its window order and
    validation sample (default: cfg.seed for all). `val_loss`: what validation scores
    (`train.val_metric`; default: `loss_fn`). `checkpoint` (a `training.checkpoint.Checkpoint`):
    resume from its state when it holds one, save the whole state when due; a resumed run ends
    with the same weights, bit for bit on the CPU, as one that was never interrupted. `steps`,
    `width`: a member alone steps and clips as its pack of `width` (an MLP: bit for bit)."""
    G = len(data)
    logs = list(log) if isinstance(log, Sequence) else [log] * G
    seeds = [cfg.seed] * G if seeds is None else list(seeds)
    device = data[0].loader.device
    amp = autocast_dtype(cfg, device)
    rank, world = dist_info()
    val, data, samplers = _prepare(data, cfg, seeds, rank, world)
    # full batches (a pack, or a member alone as in its pack), else steps_per_epoch / a pass
    steps, fixed = steps or epoch_steps(data, cfg), steps is not None or G > 1
    opt, sched = make_optimizer(model, cfg, steps * cfg.epochs)
    core = getattr(model, "module", model)   # the model inside a DDP wrapper
    s = _State(G)
    display = _display(cfg, logs, steps, progress, rank)
    first = display.epoch = _resume(checkpoint, core, opt, sched, device, s, display, logs)
    t0 = time.perf_counter() - s.results[0].seconds
    for epoch in range(first, cfg.epochs if not all(s.stopped) else 0):
        te = time.perf_counter()
        gens = [epoch_generator(seed, epoch, rank) for seed in seeds]  # as if alone
        train_loss, n = train_epoch(model, data, steps if fixed else cfg.steps_per_epoch,
                                    opt, sched, loss_fn, cfg, amp, gens, samplers,
                                    display.step, width)
        scores = _timed_validation(s, te, model, val, val_loss or loss_fn, amp)
        train_loss, scores = ([mean_over_ranks(v, device) for v in x] for x in (train_loss, scores))
        rate = n * world / (time.perf_counter() - te)            # samples/s per member
        _end_epoch(s, core, epoch, train_loss, scores, n * world, rate, opt, cfg, logs)
        display.update({"epoch": epoch, "train_loss": float(np.mean(train_loss)),
                        "val_loss": _nanmean(scores), "samples_per_s": rate * G})
        if checkpoint is not None and rank == 0 and epoch + 1 < cfg.epochs:
            _save_if_due(checkpoint, epoch, core, opt, sched, device, s, t0)
        if all(s.stopped):
            display.note(f"early stop: no better validation loss for {cfg.patience} epochs")
            break
    s.set_seconds(time.perf_counter() - t0)
    s.restore_best(core)
    display.close()
    return s.results


def _timed_validation(s: _State, te: float, model, val: ValBatches, loss_fn, amp
                      ) -> list[float]:
    """`validate`, its seconds and the epoch's training seconds (since `te`) added up."""
    tv = time.perf_counter()
    scores = validate(model, val, loss_fn, amp)
    s.add_seconds(tv - te, time.perf_counter() - tv)
    return scores


def _prepare(data: Sequence[TrainData], cfg: TrainConfig, seeds: Sequence[int], rank: int,
             world: int) -> tuple[ValBatches, list[TrainData], list | None]:
    """The members' validation batches (each one's sample, this rank's shard), training
    shards, and series-balanced samplers with `train.sampling: series` (else None)."""
    val = [_val_windows(d, cfg, rank, world, seed) for d, seed in zip(data, seeds, strict=True)]
    data = [TrainData(d.loader, shard(d.train, rank, world), d.val) for d in data]
    if any(len(d.train) == 0 for d in data):
        raise ValueError("no training windows: the series are too short for lookback + horizon "
                         "+ validation, or every series was skipped")
    samplers = None
    if cfg.sampling == "series":
        samplers = [SeriesSampler(d.train, cfg.recency_halflife) for d in data]
    return ValBatches(data, val, cfg.batch_size * 4), data, samplers


def _val_windows(data: TrainData, cfg: TrainConfig, rank: int, world: int, seed: int
                 ) -> WindowIndex | None:
    """A member's validation sample, this rank's shard of it; None when there is none."""
    val = shard(val_sample(data.val, cfg, _epoch_windows(data, cfg), seed), rank, world)
    return val if val is not None and len(val) else None


def _epoch_windows(data: TrainData, cfg: TrainConfig) -> int:
    """Windows one epoch trains on in one process (a member's, before DDP shards)."""
    per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    return min(per_epoch, cfg.steps_per_epoch or per_epoch) * cfg.batch_size


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


class _State:
    """What the loop carries from epoch to epoch besides the optimizer: each member's result
    and early-stopping counters, and the best weights so far (members in dim 0 for G > 1)."""

    def __init__(self, members: int) -> None:
        self.members = members
        self.results = [FitResult() for _ in range(members)]
        self.bad, self.stopped = [0] * members, [False] * members
        self.best: dict | None = None

    def keep(self, core: nn.Module, g: int) -> None:
        """Member g's current weights become its best."""
        state = core.state_dict()
        if self.best is None or self.members == 1:
            self.best = {k: v.detach().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                self.best[k][g] = v[g]

    def restore_best(self, core: nn.Module) -> None:
        """Load the best weights; a member that never improved keeps its last ones."""
        for g, res in enumerate(self.results):
            if res.best_epoch < 0 and self.best is not None:
                self.keep(core, g)
        if self.best is not None:
            core.load_state_dict(self.best)

    def set_seconds(self, seconds: float) -> None:
        for res in self.results:
            res.seconds = seconds

    def add_seconds(self, train: float, val: float) -> None:
        for res in self.results:
            res.train_seconds += train
            res.val_seconds += val


def _end_epoch(s: _State, core, epoch: int, train_loss, val_loss, samples: int, rate: float,
               opt, cfg: TrainConfig, logs) -> None:
    """Record each still-training member's epoch, keep improved weights, count patience."""
    for g, res in enumerate(s.results):
        if s.stopped[g]:
            continue
        row = {"epoch": epoch, "train_loss": train_loss[g], "val_loss": val_loss[g],
               "samples_per_s": rate, "lr": opt.param_groups[0]["lr"]}
        res.history.append(row)
        res.samples += samples
        if logs[g] is not None:
            logs[g](row)
        score = val_loss[g] if not math.isnan(val_loss[g]) else train_loss[g]
        if score < res.best_val:
            res.best_val, res.best_epoch, s.bad[g] = score, epoch, 0
            s.keep(core, g)
        else:
            s.bad[g] += 1
            s.stopped[g] = not math.isnan(val_loss[g]) and s.bad[g] >= cfg.patience


def _resume(checkpoint, core, opt, sched, device, s: _State, display, logs) -> int:
    """Restore the checkpoint's state, if any (rank 0 reads it, every DDP rank gets it: the
    ranks need not share a file system); returns the first epoch still to train. One that does
    not fit the model is ignored, with a warning."""
    rank, world = dist_info()
    state = checkpoint.load() if checkpoint is not None and rank == 0 else None
    if state is not None and not fits(state, core, len(s.results)):
        warnings.warn(f"checkpoint {checkpoint.uri} does not fit the model; training from the "
                      "start", stacklevel=3)
        state = None
    if world > 1:
        box = [state]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    if state is None:
        return 0
    core.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if sched is not None and state["sched"] is not None:
        sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    first = state["epoch"] + 1
    s.best, s.bad, s.stopped = state["best"], state["bad"], state["stopped"]
    for res, saved, log in zip(s.results, state["results"], logs, strict=True):
        res.history = list(saved["history"])
        res.best_val, res.best_epoch = saved["best_val"], saved["best_epoch"]
        res.samples, res.seconds = saved["samples"], saved["seconds"]
        res.resumed_epoch, res.attempt = first, saved["attempt"] + 1
        for row in res.history if log is not None else []:
            log(row)    # a rerun's new run gets the earlier epochs too (EpochLogger skips dups)
    display.note(f"resumed from the checkpoint of epoch {first} (attempt {s.results[0].attempt})")
    return first
