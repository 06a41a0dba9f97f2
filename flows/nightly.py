"""Nightly: validate -> windows -> train (or warm start from the champion) -> backtest ->
challenger against champion on the same backtest -> promote the better -> forecast with the
champions -> write. `python -m flows.nightly --config configs/demo.yaml [--force]`"""
import sys

from flows._common import run_flow

STAGES = ("backtest", "final", "promote", "registry_forecast")

if __name__ == "__main__":
    sys.exit(run_flow("nightly", __doc__, STAGES))
