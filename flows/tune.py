"""Tune: read and validate the data, search `tune.space` on Ray Tune (every trial a child run
of this run), write the best config as YAML. `python -m pipeline tune` then backtests it.
`python -m flows.tune --config configs/demo_tune.yaml`"""
import sys

from flows._common import main
from pipeline.stages import steps as S
from pipeline.stages import tune as tuning
from pipeline.stages.batch import Batch


def tune(b: Batch, trials: int | None = None, minutes: float | None = None,
         out: str | None = None) -> S.Outcome:
    """Search the config's `tune.space`; write the tuned config."""
    data = S.prepare(b)
    return S.Outcome(data, tuned=tuning.tune(b, data, trials, minutes, out))


if __name__ == "__main__":
    sys.exit(main(tune))
