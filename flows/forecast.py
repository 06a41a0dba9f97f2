"""Forecast: validate -> windows -> train on all data -> forecast -> write (no backtest).
`python -m flows.forecast --config configs/demo.yaml`; with the Model Registry's champions
instead of training, `flows.forecast_only`."""
import sys

from flows._common import main
from pipeline.stages import forecast as F
from pipeline.stages import steps as S
from pipeline.stages.batch import Batch


def forecast(b: Batch) -> S.Outcome:
    """Train the forecast model on all the data and write its forecasts."""
    data = S.resolve(b, S.prepare(b))           # read, validate; the config for this data
    jobs = S.plan(b, data)
    inits = S.warm_start(b, data, jobs)
    final = S.final_model(b, data, jobs, None, inits)
    S.log_models(b, final)
    written = F.write_forecast(b, data, F.forecast(b, data, jobs, final))
    return S.html_report(b, S.Outcome(data, jobs, inits, final=final, forecast=written))


if __name__ == "__main__":
    sys.exit(main(forecast))
