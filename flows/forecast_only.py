"""Forecast only: read and validate today's data, load the champions from the Model Registry,
forecast, write. No training. `python -m flows.forecast_only --config configs/demo.yaml`"""
import sys

from flows._common import run_flow

STAGES = ("registry_forecast",)

if __name__ == "__main__":
    sys.exit(run_flow("forecast_only", __doc__, STAGES))
