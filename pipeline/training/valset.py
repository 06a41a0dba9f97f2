"""The validation windows of a fit: a seeded sample drawn once (`val_sample`, the same every
epoch, so early stopping compares like with like) and its batches, gathered once and kept
across epochs (`ValBatches`): they do not change between epochs, and gathering them (the
calendar features, the window scaling) cost as much as the forward pass that scores them.
`pipeline.training.loop.validate` scores them."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.config import TrainConfig
from pipeline.data.loader import WindowLoader, stack_batches
from pipeline.data.windows import WindowIndex

VAL_MIN_WINDOWS = 3000


def val_sample(index: WindowIndex | None, cfg: TrainConfig, per_epoch: int,
               seed: int | None = None) -> WindowIndex | None:
    """At most `cfg.val_max_windows` validation windows ("auto": a quarter of `per_epoch`, the
    windows an epoch trains on, at least VAL_MIN_WINDOWS), drawn once with the seed (`seed`,
    else cfg.seed) — the same every epoch, so early stopping compares like with like — in index
    order. A window's forward pass costs about a third of its training step, so a quarter of
    an epoch's windows keeps validation near a tenth of the training time (a fifth for the
    recipe's smallest epochs, 20 × 256 windows); the mean loss of a few thousand windows ranks
    epochs as well as all of them. Thousands of series hold far more validation windows than a
    sampled epoch trains on."""
    limit = cfg.val_max_windows
    if limit == "auto":
        limit = max(VAL_MIN_WINDOWS, per_epoch // 4)
    if index is None or limit is None or len(index) <= limit:
        return index
    g = torch.Generator().manual_seed((cfg.seed if seed is None else seed) * 1_000_003 + 7)
    rows = torch.randperm(len(index), generator=g)[:limit].sort().values
    return index.take(rows.numpy())


VAL_CACHE_BYTES = 512 * 2**20   # validation batches kept on the device across epochs


class ValBatches:
    """The pack's validation batches, in chunks of `batch_size` windows: gathered once and
    kept (they do not change between epochs) when they fit in VAL_CACHE_BYTES, else gathered
    again on each pass. Members with fewer windows than the longest are padded with masked-out
    windows, so every member's batch has one size. Yields (the batch, stacked [G, B, ...] when
    G > 1, windows that count [G])."""

    def __init__(self, data: Sequence, val: Sequence[WindowIndex | None],
                 batch_size: int) -> None:
        self.data, self.val, self.batch_size = data, val, batch_size
        self.n_val = [0 if v is None else len(v) for v in val]
        self.kept: list | None = None
        size = max(self.n_val) * sum(_window_bytes(d.loader) for d in data)
        if any(self.n_val) and size <= VAL_CACHE_BYTES:
            self.kept = list(self._gather())

    def __iter__(self):
        return iter(self.kept) if self.kept is not None else self._gather()

    def _gather(self):
        longest = max(self.n_val)
        for i in range(0, longest, self.batch_size):
            rows = torch.arange(i, min(i + self.batch_size, longest))
            batches = []
            for d, v, n in zip(self.data, self.val, self.n_val, strict=True):
                ok = rows < n
                idx = v if n else d.train          # pad from any window; masked out below
                take = torch.where(ok, rows, 0)
                b = d.loader.gather(torch.from_numpy(idx.series)[take],
                                    torch.from_numpy(idx.start)[take])
                if not ok.all():
                    b.y_mask = b.y_mask * ok.to(b.y_mask)[:, None]
                batches.append(b)
            real = torch.tensor([int((rows < n).sum()) for n in self.n_val], dtype=torch.float32)
            yield (batches[0] if len(batches) == 1 else stack_batches(batches)), real


def _window_bytes(loader: WindowLoader) -> int:
    """A window's bytes in a batch: x, xf, y, y_mask, static and the per-window scalars."""
    return 4 * (loader.L * loader.x_channels + loader.H * (loader.future_size + 2)
                + loader.static_size + 8)
