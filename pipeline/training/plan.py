"""The plan of training jobs: one global job over every series, or one per group (a job is the
set of series it trains on), and which jobs train together as one pack."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import Config
from pipeline.data.series import SeriesArrays


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
