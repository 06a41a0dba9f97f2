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
                       ("train", "read, validate, then train (global or per group)"),
                       ("run", "the main job (so far: data stage and training)")]:
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


def cmd_prepare(args: argparse.Namespace, train: bool = False) -> None:
    t0 = time.perf_counter()
    cfg = C.load(args.config, args.set)
    with runner_for(cfg) as runner:
        prep = data_stage(cfg, runner)
        if train:
            train_stage(cfg, prep.arrays)
    print(f"wall time    {time.perf_counter() - t0:.1f} s")


def data_stage(cfg: C.Config, runner):
    from pipeline.data.io import write_parquet_atomic
    from pipeline.data.prepare import plan_windows, prepare, summary_lines
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
    return prep


def train_stage(cfg: C.Config, arrays) -> list:
    """Train the plan of jobs where the config says (Ray tasks, Ray Train, or this process),
    save each model next to the outputs and print one line per job."""
    from pipeline.jobs import plan_jobs, run_jobs_locally, save_result
    from pipeline.train import resolve_device
    jobs = plan_jobs(arrays, cfg)
    print(f"training     {cfg.model.name}: {len(jobs)} job(s), mode {cfg.train.mode}, "
          f"device {resolve_device(cfg.train.device)}")
    if not cfg.ray.enabled:
        results = run_jobs_locally(arrays, jobs, cfg)
    else:
        from pipeline import execution
        results = execution.train(arrays, jobs, cfg)
    out = os.path.join(cfg.output.path, cfg.name, "models")
    print(f"  {'job':<12} {'series':>7} {'windows':>9} {'epochs':>6} {'best val':>9} "
          f"{'samples/s':>10}  status")
    for r in results:
        if r.ok:
            save_result(r, os.path.join(out, f"{cfg.model.name}-{r.name}.pt"))
        status = "ok" if r.ok else f"FAILED after {r.attempts} attempt(s): {r.error}"
        print(f"  {r.name:<12} {r.n_series:>7,} {r.n_windows:>9,} {len(r.history):>6} "
              f"{r.best_val:>9.4f} {r.samples_per_s:>10,.0f}  {status}")
    failed = [r for r in results if not r.ok]
    if failed and len(failed) == len(results):
        raise PipelineError(f"every training job failed; first error: {failed[0].error}")
    print(f"models       {out}")
    return results


def cmd_train(args: argparse.Namespace) -> None:
    cmd_prepare(args, train=True)


COMMANDS = {"make-demo-data": cmd_make_demo_data, "prepare": cmd_prepare, "train": cmd_train,
            "run": cmd_train}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (C.ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
