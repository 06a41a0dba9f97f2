"""The `output:` section: where the forecasts, backtest and metrics go, in which format, and
what is published (clipping at zero)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.checks import ConfigError
from pipeline.config.checks import choice as _choice
from pipeline.config.checks import positive as _positive


@dataclass
class OutputConfig:
    path: str = "outputs"          # local path or pyarrow fs URI
    report: bool = True            # write the validation report next to the outputs
    format: str = "parquet"        # parquet (a folder per partition, every reader opens it)
                                   # | delta (Delta Lake tables: commits, writer conflicts)
    clip_at_zero: bool | str = "auto"  # forecasts, quantiles and intervals at least 0, and 0
                                   # where a series' history is all 0; auto: when every value
                                   # of the history is >= 0 (resolved by the data stage)
    delta_retention_hours: int | None = 168  # delta: files no version of the last this many
                                   # hours reads are vacuumed after each write; null: never

    def __post_init__(self) -> None:
        _choice("output.format", self.format, ("parquet", "delta"))
        if isinstance(self.clip_at_zero, str):
            _choice("output.clip_at_zero", self.clip_at_zero, ("auto",))
        elif not isinstance(self.clip_at_zero, bool):
            raise ConfigError(f"output.clip_at_zero = {self.clip_at_zero!r}: auto, true or "
                              "false")
        if self.delta_retention_hours is not None:
            _positive("output.delta_retention_hours", self.delta_retention_hours,
                      allow_zero=True)
