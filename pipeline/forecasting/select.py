"""What a run publishes, chosen by its backtest (`evaluate.select: auto`): per group (one
choice for all series without groups), the candidate with the lowest backtest MASE over the
group's series and cutoffs among the network, the combination (under `evaluate.combine`) and
each statistical comparator. Under `data.hierarchy` the choice is per group and level (the
aggregated series are scored in the same backtest): a total may publish a comparator where
the bottom publishes the network. The default candidate — what `evaluate.select: network` always
publishes: the combination under `evaluate.combine`, else the network — wins ties and groups
where no candidate has a finite score. Every candidate's score is kept with the choice."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import Config
from pipeline.data.series import LEVEL, SeriesArrays
from pipeline.forecasting.backtest import COMBINATION, Backtest

METRIC = "mase"


@dataclass
class Choice:
    model: str                                     # the published candidate
    scores: dict[str, float] = field(default_factory=dict)   # every candidate's METRIC


def default_model(cfg: Config) -> str:
    return COMBINATION if cfg.evaluate.combine else cfg.model.name


def candidates(cfg: Config) -> list[str]:
    """The default first, then the network, then the comparators."""
    return list(dict.fromkeys([default_model(cfg), cfg.model.name, *cfg.evaluate.comparators]))


def selection_key(group: str, level: str | None = None) -> str:
    """The key a choice is made under: the group ("" without groups), and under a hierarchy
    its level too: "<level>" or "<level>:<group>"."""
    if level is None:
        return group
    return f"{level}:{group}" if group else level


def series_keys(arrays: SeriesArrays) -> np.ndarray:
    """[N] each series' `selection_key` (object array of str)."""
    groups = arrays.groups.astype(str) if arrays.groups is not None else \
        np.full(len(arrays), "", dtype=object)
    levels = arrays.static.get(LEVEL)
    if levels is None:
        return np.asarray(groups, dtype=object)
    return np.array([selection_key(g, str(lv)) for g, lv in zip(groups, levels, strict=True)],
                    dtype=object)


def select(bt: Backtest, cfg: Config, arrays: SeriesArrays | None = None
           ) -> dict[str, Choice]:
    """{`selection_key` (the group, "" without groups; with its level when `arrays` carry
    one): Choice} from the backtest's summaries per key; {} with `evaluate.select: network`
    or when only the default is a candidate."""
    names = candidates(cfg)
    if cfg.evaluate.select != "auto" or len(names) == 1:
        return {}
    by = None
    if arrays is not None and LEVEL in arrays.static:
        by = dict(zip(arrays.ids.astype(str).tolist(), series_keys(arrays).tolist(),
                      strict=True))
    out = {}
    for group, by_model in bt.group_summaries(by).items():
        scores = {m: by_model[m].get(METRIC, math.nan) for m in names if m in by_model}
        finite = [(scores[m], i, m) for i, m in enumerate(names)
                  if math.isfinite(scores.get(m, math.nan))]
        out[group] = Choice(min(finite)[2] if finite else names[0], scores)
    return out


def published(selection: dict[str, Choice], key: str, cfg: Config) -> str:
    """The model published for `key` (a `selection_key`)."""
    choice = selection.get(key)
    return choice.model if choice is not None else default_model(cfg)
