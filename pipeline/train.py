"""The training loop: `fit(model, data, cfg, loss_fn, log=callback)`. Imports neither Ray nor
MLflow; the execution layer calls it inside Ray tasks or Ray Train workers.

Batches are gathered from the series arrays by index arithmetic (`WindowLoader`); on a GPU the
arrays sit on the device and batches are gathered there, with no DataLoader workers. The window
order comes from a torch.Generator seeded with (seed, epoch, rank), so the same seed and data on
the CPU give bit-identical weights. Under torch.distributed (DDP), each rank trains on its shard
of the window index and the validation loss is averaged over ranks, so all stop together.
On CUDA, bf16 autocast unless train.precision says fp32.
"""
from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data.loader import Batch, WindowLoader
from pipeline.data.windows import WindowIndex
from pipeline.models.packed import clip_grad_norm_per_group, group_losses

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
    attempt: int = 1            # 1 + the attempts before it that left a checkpoint

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA unless fp32 is asked for; none on the CPU unless bf16 is."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def dist_info() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def mean_over_ranks(value: float, device: torch.device) -> float:
    rank, world = dist_info()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The window order of one epoch: a function of (seed, epoch, rank) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + rank)


def shard(index: WindowIndex, rank: int, world: int) -> WindowIndex:
    """Every world-th window from `rank`, cut to the same length on every rank (DDP needs the
    same number of steps everywhere)."""
    if world == 1:
        return index
    per_rank = len(index) // world
    return index.take(np.arange(rank, per_rank * world, world))


def val_sample(index: WindowIndex | None, cfg: TrainConfig, per_epoch: int
               ) -> WindowIndex | None:
    """At most `cfg.val_max_windows` validation windows ("auto": `per_epoch`, the windows an
    epoch trains on, at least 1,024), drawn once with the seed — the same every epoch, so early
    stopping compares like with like — in index order. Thousands of series hold far more
    validation windows than a sampled epoch trains on."""
    limit = cfg.val_max_windows
    if limit == "auto":
        limit = max(1024, per_epoch)
    if index is None or limit is None or len(index) <= limit:
        return index
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7)
    rows = torch.randperm(len(index), generator=g)[:limit].sort().values
    return index.take(rows.numpy())


def _epoch_windows(data: TrainData, cfg: TrainConfig) -> int:
    """Windows one epoch of `fit` trains on in one process (the job's, before DDP shards)."""
    per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    return min(per_epoch, cfg.steps_per_epoch or per_epoch) * cfg.batch_size


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int):
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    elif cfg.scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr,
                                                    total_steps=max(total_steps, 1))
    else:
        sched = None
    return opt, sched


def forward(model: nn.Module, b: Batch, amp: torch.dtype | None, train: bool) -> torch.Tensor:
    with torch.autocast(b.x.device.type, dtype=amp, enabled=amp is not None):
        return model(b.x, b.xf, b.static, b.idx, target=b.y if train else None).float()


