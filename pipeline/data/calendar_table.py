"""Calendar features as a table: computed once per distinct grid ordinal, gathered per batch.

A window of series s reads positions p (step p of the series is ordinal start_s + p·step); a
loader reaches p ∈ [−pad, len_s + H) (left-padded windows down to −lookback, forecast windows
H steps past the data). The ordinals those ranges cover are, per phase (start mod step),
intervals on the grid; merged, they are the table's rows, and series s reads row
offset_s + p. Building it runs the same torch code on the same ordinals as computing the
features per batch did, so the features are bit-identical (tests/test_calendar_table.py).
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.calendar import PERIODS, Freq


def cyclic(freq: Freq, names: list[str], ordinals: torch.Tensor) -> torch.Tensor:
    """sin and cos of each calendar field of `ordinals` [...] -> [..., 2K] float32."""
    cols = []
    for name, val in zip(names, freq.calendar_values(ordinals, names), strict=True):
        angle = val.float() * (2 * np.pi / PERIODS[name])
        cols += [torch.sin(angle), torch.cos(angle)]
    return torch.stack(cols, -1)  # K × 2 × [...] -> [..., 2K]


class CalendarTable:
    """`table` [rows, 2K] and `offset` [S] on `device`: the features of series s at position
    p ∈ [−pad, lengths_s + horizon) are table[offset_s + p]."""

    def __init__(self, freq: Freq, names: list[str], start: np.ndarray, lengths: np.ndarray,
                 pad: int, horizon: int, device: torch.device) -> None:
        self.freq, self.names, self.pad, self.horizon = freq, list(names), pad, horizon
        self.start, self.lengths = np.asarray(start, np.int64), np.asarray(lengths, np.int64)
        ordinals, offset = _rows(self.start, self.lengths, pad, horizon, freq.step)
        self.table = cyclic(freq, self.names, torch.from_numpy(ordinals)).to(device)
        self.offset = torch.from_numpy(offset).to(device)

    def covers(self, series: np.ndarray, start: np.ndarray, length: int) -> bool:
        """Whether windows (series, start) of `length` positions lie inside the table."""
        if len(series) == 0:
            return True
        end = self.lengths[series] + self.horizon
        return bool(start.min() >= -self.pad and (start + length <= end).all())

    def gather(self, series: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Features at positions pos [B, T] of series [B] -> [B, T, 2K]."""
        return self.table[self.offset[series, None] + pos]


def _rows(start: np.ndarray, lengths: np.ndarray, pad: int, horizon: int, step: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ordinals the series' ranges cover (each range's grid interval, merged per
    phase) and each series' row offset: position p of series s is row offset_s + p."""
    lo = start - pad * step                                   # each range's first ordinal
    phase = lo % step
    k_lo = (lo - phase) // step                               # grid index within its phase
    k_hi = k_lo + pad + lengths + horizon                     # one past the last
    offset = np.empty(len(start), np.int64)
    chunks, row = [], 0
    for ph in np.unique(phase):                               # usually one phase
        mine = np.flatnonzero(phase == ph)
        order = mine[np.argsort(k_lo[mine], kind="stable")]
        a, b = k_lo[order], k_hi[order]
        reach = np.maximum.accumulate(b)
        new = np.r_[True, a[1:] > reach[:-1]]                 # a gap before this range
        seg = np.cumsum(new) - 1                              # merged interval of each range
        seg_lo = a[new]
        seg_hi = np.maximum.reduceat(b, np.flatnonzero(new))
        seg_row = row + np.r_[0, np.cumsum(seg_hi - seg_lo)[:-1]]
        chunks += [ph + np.arange(x, y, dtype=np.int64) * step
                   for x, y in zip(seg_lo, seg_hi, strict=True)]
        row += int((seg_hi - seg_lo).sum())
        # position p ↔ grid index k_lo + pad + p ↔ row seg_row + (k_lo + pad + p − seg_lo)
        offset[order] = seg_row[seg] + a - seg_lo[seg] + pad
    ordinals = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return ordinals, offset
