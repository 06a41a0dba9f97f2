"""What a run publishes, chosen by its backtest (`evaluate.select: auto`): per group (one
choice for all series without groups), the candidate with the lowest backtest MASE over the
group's series and cutoffs among the network, the combination (under `evaluate.combine`) and
each statistical comparator. The default candidate — what `evaluate.select: network` always
publishes: the combination under `evaluate.combine`, else the network — wins ties and groups
where no candidate has a finite score. Every candidate's score is kept with the choice."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.config import Config
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


def select(bt: Backtest, cfg: Config) -> dict[str, Choice]:
    """{group ("" without groups): Choice} from the backtest's per-group summaries; {} with
    `evaluate.select: network` or when only the default is a candidate."""
    names = candidates(cfg)
    if cfg.evaluate.select != "auto" or len(names) == 1:
        return {}
    out = {}
    for group, by_model in bt.group_summaries().items():
        scores = {m: by_model[m].get(METRIC, math.nan) for m in names if m in by_model}
        finite = [(scores[m], i, m) for i, m in enumerate(names)
                  if math.isfinite(scores.get(m, math.nan))]
        out[group] = Choice(min(finite)[2] if finite else names[0], scores)
    return out


def published(selection: dict[str, Choice], group: str, cfg: Config) -> str:
    """The model published for `group`."""
    choice = selection.get(group)
    return choice.model if choice is not None else default_model(cfg)
