"""`python -m pipeline <command> --config PATH [--set section.key=value ...]`.

The top of the house: a thin argparse layer. `prepare`, `train`, `backtest`, `forecast` and
`run` are the flows of those names (`flows/`), run whenever asked (a scheduled `python -m
flows.<name>` skips a batch that already finished); `compare` ranks the tracked runs; `tune`
searches `tune.space` on Ray Tune, writes the best config and backtests it. Exit codes
and the one-line reasons are `pipeline.errors`'s; never a traceback for a user's mistake. The
only module of the package that imports `flows`.
"""
from __future__ import annotations

import argparse
import functools
import sys
import warnings

from flows import backtest, forecast, forecast_only, prepare, run, train
from flows import tune as tune_flow
from flows._common import add_arguments, run_flow
from pipeline import config as C
from pipeline.data import demo
from pipeline.errors import EXIT_OK, exit_code, one_line
from pipeline.outputs import console as report
from pipeline.stages.batch import Batch, format_warning
from pipeline.tracking import champions as ranking

FLOWS = {"prepare": (prepare.prepare, "the data stage alone: read, validate, arrays, windows"),
         "train": (train.train, "read, validate, then train (global or per group)"),
         "backtest": (backtest.backtest, "read, validate, train, backtest against baselines"),
         "forecast": (forecast.forecast, "read, validate, train on all data, write forecasts"),
         "run": (run.run, "the main job: data, train, backtest, forecast, write")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo-data", help="write the hourly demo dataset (or, with "
                                                 "--kind monthly, a monthly retail panel)")
    demo.add_argument("--kind", choices=("hourly", "monthly"), default="hourly")
    demo.add_argument("--out", default=None, help="data/demo (hourly), data/retail (monthly)")
    demo.add_argument("--series", type=int, default=None, help="120 (hourly), 60 (monthly)")
    demo.add_argument("--seed", type=int, default=0)
    cmds = {}
    for name, (_, text) in FLOWS.items():
        cmds[name] = sub.add_parser(name, help=text)
        add_arguments(cmds[name], batch=False)
        cmds[name].add_argument("--batch-id", help="the tracked batch (default: the data cutoff)")
    cmds["compare"] = sub.add_parser("compare", help="leaderboard of the tracked runs; register "
                                                     "the champions")
    add_arguments(cmds["compare"], batch=False)
    cmds["forecast"].add_argument(
        "--from-registry", action="store_true",
        help="no training: forecast with the champions registered by `compare`")
    for name in ("forecast", "compare"):
        cmds[name].add_argument(
            "--by", choices=["group", "global"],
            help="a champion per group or one global champion (default: per group when "
                 "data.group_col is set)")
    cmds["compare"].add_argument("--metric", default="mase",
                                 help="backtest metric to rank by, lower is better")
    cmds["compare"].add_argument("--all-cutoffs", action="store_true",
                                 help="rank runs of every data cutoff, not only the latest")
    cmds["compare"].add_argument("--no-register", action="store_true",
                                 help="print the leaderboard without touching the registry")
    _tune_parser(sub)
    return p


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value
    return parse


def _tune_parser(sub) -> None:
    t = sub.add_parser("tune", help="search tune.space on Ray Tune (each trial an MLflow child "
                                    "run), write the best config, backtest it")
    add_arguments(t, batch=False)
    t.add_argument("--batch-id", help="the search (default: the data cutoff); an unfinished "
                                      "search of this batch is resumed")
    t.add_argument("--trials", type=_positive(int), help="trials to run (default: tune.trials)")
    t.add_argument("--time-budget", type=_positive(float), metavar="MINUTES",
                   help="start no trial after this many minutes, stop running ones")
    t.add_argument("--out", help="where the tuned config goes (default: <config>.tuned.yaml "
                                 "beside the config; a folder with tune.per_group)")
    t.add_argument("--no-backtest", action="store_true",
                   help="only search; do not backtest the tuned config")


def make_demo_data(args: argparse.Namespace) -> int:
    if args.kind == "monthly":
        info = demo.make_retail_data(args.out or "data/retail", n_series=args.series or 60,
                                     seed=args.seed)
    else:
        info = demo.make_demo_data(args.out or "data/demo", n_series=args.series or 120,
                                   seed=args.seed)
    print(f"wrote {info['rows']:,} rows of {info['series']} series in {info['groups']} groups "
          f"to {info['path']}")
    for kind, ids in info["defects"].items():
        print(f"  defect {kind:<10} {', '.join(ids)}")
    return EXIT_OK


def compare(args: argparse.Namespace) -> int:
    warnings.formatwarning = format_warning
    try:
        cfg = C.load(args.config, args.set)
        report.comparison(ranking.compare(cfg, metric=args.metric, by=args.by,
                                          all_cutoffs=args.all_cutoffs,
                                          register=not args.no_register))
    except Exception as e:  # noqa: BLE001 - one line and a code, as the flows
        print(one_line(e, "compare"), file=sys.stderr)
        return exit_code(e)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run a command; its exit code."""
    args = _parser().parse_args(argv)
    if args.command == "make-demo-data":
        return make_demo_data(args)
    if args.command == "compare":
        return compare(args)
    if args.command == "tune":
        return tune(args)[-1].exit_code
    return execute(args).exit_code


def tune(args: argparse.Namespace | list[str]) -> list[Batch]:
    """`tune`: the search, then the tuned config's backtest (`flows.tune.search_then_backtest`);
    the batches run."""
    if isinstance(args, list):
        args = _parser().parse_args(args)
    return tune_flow.search_then_backtest(args)


def execute(args: argparse.Namespace | list[str]) -> Batch:
    """Run a flow command (prepare, train, backtest, forecast, run); the finished Batch, with
    what the flow returned (`Batch.outcome`) and the exit code."""
    if isinstance(args, list):
        args = _parser().parse_args(args)
    if args.command == "forecast" and args.from_registry:
        flow = functools.update_wrapper(
            functools.partial(forecast_only.forecast_only, by=args.by),
            forecast_only.forecast_only)
        return run_flow(flow, args, record=False, registry=True)
    return run_flow(FLOWS[args.command][0], args, record=False,
                    tracked=args.command != "prepare")
