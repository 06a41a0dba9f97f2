"""Nightly: validate -> windows -> train (or warm start from the champion) -> backtest ->
challenger against champion on the same backtest -> promote the better -> forecast with the
champions -> write. `python -m flows.nightly --config configs/demo.yaml [--force]`"""
import sys

from flows._common import main
from pipeline.stages import forecast as F
from pipeline.stages import steps as S
from pipeline.stages.batch import Batch

REGISTRY = True     # needs the Model Registry


def nightly(b: Batch) -> S.Outcome:
    """Train a challenger, promote it where it beats the champion, forecast with the
    champions."""
    data = S.prepare(b)                          # read, validate
    data = S.resolve(b, data)                    # the config for this data; open the batch
    jobs = S.plan(b, data)                       # one global job, or one per group
    inits = S.warm_start(b, data, jobs)          # champions' weights (train.warm_start)
    trained = S.train(b, data, jobs, inits)      # before the backtest cutoffs
    scored = S.backtest(b, data, jobs, trained, inits)   # against the baselines; written
    final = S.final_model(b, data, jobs, trained, inits)  # on all the data
    S.log_models(b, final)
    decisions = S.promote(b, data, scored, final)         # challenger vs champion
    forecast = F.registry_forecast(b, data, calibration=scored.calibration)  # the champions
    F.write_forecast(b, data, forecast, scored)
    return S.html_report(b, S.Outcome(data, jobs, inits, trained, scored, final, decisions,
                                    forecast))   # the batch's page, next to the outputs


if __name__ == "__main__":
    sys.exit(main(nightly, registry=REGISTRY))
