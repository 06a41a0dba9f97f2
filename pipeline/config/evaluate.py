"""The `evaluate:` section: the backtest, the comparators, the final forecast's fallback,
combination and intervals; the `promote:` section: when a challenger replaces a champion."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.checks import ConfigError
from pipeline.config.checks import choice as _choice
from pipeline.config.checks import positive as _positive

# the names of pipeline.evaluation.comparators.COMPARATORS
STATISTICAL = ("auto_ets", "auto_theta", "auto_arima", "dynamic_theta")


@dataclass
class EvaluateConfig:
    """Backtest and final forecast. The backtest cutoffs are `windows.n_windows` / `step`."""

    season: int | None = None      # m of MASE and seasonal naive; None = from the frequency
    final_model: str = "refit"     # refit: train again on all data for the forecast | reuse
    refit: bool = False            # backtest: train before every cutoff (else once, before the
                                   # oldest, and predict every cutoff with that model)
    plots: int = 6                 # PNGs of this many series (history, backtest, forecast)
    comparators: list[str] = field(default_factory=lambda: ["auto_ets", "auto_theta"])
                                   # statsforecast models scored beside the baselines
                                   # (STATISTICAL items; [] turns them off)
    comparator_history: int | str | None = "auto"  # fit a comparator on at most the last N
                                   # steps before the cutoff; auto/null: max(10 × season, 100)
    fallback: str = "seasonal_naive"  # forecast of series the model cannot serve:
                                   # seasonal_naive | auto_ets
    intervals: str = "none"        # none | conformal (split-conformal from the backtest's
                                   # residuals; needs windows.n_windows >= 2)
    levels: list[int] = field(default_factory=lambda: [80, 95])  # conformal coverage, in %
    combine: list[str] = field(default_factory=list)  # comparators averaged with the network
                                   # into the run's forecast (model `combination`); [] = none
    combine_by: str = "mean"       # mean | median of the network and the combine comparators,
                                   # step by step (median: one member's miss does not carry;
                                   # with one comparator the two are the same)
    select: str = "auto"           # auto: per group, publish the candidate (the network, the
                                   # combination, each comparator) with the lowest backtest
                                   # MASE | network: the network (the combination under combine)
    chunk_series: int | None = 100_000  # the backtest and the forecast take this many
                                   # series at a time, each chunk's rows streamed into the
                                   # partition file (memory bounded by a chunk); null: all

    def __post_init__(self) -> None:
        _choice("evaluate.final_model", self.final_model, ("refit", "reuse"))
        _choice("evaluate.select", self.select, ("auto", "network"))
        _choice("evaluate.combine_by", self.combine_by, ("mean", "median"))
        if self.chunk_series is not None:
            _positive("evaluate.chunk_series", self.chunk_series)
        if self.season is not None:
            _positive("evaluate.season", self.season)
        _positive("evaluate.plots", self.plots, allow_zero=True)
        for name in self.comparators:
            _choice("evaluate.comparators[]", name, STATISTICAL)
        if len(set(self.comparators)) != len(self.comparators):
            raise ConfigError(f"evaluate.comparators = {self.comparators}: a name repeats")
        for name in self.combine:
            if name not in self.comparators:
                raise ConfigError(f"evaluate.combine names {name!r}, which is not in "
                                  f"evaluate.comparators = {self.comparators}: the backtest "
                                  "scores what it combines")
        if isinstance(self.comparator_history, str):
            _choice("evaluate.comparator_history", self.comparator_history, ("auto",))
        elif self.comparator_history is not None:
            _positive("evaluate.comparator_history", self.comparator_history)
        _choice("evaluate.fallback", self.fallback, ("seasonal_naive", "auto_ets"))
        _choice("evaluate.intervals", self.intervals, ("none", "conformal"))
        if not self.levels or any(not 0 < v < 100 for v in self.levels) or \
                len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"evaluate.levels = {self.levels}: distinct whole percentages "
                              "in (0, 100), e.g. [80, 95]")

    def history_cap(self, season: int) -> int:
        """Steps of history a comparator is fitted on (`comparator_history`; auto: the
        larger of 10 seasons and 100 steps)."""
        if isinstance(self.comparator_history, int):
            return self.comparator_history
        return max(10 * season, 100)


@dataclass
class PromoteConfig:
    """Challenger against champion (`nightly`, `compare`'s promotion): scored on the same
    backtest windows, the challenger replaces the champion only when its metric is lower by
    more than `min_improvement` of the champion's (0.02: at least 2 % better), so noise
    between equally good runs does not promote."""
    min_improvement: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.min_improvement, int | float) or \
                not 0 <= self.min_improvement < 1:
            raise ConfigError(f"promote.min_improvement = {self.min_improvement!r}: a fraction "
                              "of the champion's metric in [0, 1), e.g. 0.02")