def train_epoch(model, data: TrainData, index: WindowIndex, opt, sched, loss_fn, cfg, amp,
                gen: torch.Generator) -> tuple[float, int]:
    """One pass (or `steps_per_epoch` batches) over the windows; (mean loss, samples)."""
    model.train()
    total, n = 0.0, 0
    for b in data.loader.batches(index, cfg.batch_size, shuffle=True, generator=gen,
                                 steps=cfg.steps_per_epoch):
        loss = loss_fn(forward(model, b, amp, True), b.y, b.y_mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.detach() * len(b)  # stays on the device: no sync per step
        n += len(b)
    return float(total) / max(n, 1), n


@torch.no_grad()
def evaluate_loss(model, data: TrainData, index: WindowIndex, loss_fn, batch_size: int,
                  amp) -> float:
    """Mean loss over `index`, weighted by batch size."""
    model.eval()
    total, n = 0.0, 0
    for b in data.loader.batches(index, batch_size):
        total += loss_fn(forward(model, b, amp, False), b.y, b.y_mask) * len(b)
        n += len(b)
    return float(total) / n if n else math.nan


def fit(model: nn.Module, data: TrainData, cfg: TrainConfig, loss_fn: nn.Module, *,
        log: Log | None = None, progress: bool = True, checkpoint=None) -> FitResult:
    """Train `model` in place; the weights of the best validation epoch are restored at the end
    (the last epoch's when there is no validation data). `checkpoint` (a
    `pipeline.checkpoint.Checkpoint`): resume from its state when it holds one, and save the
    whole state when it is due; a resumed run ends with the same weights, bit for bit on the
    CPU, as one that was never interrupted."""
    device = data.loader.device
    amp = autocast_dtype(cfg, device)
    rank, world = dist_info()
    train_idx = shard(data.train, rank, world)
    if len(train_idx) == 0:
        raise ValueError("no training windows: the series are too short for lookback + horizon "
                         "+ validation, or every series was skipped")
    per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    steps = min(per_epoch, cfg.steps_per_epoch or per_epoch)
    val = val_sample(data.val, cfg, _epoch_windows(data, cfg))
    val_idx = shard(val, rank, world) if val is not None and len(val) else None
    opt, sched = make_optimizer(model, cfg, steps * cfg.epochs)
    display = Progress(cfg.epochs, enabled=progress and rank == 0)
    core = getattr(model, "module", model)   # the model inside a DDP wrapper
    result, best_state, bad_epochs, stop = FitResult(), None, 0, False
    saved = _resume_state(checkpoint, core)
    if saved is not None:
        best_state, bad_epochs, stop = _restore(saved, core, opt, sched, device, result)
        display.note(f"resumed from the checkpoint of epoch {result.resumed_epoch} "
                     f"(attempt {result.attempt})")
        for row in result.history if log is not None else []:
            log(row)    # a rerun's new run gets the earlier epochs too (EpochLogger skips dups)
    t0 = time.perf_counter() - result.seconds
    for epoch in range(result.resumed_epoch, cfg.epochs if not stop else 0):
        gen = epoch_generator(cfg.seed, epoch, rank)
        te = time.perf_counter()
        train_loss, n = train_epoch(model, data, train_idx, opt, sched, loss_fn, cfg, amp, gen)
        train_loss = mean_over_ranks(train_loss, device)
        val_loss = (mean_over_ranks(evaluate_loss(model, data, val_idx, loss_fn,
                                                  cfg.batch_size * 4, amp), device)
                    if val_idx is not None else math.nan)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
               "samples_per_s": n * world / (time.perf_counter() - te),
               "lr": opt.param_groups[0]["lr"]}
        result.history.append(row)
        result.samples += n * world
        display.update(row)
        if log is not None:
            log(row)
        score = val_loss if val_idx is not None else train_loss
        if score < result.best_val:
            result.best_val, result.best_epoch, bad_epochs = score, epoch, 0
            best_state = copy.deepcopy(core.state_dict())
        else:
            bad_epochs += 1
        stop = val_idx is not None and bad_epochs >= cfg.patience
        if checkpoint is not None and rank == 0 and epoch + 1 < cfg.epochs and \
                checkpoint.due():
            result.seconds = time.perf_counter() - t0
            checkpoint.save(_snapshot(epoch, core, opt, sched, device, result, best_state,
                                      bad_epochs, stop))
        if stop:
            display.note(f"early stop: no better validation loss for {cfg.patience} epochs")
            break
    result.seconds = time.perf_counter() - t0
    if best_state is not None:
        core.load_state_dict(best_state)
    display.close(result)
    return result


def _loop_state(epoch: int, model, opt, sched, device: torch.device) -> dict:
    """The state every loop resumes from: weights, optimizer and schedule, and the torch RNG
    of the CPU and of the training GPU (dropout, teacher forcing); the window order is a
    function of (seed, epoch, rank)."""
    return {"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict() if sched is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _fits(state: dict, model) -> bool:
    """The checkpoint's weights have the model's names and shapes (checked before anything
    is loaded: a failed load_state_dict may have copied part of it)."""
    mine = model.state_dict()
    theirs = state.get("model", {})
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape for k in mine)


