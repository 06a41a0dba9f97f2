"""Backtest: validate -> windows -> train before the cutoffs -> score against the baselines ->
write predictions and metrics, log the run (for `python -m pipeline compare`). No forecast.
`python -m flows.backtest --config configs/m4_gru.yaml`"""
import sys

from flows._common import run_flow

STAGES = ("backtest",)

if __name__ == "__main__":
    sys.exit(run_flow("backtest", __doc__, STAGES))
