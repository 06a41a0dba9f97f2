"""Train: validate -> windows -> train before the backtest cutoffs -> save and log the models.
`python -m flows.train --config configs/demo.yaml`"""
import sys

from flows._common import main
from pipeline.stages import steps as S
from pipeline.stages.batch import Batch


def train(b: Batch) -> S.Outcome:
    """Train the models (before the backtest cutoffs, as `backtest` would score them)."""
    data = S.resolve(b, S.prepare(b))           # read, validate; the config for this data
    jobs = S.plan(b, data)
    inits = S.warm_start(b, data, jobs)
    trained = S.train(b, data, jobs, inits)
    S.log_models(b, trained)
    return S.html_report(b, S.Outcome(data, jobs, inits, trained))   # next to the outputs


if __name__ == "__main__":
    sys.exit(main(train))
