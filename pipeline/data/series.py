"""SeriesArrays: every series in one flat float32 array plus `indptr` (mlforecast's GroupedArray).

Series s occupies `values[indptr[s]:indptr[s + 1]]` on a regular grid: step i is at the grid
ordinal `start[s] + i * freq.step` (`pipeline.data.calendar.Freq`: nanoseconds for sub-daily
data, days, business days or months on the calendar, or integer steps). `mask` is 1 where the
value was observed, 0 where it was filled (a gap in the timestamps) or imputed (a NaN/inf
target). Covariates are aligned row for row.
`status` is 0 for series that train, otherwise the code of the reason they are skipped
(STATUS); skipped series stay in the arrays so they can still get a fallback forecast.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.calendar import NS, Freq, label
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import Config

STATUS = {0: "ok", 1: "too_short", 2: "nan_target_dropped", 3: "no_finite_values",
          4: "negative_values"}
STATUS_CODE = {v: k for k, v in STATUS.items()}
LEVEL = "level"   # under data.hierarchy: the static naming each series' level (stages.levels)


@dataclass
class SeriesArrays:
    ids: np.ndarray                 # [S] object (str)
    indptr: np.ndarray              # [S + 1] int64
    values: np.ndarray              # [N] float32, NaN-free (imputed where mask == 0)
    mask: np.ndarray                # [N] uint8, 1 = observed
    start: np.ndarray               # [S] int64, grid ordinal of each series' first step
    freq: Freq
    status: np.ndarray              # [S] int8, 0 = trainable (see STATUS)
    past: np.ndarray | None = None  # [N, Cp] float32 past covariates
    future: np.ndarray | None = None  # [N, Cf] float32 known-future covariates
    past_names: list[str] = field(default_factory=list)
    future_names: list[str] = field(default_factory=list)
    static: dict[str, np.ndarray] = field(default_factory=dict)  # name → [S]
    groups: np.ndarray | None = None  # [S] object (str), when a group column is configured

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @property
    def end(self) -> np.ndarray:
        """Grid ordinal of each series' last step."""
        return self.start + (self.lengths - 1) * self.freq.step

    def data_end(self) -> str:
        """The partition value of the data's end (its latest step): 2024-06-30 23:00 ->
        '20240630T230000' (the local date for calendar frequencies; the step for integer
        ones); "none" without series."""
        return label(int(self.end.max()), self.freq) if len(self) else "none"

    def series(self, s: int) -> np.ndarray:
        return self.values[self.indptr[s]:self.indptr[s + 1]]

    def nbytes(self) -> int:
        arrays = [self.indptr, self.values, self.mask, self.start, self.status,
                  self.past, self.future, *self.static.values()]
        ids = sum(len(str(x)) + 8 for x in self.ids)  # pointer + characters
        return ids + sum(a.nbytes for a in arrays if a is not None)

    @staticmethod
    def from_list(values: list, ids: list | None = None, start: int | list = 0,
                  freq: Freq | None = None, mask: list | None = None) -> SeriesArrays:
        """Build from one 1-D array per series (tests, benchmarks, in-memory data); `freq`
        defaults to hourly, `start` to ordinal 0 (1970-01-01)."""
        lengths = [len(v) for v in values]
        flat = np.concatenate([np.asarray(v, np.float32) for v in values]) if values else \
            np.zeros(0, np.float32)
        return SeriesArrays(
            ids=np.array(ids if ids is not None else [f"s{i}" for i in range(len(values))],
                         dtype=object),
            indptr=np.r_[0, np.cumsum(lengths)].astype(np.int64),
            values=flat,
            mask=(np.concatenate([np.asarray(m, np.uint8) for m in mask]) if mask is not None
                  else np.ones(len(flat), np.uint8)),
            start=np.broadcast_to(np.asarray(start, np.int64), (len(values),)).copy(),
            freq=freq or Freq("ns", NS["h"]), status=np.zeros(len(values), np.int8))

    @staticmethod
    def concat(parts: list[SeriesArrays], labels: list[str] | None = None) -> SeriesArrays:
        """Join parts in order; a series may live in one part only."""
        parts = [p for p in parts if len(p)]
        if not parts:
            raise DataError("no series left after reading the input")
        _check_unique_ids(parts, labels)
        offsets = np.cumsum([0] + [p.indptr[-1] for p in parts[:-1]])
        first = parts[0]
        cat = np.concatenate
        return SeriesArrays(
            ids=cat([p.ids for p in parts]),
            indptr=cat([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets, strict=True)]
                       ).astype(np.int64),
            values=cat([p.values for p in parts]),
            mask=cat([p.mask for p in parts]),
            start=cat([p.start for p in parts]),
            freq=first.freq,
            status=cat([p.status for p in parts]),
            past=cat([p.past for p in parts]) if first.past is not None else None,
            future=cat([p.future for p in parts]) if first.future is not None else None,
            past_names=first.past_names, future_names=first.future_names,
            static={k: cat([p.static[k] for p in parts]) for k in first.static},
            groups=cat([p.groups for p in parts]) if first.groups is not None else None,
        )


def season_of(cfg: Config, arrays: SeriesArrays) -> int:
    """m for MASE, seasonal naive and `window_recent`'s centre: evaluate.season, else the
    frequency's default season (`Freq.default_season`: 24 hourly, 7 daily, 5 business-daily,
    52 or 1 weekly, 12 monthly, 4 quarterly, 1 yearly)."""
    return cfg.evaluate.season or arrays.freq.default_season(arrays.lengths)


def _check_unique_ids(parts: list[SeriesArrays], labels: list[str] | None) -> None:
    ids = np.concatenate([p.ids for p in parts])
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts == 1).all():
        return
    dup = uniq[counts > 1][0]
    where = [labels[i] if labels else f"part {i}" for i, p in enumerate(parts) if dup in set(p.ids)]
    raise DataError(f"series {dup!r} appears in more than one input file ({', '.join(where)}); "
                    "keep each series in one file (partition the input by series or group, "
                    f"not by time). {int((counts > 1).sum())} series are split this way.")
