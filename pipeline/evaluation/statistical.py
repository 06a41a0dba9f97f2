"""A statistical champion: a comparator registered by its name and settings, not its weights.

`Statistical` is what the Model Registry holds for a comparator that won a group (a JSON spec,
`spec.json`, no pickle): {"kind": "statistical", "model": "auto_ets", "season": 24,
"history": 240, "horizon": 24}. At forecast time it is refitted on each series' last `history`
steps (`pipeline.forecasting.backtest.refit_forecast`), which is how such models are used. Imports
neither statsforecast, torch, Ray nor MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import STATISTICAL
from pipeline.errors import PipelineError

KIND = "statistical"
# sane values of a spec read back from the registry: [low, high] per key
BOUNDS = {"season": (1, 10_000), "history": (1, 10_000_000), "horizon": (1, 100_000)}


@dataclass(frozen=True)
class Statistical:
    model: str      # a comparator's name (pipeline.config.STATISTICAL)
    season: int     # its season_length
    history: int    # fitted on at most this many last steps of each series
    horizon: int    # steps it forecasts (the run's windows.horizon)

    @property
    def spec(self) -> dict:
        """The registered JSON spec."""
        return {"kind": KIND, "model": self.model, "season": self.season,
                "history": self.history, "horizon": self.horizon}

    @classmethod
    def from_spec(cls, spec: dict, where: str = "the registered spec",
                  horizon: int | None = None) -> Statistical:
        """The champion a spec describes; a PipelineError naming what is wrong otherwise:
        each value an integer within `BOUNDS`, and with `horizon` (the run's
        `windows.horizon`) the same horizon."""
        if not isinstance(spec, dict) or spec.get("kind") != KIND:
            raise PipelineError(f"{where} is not a statistical model spec (kind {KIND!r})")
        if spec.get("model") not in STATISTICAL:
            raise PipelineError(f"{where}: model {spec.get('model')!r} is not one of "
                                f"{', '.join(STATISTICAL)}")
        for key, (low, high) in BOUNDS.items():
            value = spec.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not low <= value <= high:
                raise PipelineError(f"{where}: {key} = {value!r} must be an integer in "
                                    f"[{low}, {high:,}]")
        if horizon is not None and spec["horizon"] != horizon:
            raise PipelineError(f"{where}: horizon {spec['horizon']} differs from this run's "
                                f"windows.horizon {horizon}")
        return cls(spec["model"], spec["season"], spec["history"], spec["horizon"])
