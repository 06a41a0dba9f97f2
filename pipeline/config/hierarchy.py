"""The hierarchy's settings (issue #30): the shape of `data.hierarchy` (levels from the top
down, each a list of static columns; the bottom level is the series themselves) and the
`reconcile:` section (which method makes the levels' forecasts add up)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.checks import ConfigError
from pipeline.config.checks import choice as _choice
from pipeline.config.checks import positive as _positive

KEY = "data.hierarchy"
TOP_DOWN = ("top_down_forecast_proportions", "top_down_average_proportions",
            "top_down_proportion_averages")
MIN_TRACE = ("ols", "wls_struct", "wls_var", "mint_shrink", "mint_cov")
METHODS = ("bottom_up", *TOP_DOWN, *MIN_TRACE)   # pipeline.hierarchy.reconcile's methods
# normality: the quantiles of the reconciled Gaussian (mean coherent, quantiles in order);
# quantiles: each quantile slice reconciled like the mean (each slice coherent, may cross)
INTERVALS = ("normality", "quantiles")
# names a level column may not take: the `level` static and partition key, and the columns and
# partition keys of the levels' forecast files
TAKEN = ("level", "unique_id", "ds", "cutoff", "step", "y_hat", "model", "group", "run_id",
         "created_at", "job", "data_end")


def hierarchy_levels(raw: object) -> tuple[tuple[str, ...], ...]:
    """A raw spec (a list of lists of column names, top first) → its levels, or ConfigError
    naming the bad level (counted from 1, top first): each level starts with the columns of
    the level above and adds at least one, so every node has exactly one parent."""
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigError(f"{KEY} must be a non-empty list of levels, each a list of "
                          f"column names (e.g. [[], [region], [region, store]]), got {raw!r}")
    levels: list[tuple[str, ...]] = []
    for i, level in enumerate(raw, 1):
        where = f"{KEY} level {i} {level!r}"
        if not isinstance(level, list | tuple) or not all(
                isinstance(c, str) and c for c in level):
            raise ConfigError(f"{where} must be a list of column names ([] for the total)")
        if len(set(level)) != len(level):
            raise ConfigError(f"{where} names a column twice")
        if levels:
            above = levels[-1]
            if tuple(level[:len(above)]) != above or len(level) <= len(above):
                raise ConfigError(f"{where} must start with the columns of level {i - 1} "
                                  f"{list(above)!r} and add at least one")
        levels.append(tuple(level))
    return tuple(levels)


def check_hierarchy(data) -> None:
    """`data.hierarchy` (a DataConfig's) well formed and naming static columns of the data
    contract (`data.static_cols`, or `data.group_col`; the id column has its one role)."""
    if not data.hierarchy:
        return
    levels = hierarchy_levels(data.hierarchy)
    statics = [*data.static_cols, *([data.group_col] if data.group_col else [])]
    if "level" in statics:
        raise ConfigError(f"{KEY}: the static column 'level' would be overwritten by the "
                          "series' level (a static every series gets); rename it")
    for col in levels[-1]:
        if col in TAKEN:
            raise ConfigError(f"{KEY} names column {col!r}, which the levels' forecast files "
                              "use themselves; rename it in the input")
        if col not in statics:
            raise ConfigError(f"{KEY} names column {col!r}, which is not a static column "
                              f"of the data (data.static_cols = {data.static_cols}, "
                              f"data.group_col = {data.group_col!r})")


@dataclass
class ReconcileConfig:
    """How the forecasts of every level of `data.hierarchy` are made coherent (unused
    without one). `auto`: MinTrace `mint_shrink` (residuals from the backtest windows) up to
    `auto_max` series over all levels, the sparse `wls_struct` above."""

    method: str = "auto"           # auto | bottom_up | top_down_* | ols | wls_struct |
                                   # wls_var | mint_shrink | mint_cov
    auto_max: int = 2000           # auto: mint_shrink up to this many series, wls_struct above
    intervals: str = "normality"   # normality | quantiles: how the quantile columns reconcile

    def __post_init__(self) -> None:
        _choice("reconcile.method", self.method, ("auto", *METHODS))
        _choice("reconcile.intervals", self.intervals, INTERVALS)
        _positive("reconcile.auto_max", self.auto_max)

    def check(self, data) -> None:
        """Against `data` (a DataConfig): the top-down methods split the grand total, so
        `data.hierarchy` must start with it."""
        if self.method in TOP_DOWN and data.hierarchy and data.hierarchy[0]:
            raise ConfigError(f"reconcile.method = {self.method!r} needs the grand total level "
                              f"[] at the top of {KEY} (got {data.hierarchy!r})")

    def resolved(self, n_series: int) -> str:
        """The method for `n_series` series over all levels (`auto` resolved)."""
        if self.method != "auto":
            return self.method
        return "mint_shrink" if n_series <= self.auto_max else "wls_struct"
