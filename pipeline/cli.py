"""`python -m pipeline <command> --config PATH [--set section.key=value ...]`.

Commands compose the package's public functions; user errors (bad config, bad data) print one
clear line and exit with status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from pipeline import config as C
from pipeline.errors import PipelineError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo-data", help="write the hourly demo dataset")
    demo.add_argument("--out", default="data/demo")
    demo.add_argument("--series", type=int, default=120)
    demo.add_argument("--seed", type=int, default=0)
    for name, text in [("prepare", "the data stage alone: read, validate, arrays, windows"),
                       ("run", "the main job (so far: the data stage)")]:
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True)
        cmd.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p


def cmd_make_demo_data(args: argparse.Namespace) -> None:
    from pipeline.data.demo import make_demo_data
    info = make_demo_data(args.out, n_series=args.series, seed=args.seed)
    print(f"wrote {info['rows']:,} rows of {info['series']} series in {info['groups']} groups "
          f"to {info['path']}")
    for kind, ids in info["defects"].items():
        print(f"  defect {kind:<10} {', '.join(ids)}")


def runner_for(cfg: C.Config):
    """A context manager giving the runner: Ray tasks when enabled, else this process."""
    if not cfg.ray.enabled:
        from pipeline.data.prepare import local_runner
        return contextlib.nullcontext(local_runner)
    from pipeline.execution import RayRunner
    return RayRunner(cfg.ray)


def cmd_prepare(args: argparse.Namespace) -> None:
    from pipeline.data.io import write_parquet_atomic
    from pipeline.data.prepare import plan_windows, prepare, summary_lines
    t0 = time.perf_counter()
    cfg = C.load(args.config, args.set)
    with runner_for(cfg) as runner:
        prep = prepare(cfg, runner)
    plan = plan_windows(prep.arrays, cfg.windows)
    report_path = os.path.join(cfg.output.path, cfg.name, "validation_report.parquet")
    if cfg.output.report:
        write_parquet_atomic(prep.report.to_arrow(), report_path)
    for line in summary_lines(prep, plan, cfg):
        print(line)
    skipped = prep.report.filter(prep.report["action"] == "skipped")
    for row in skipped.head(10).iter_rows(named=True):
        print(f"  skipped {row['series']}: {row['issue']} ({row['detail']})")
    if len(skipped) > 10:
        print(f"  … {len(skipped) - 10} more in the report")
    if cfg.output.report:
        print(f"report       {report_path} ({len(prep.report)} rows)")
    print(f"wall time    {time.perf_counter() - t0:.1f} s")


COMMANDS = {"make-demo-data": cmd_make_demo_data, "prepare": cmd_prepare, "run": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (C.ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