def _restore_loop(state: dict, model, opt, sched, device: torch.device) -> int:
    """Inverse of `_loop_state`; returns the first epoch still to train."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if sched is not None and state["sched"] is not None:
        sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["epoch"] + 1


def _result_state(r: FitResult) -> dict:
    return {"history": r.history, "best_val": r.best_val, "best_epoch": r.best_epoch,
            "samples": r.samples, "seconds": r.seconds, "attempt": r.attempt}


def _restore_result(state: dict, r: FitResult, epoch: int) -> None:
    r.history = list(state["history"])
    r.best_val, r.best_epoch = state["best_val"], state["best_epoch"]
    r.samples, r.seconds = state["samples"], state["seconds"]
    r.resumed_epoch, r.attempt = epoch, state["attempt"] + 1


def _snapshot(epoch, model, opt, sched, device, result: FitResult, best_state,
              bad_epochs: int, stop: bool) -> dict:
    """Everything the rest of `fit` depends on: the loop's state, the best weights so far,
    the early-stopping counters and the history."""
    return {**_loop_state(epoch, model, opt, sched, device), **_result_state(result),
            "best_state": best_state, "bad_epochs": bad_epochs, "stop": stop}


def _resume_state(checkpoint, model) -> dict | None:
    """Rank 0 reads the checkpoint and every DDP rank gets the same state (the ranks need not
    share a file system). One that does not fit the model is ignored, with a warning."""
    import warnings
    rank, world = dist_info()
    state = checkpoint.load() if checkpoint is not None and rank == 0 else None
    if state is not None and not _fits(state, model):
        warnings.warn(f"checkpoint {checkpoint.uri} does not fit the model; training from the "
                      "start", stacklevel=2)
        state = None
    if world > 1:
        box = [state]
        torch.distributed.broadcast_object_list(box, src=0)
        state = box[0]
    return state


def _restore(state: dict, model, opt, sched, device, result: FitResult):
    _restore_result(state, result, _restore_loop(state, model, opt, sched, device))
    return state["best_state"], state["bad_epochs"], state["stop"]


class Progress:
    """One updating line on a terminal; plain log lines otherwise (cron, CI, Ray logs)."""

    def __init__(self, epochs: int, enabled: bool = True, stream=None) -> None:
        self.epochs, self.enabled = epochs, enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        text = (f"epoch {row['epoch'] + 1}/{self.epochs}  train {row['train_loss']:.4f}  "
                f"val {row['val_loss']:.4f}  {row['samples_per_s']:,.0f} samples/s")
        self.stream.write(f"\r{text}\033[K" if self.tty else text + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")

    def close(self, result: FitResult) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


# ------------------------------------------------------------------ packed per-group training

def fit_packed(packed: nn.Module, data: list[TrainData], cfg: TrainConfig, loss_fn: nn.Module,
               *, log: Log | None = None, progress: bool = True,
               checkpoint=None) -> list[FitResult]:
    """Train G per-group models packed in one module (`pipeline.models.packed.PackedModel`).

    Group g draws its batches exactly as `fit` would for its own job (same seeded stream), the
    loss is the sum of per-group means and gradients are clipped per group, so each group's
    weights equal separate training on the same steps. Every step needs one full batch per
    group: an epoch is `steps_per_epoch` steps, or as many as the largest group needs (smaller
    groups then cycle through fresh permutations). Early stopping and the restored best weights
    are per group; training ends when every group has stopped. `checkpoint`: as in `fit`, for
    the whole pack.
    """
    G = len(data)
    amp = autocast_dtype(cfg, data[0].loader.device)
    if any(len(d.train) == 0 for d in data):
        empty = [g for g, d in enumerate(data) if len(d.train) == 0]
        raise ValueError(f"groups {empty} have no training windows")
    steps = cfg.steps_per_epoch or max(math.ceil(len(d.train) / cfg.batch_size) for d in data)
    data = [TrainData(d.loader, d.train, val_sample(d.val, cfg, _epoch_windows(d, cfg)))
            for d in data]   # each group's validation windows as fit samples its job's
    opt, sched = make_optimizer(packed, cfg, steps * cfg.epochs)
    results = [FitResult() for _ in range(G)]
    best = {k: v.detach().clone() for k, v in packed.state_dict().items()}
    bad, stopped = [0] * G, [False] * G
    display = Progress(cfg.epochs, enabled=progress)
    first = 0
    device = data[0].loader.device
    saved = _resume_state(checkpoint, packed)
    if saved is not None:
        first = _restore_loop(saved, packed, opt, sched, device)
        for res, state in zip(results, saved["results"], strict=True):
            _restore_result(state, res, first)
        best, bad, stopped = saved["best"], saved["bad"], saved["stopped"]
        display.note(f"resumed from the checkpoint of epoch {first} "
                     f"(attempt {results[0].attempt})")
    t0 = time.perf_counter() - results[0].seconds
    for epoch in range(first, cfg.epochs if not all(stopped) else 0):
        te = time.perf_counter()
        train_loss = _packed_epoch(packed, data, steps, opt, sched, loss_fn, cfg, amp, epoch)
        val_loss = _packed_val(packed, data, loss_fn, cfg, amp)
        rate = steps * cfg.batch_size * G / (time.perf_counter() - te)
        for g, res in enumerate(results):
            if stopped[g]:
                continue
            row = {"epoch": epoch, "train_loss": train_loss[g], "val_loss": val_loss[g],
                   "samples_per_s": rate / G, "lr": opt.param_groups[0]["lr"]}
            res.history.append(row)
            res.samples += steps * cfg.batch_size
            score = val_loss[g] if not math.isnan(val_loss[g]) else train_loss[g]
            if score < res.best_val:
                res.best_val, res.best_epoch, bad[g] = score, epoch, 0
                for k, v in packed.state_dict().items():
                    best[k][g] = v[g]
            else:
                bad[g] += 1
                stopped[g] = not math.isnan(val_loss[g]) and bad[g] >= cfg.patience
        display.update({"epoch": epoch, "train_loss": float(np.mean(train_loss)),
                        "val_loss": float(np.nanmean(val_loss)) if not np.isnan(val_loss).all()
                        else math.nan, "samples_per_s": rate})
        if log is not None:
            log({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                 "samples_per_s": rate})
        if checkpoint is not None and epoch + 1 < cfg.epochs and checkpoint.due():
            for res in results:
                res.seconds = time.perf_counter() - t0
            checkpoint.save({**_loop_state(epoch, packed, opt, sched, device), "best": best,
                             "bad": bad, "stopped": stopped,
                             "results": [_result_state(r) for r in results]})
        if all(stopped):
            display.note("early stop: every group stopped improving")
            break
    packed.load_state_dict(best)
    elapsed = time.perf_counter() - t0
    for res in results:
        res.seconds = elapsed
    display.close(results[0])
    return results


def _packed_epoch(packed, data, steps, opt, sched, loss_fn, cfg, amp, epoch):
    """`steps` steps of one full batch per group; returns each group's mean train loss."""
    packed.train()
    streams = [d.loader.batches(d.train, cfg.batch_size, shuffle=True, steps=steps,
                                generator=epoch_generator(cfg.seed, epoch))
               for d in data]
    total = None
    for group_batches in zip(*streams, strict=True):
        b = stack_batches(group_batches)
        with torch.autocast(b.x.device.type, dtype=amp, enabled=amp is not None):
            pred = packed(b.x, b.xf, b.static, b.idx).float()
        losses = group_losses(loss_fn, pred, b.y, b.y_mask)  # [G]
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        if cfg.grad_clip:
            clip_grad_norm_per_group(packed, cfg.grad_clip)
        opt.step()
        if sched is not None:
            sched.step()
        total = losses.detach() if total is None else total + losses.detach()
    return (total / steps).tolist()


