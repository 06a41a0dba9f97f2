"""The `tune:` section: what `python -m pipeline tune` searches and how.

    tune:
      trials: 8                       # --trials
      time_budget_minutes: null       # --time-budget: no trial starts after it, running ones stop
      search: optuna                  # optuna (TPE) | random | grid (every combination of lists)
      scheduler: asha                 # asha: stop poor trials early on validation | none
      metric: mase                    # every trial's train.val_metric: mase | smape | loss
      space:                          # any windows./model./train. key: a list of choices or a
        model.encoder.type: [gru, cnn]                 # range uniform(a, b), loguniform(a, b),
        windows.lookback_horizons: [2, 4, 7]           # int(a, b), logint(a, b) (bounds
        train.lr: loguniform(1e-4, 1e-2)               # inclusive)

Keys of `space` may be dotted or nested (`--set tune.space.train.lr=...` nests them).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import ConfigError
from pipeline.config.checks import choice as _choice
from pipeline.config.checks import positive as _positive

RANGE = re.compile(r"^\s*(uniform|loguniform|int|logint)\s*\(\s*([^,()]+?)\s*,\s*([^,()]+?)"
                   r"\s*\)\s*$")
RANGES = "uniform(a, b), loguniform(a, b), int(a, b) or logint(a, b)"


@dataclass(frozen=True)
class Domain:
    """One searched key: choices (`kind` "choice") or a range [low, high]."""
    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def bounds(self) -> list:
        """The values a config must accept: each choice, or both ends of the range."""
        return list(self.values) if self.kind == "choice" else [self.low, self.high]


def parse_domain(key: str, value: Any) -> Domain:
    """A `tune.space` entry: a non-empty list of choices, or a range string."""
    where = f"tune.space.{key}"
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigError(f"{where}: an empty list of choices")
        return Domain("choice", tuple(value))
    m = RANGE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ConfigError(f"{where} = {value!r}: give a list of choices or {RANGES}")
    kind = m.group(1)
    try:
        low, high = (float(m.group(i)) for i in (2, 3))
    except ValueError:
        raise ConfigError(f"{where} = {value!r}: the bounds must be numbers") from None
    if kind in ("int", "logint"):
        if low != int(low) or high != int(high):
            raise ConfigError(f"{where} = {value!r}: {kind}() takes integer bounds")
        low, high = int(low), int(high)
    if not low < high or not all(map(math.isfinite, (low, high))):
        raise ConfigError(f"{where} = {value!r}: the lower bound must be below the upper one")
    if kind.startswith("log") and low <= 0:
        raise ConfigError(f"{where} = {value!r}: {kind}() needs a positive lower bound")
    return Domain(kind, low=low, high=high)


def flatten(space: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings of `space` as dotted keys."""
    out: dict[str, Any] = {}
    for k, v in space.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


@dataclass
class TuneConfig:
    trials: int = 8                 # trials to run (grid: each combination this many times)
    time_budget_minutes: float | None = None
    search: str = "optuna"          # optuna | random | grid
    scheduler: str = "asha"         # asha | none
    grace_epochs: int = 2           # ASHA: epochs every trial trains before it may be stopped
    reduction_factor: int = 3       # ASHA: a third of the trials go on at each rung
    metric: str = "mase"            # the validation score trials are ranked by (their
                                    # train.val_metric); loss: each trial's own loss
    per_group: bool = False         # one search per group (train.mode per_group), fanned out
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | str = "auto"  # auto: 0.25 (four trials share a GPU) where the
                                    # cluster has GPUs, else 0; fractions are scheduling labels
    max_concurrent: int | None = None  # trials at once (None: as many as the resources hold)
    seed: int = 0                   # of the search's sampler
    space: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive("tune.trials", self.trials)
        if self.time_budget_minutes is not None:
            _positive("tune.time_budget_minutes", self.time_budget_minutes)
        _choice("tune.search", self.search, ("optuna", "random", "grid"))
        _choice("tune.scheduler", self.scheduler, ("asha", "none"))
        _choice("tune.metric", self.metric, ("mase", "smape", "loss"))
        _positive("tune.grace_epochs", self.grace_epochs)
        if self.reduction_factor < 2:
            raise ConfigError(f"tune.reduction_factor must be at least 2, got "
                              f"{self.reduction_factor}")
        _positive("tune.cpus_per_trial", self.cpus_per_trial)
        if isinstance(self.gpus_per_trial, str):
            _choice("tune.gpus_per_trial", self.gpus_per_trial, ("auto",))
        else:
            _positive("tune.gpus_per_trial", self.gpus_per_trial, allow_zero=True)
        if self.max_concurrent is not None:
            _positive("tune.max_concurrent", self.max_concurrent)
        domains = self.domains()
        if self.search == "grid" and any(d.kind != "choice" for d in domains.values()):
            raise ConfigError("tune.search = 'grid' takes lists of choices only; use optuna "
                              f"or random for {RANGES}")

    def domains(self) -> dict[str, Domain]:
        """Each searched key (dotted) and its domain."""
        if not isinstance(self.space, dict):
            raise ConfigError("tune.space must map config keys to choices or ranges")
        return {k: parse_domain(k, v) for k, v in flatten(self.space).items()}
