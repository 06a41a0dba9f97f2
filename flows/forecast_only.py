"""Forecast only: read and validate today's data, load the champions from the Model Registry,
forecast, write. No training. `python -m flows.forecast_only --config configs/demo.yaml`"""
import sys

from flows._common import main
from pipeline.stages import forecast as F
from pipeline.stages import steps as S
from pipeline.stages.batch import Batch

REGISTRY = True


def forecast_only(b: Batch, by: str | None = None) -> S.Outcome:
    """Forecast with the registered champions (per group, or one global with by="global")."""
    data = S.resolve(b, S.prepare(b))           # read, validate; the config for this data
    forecast = F.write_forecast(b, data, F.registry_forecast(b, data, by))
    return S.html_report(b, S.Outcome(data, forecast=forecast))   # the page, next to the outputs


if __name__ == "__main__":
    sys.exit(main(forecast_only, registry=REGISTRY))