@torch.no_grad()
def _packed_val(packed, data, loss_fn, cfg, amp) -> list[float]:
    """Each group's validation loss over its own windows (NaN where a group has none)."""
    packed.eval()
    n_val = [0 if d.val is None else len(d.val) for d in data]
    if not any(n_val):
        return [math.nan] * len(data)
    bs = cfg.batch_size * 4  # as evaluate_loss, so the batches (and losses) match fit's
    sums, counts = torch.zeros(len(data)), torch.zeros(len(data))
    for i in range(0, max(n_val), bs):
        group_batches, real = [], []
        for d, n in zip(data, n_val, strict=True):
            rows = torch.arange(i, i + bs)
            ok = rows < n
            real.append(int(ok.sum()))
            rows = torch.where(ok, rows, 0)  # pad with window 0, masked out below
            idx = d.val if n else d.train
            b = d.loader.gather(torch.from_numpy(idx.series)[rows],
                                torch.from_numpy(idx.start)[rows])
            b.y_mask = b.y_mask * ok.to(b.y_mask)[:, None]
            group_batches.append(b)
        b = stack_batches(tuple(group_batches))
        with torch.autocast(b.x.device.type, dtype=amp, enabled=amp is not None):
            pred = packed(b.x, b.xf, b.static, b.idx).float()
        weight = torch.tensor(real, dtype=torch.float32)
        sums += group_losses(loss_fn, pred, b.y, b.y_mask).cpu() * weight
        counts += weight
    out = (sums / counts.clamp(min=1)).tolist()
    return [v if n else math.nan for v, n in zip(out, n_val, strict=True)]


def stack_batches(batches: tuple[Batch, ...]) -> Batch:
    """G batches of equal size -> one batch with a leading group dimension [G, B, ...]."""
    def st(name):
        first = getattr(batches[0], name)
        return None if first is None else torch.stack([getattr(b, name) for b in batches])
    return Batch(**{name: st(name) for name in Batch.__dataclass_fields__})
