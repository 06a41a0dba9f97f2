"""Backtest: validate -> windows -> train before the cutoffs -> score against the baselines ->
write predictions and metrics, log the run (for `python -m pipeline compare`). No forecast.
`python -m flows.backtest --config configs/m4_gru.yaml`"""
import sys

from flows._common import main
from pipeline.stages import steps as S
from pipeline.stages.batch import Batch


def backtest(b: Batch) -> S.Outcome:
    """Train before the backtest cutoffs and score the models against the baselines."""
    data = S.resolve(b, S.prepare(b))           # read, validate; the config for this data
    jobs = S.plan(b, data)
    inits = S.warm_start(b, data, jobs)
    trained = S.train(b, data, jobs, inits)
    scored = S.backtest(b, data, jobs, trained, inits)
    levels = S.levels(b, data, scored)          # data.hierarchy: scored per level
    S.log_models(b, trained)
    return S.html_report(b, S.Outcome(data, jobs, inits, trained, scored,
                                      levels=levels))   # next to the outputs


if __name__ == "__main__":
    sys.exit(main(backtest))
