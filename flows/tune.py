"""Tune: read and validate the data, search `tune.space` on Ray Tune (every trial a child run
of this run), write the best config as YAML; `search_then_backtest` (`python -m pipeline tune`)
then backtests it. `python -m flows.tune --config configs/demo_tune.yaml` (the search alone)"""
import argparse
import functools
import sys

from flows import backtest
from flows._common import main, run_flow
from pipeline.errors import EXIT_OK
from pipeline.stages import steps as S
from pipeline.stages import tune as tuning
from pipeline.stages.batch import Batch


def tune(b: Batch, trials: int | None = None, minutes: float | None = None,
         out: str | None = None) -> S.Outcome:
    """Search the config's `tune.space`; write the tuned config."""
    data = S.resolve(b, S.prepare(b))           # read, validate; the config for this data
    return S.Outcome(data, tuned=tuning.tune(b, data, trials, minutes, out))


def search_then_backtest(args: argparse.Namespace) -> list[Batch]:
    """The search (a batch of its own, its trials child runs of its run), then, for a global
    search, the tuned config's backtest as `backtest` runs it (an ordinary run `compare`
    ranks), which the search's run names in its tag `tune.backtest_run_id`. `args`: the
    `tune` command's (config, set, batch_id, trials, time_budget, out, no_backtest)."""
    search = functools.update_wrapper(
        functools.partial(tune, trials=args.trials, minutes=args.time_budget, out=args.out),
        tune)
    searched = run_flow(search, args, record=False)
    tuned = searched.outcome.tuned if searched.exit_code == EXIT_OK else None
    if tuned is None or args.no_backtest or None not in tuned.files:
        return [searched]
    print(f"backtest of the tuned config {tuned.files[None]}")
    again = argparse.Namespace(config=tuned.files[None], set=[], batch_id=args.batch_id)
    checked = run_flow(backtest.backtest, again, record=False)
    if searched.log is not None and checked.log is not None and checked.log.parent_id:
        searched.log.tag("tune.backtest_run_id", checked.log.parent_id)
    return [searched, checked]


if __name__ == "__main__":
    sys.exit(main(tune))
