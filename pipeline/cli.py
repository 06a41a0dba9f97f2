"""`python -m pipeline <command> --config PATH [--set section.key=value ...]`.

Commands compose the package's public functions; user errors (bad config, bad data) print one
clear line and exit with status 2, a failed service (MLflow server, Ray cluster, every training
job) one line and status 1; never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

from pipeline import config as C
from pipeline.errors import InfraError, PipelineError
from pipeline.names import model_file


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo-data", help="write the hourly demo dataset")
    demo.add_argument("--out", default="data/demo")
    demo.add_argument("--series", type=int, default=120)
    demo.add_argument("--seed", type=int, default=0)
    cmds = {}
    for name, text in [("prepare", "the data stage alone: read, validate, arrays, windows"),
                       ("train", "read, validate, then train (global or per group)"),
                       ("backtest", "read, validate, train, backtest against baselines"),
                       ("forecast", "read, validate, train on all data, write forecasts"),
                       ("run", "the main job: data, train, backtest, forecast, write"),
                       ("compare", "leaderboard of the tracked runs; register the champions")]:
        cmd = cmds[name] = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True)
        cmd.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
        if name != "compare":
            cmd.add_argument("--batch-id", help="the tracked batch (default: the data cutoff)")
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


@dataclass
class Outcome:
    """What run_stages did, for the flows' exit codes."""
    parent_id: str | None = None
    forecast_path: str | None = None
    failed_jobs: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # wall seconds per stage

    @contextlib.contextmanager
    def timed(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t


NEEDS_REGISTRY = {"promote", "registry_forecast"}


def run_stages(args: argparse.Namespace, stages: tuple = (), flow: str | None = None
               ) -> Outcome:
    """The data stage, then the named stages in this order:

    train | backtest   train before the backtest cutoffs (backtest: and score them)
    final | forecast   train the forecast model on all data (forecast: and write forecasts)
    promote            challenger against the registered champions; register the better
    registry_forecast  forecast with the registered champions (no training)

    With tracking on, the server is checked before anything runs and the run is logged as it
    goes (pipeline.runlog); it ends FAILED if a stage raises. With `flow`, the work after the
    data stage is one batch (pipeline.batch): locked, and skipped when already finished."""
    import uuid

    from pipeline.output import cutoff_label
    t0 = time.perf_counter()
    cfg = C.load(args.config, args.set)
    needs_registry = bool(NEEDS_REGISTRY & set(stages)) or (
        cfg.train.warm_start and bool({"train", "backtest", "final", "forecast"} & set(stages)))
    if needs_registry and not cfg.tracking.enabled:
        raise PipelineError(f"{'train.warm_start' if cfg.train.warm_start else flow or 'this'}"
                            " needs the Model Registry: set tracking.enabled: true")
    log = None
    if stages:
        from pipeline.runlog import RunLog
        log = RunLog.open(cfg)
        if needs_registry and log is None:
            raise PipelineError("the Model Registry is unreachable and this job needs it")
    out = Outcome()
    with runner_for(cfg) as runner, contextlib.ExitStack() as stack:
        with out.timed("data"):
            prep = data_stage(cfg, runner)
        arrays = prep.arrays
        cutoff = cutoff_label(int(arrays.end_ns.max())) if len(arrays) else "none"
        batch_id = getattr(args, "batch_id", None) or cutoff
        batch = None
        if flow:
            from pipeline.batch import Batch
            batch = Batch(cfg, flow, batch_id, log, getattr(args, "force", False))
            stack.enter_context(batch.guard())
        ok = False
        try:
            if log is not None:
                log.start(batch_id, cutoff, prep.report,
                          tags={"flow": flow} if flow else None)
            out.parent_id = log.parent_id if log is not None else None
            if needs_registry and not out.parent_id:
                raise InfraError("could not open the MLflow run this job needs "
                                 f"({'; '.join(log.failures[:1]) or 'unknown error'})")
            run_id = out.parent_id or uuid.uuid4().hex
            _stages(cfg, arrays, stages, run_id, log, out, args)
            ok = True
            if log is not None:
                log.timings(out.seconds)
            if batch is not None:
                batch.mark_done({"run_id": run_id, "forecast": out.forecast_path})
        finally:
            if log is not None:   # inside the lock: a finished batch is never seen RUNNING
                log.finish(ok)
                if log.parent_id:
                    print(f"tracking     {log.where()}"
                          + (f" ({len(log.failures)} logging failure(s), outputs kept)"
                             if log.failures else ""))
    print(f"wall time    {time.perf_counter() - t0:.1f} s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in out.seconds.items()) + ")")
    return out


def _stages(cfg: C.Config, arrays, stages, run_id: str, log, out: Outcome, args) -> None:
    inits = None
    results = trained = bt = bt_cols = final = None
    if cfg.train.warm_start and {"train", "backtest", "final", "forecast"} & set(stages):
        from pipeline.compare import champion_states
        from pipeline.jobs import plan_jobs
        with out.timed("warm_start"):
            inits = champion_states(cfg, arrays, plan_jobs(arrays, cfg))
    if "train" in stages or "backtest" in stages:
        with out.timed("train"):
            results = trained = train_stage(cfg, arrays, log=log, inits=inits)
    if "backtest" in stages:
        if cfg.evaluate.refit:  # one more training per later cutoff
            from pipeline.backtest import config_at
            trained = {cfg.windows.n_windows - 1: results}
            for k in range(cfg.windows.n_windows - 1):
                with out.timed("train"):
                    trained[k] = train_stage(config_at(cfg, k), arrays,
                                             label=f"backtest-cutoff{k}", inits=inits)
        with out.timed("backtest"):
            bt, bt_cols = backtest_stage(cfg, arrays, trained, run_id, log=log)
    if {"final", "forecast"} & set(stages):
        final, label = results, "backtest"
        if results is None or cfg.evaluate.final_model != "reuse":
            with out.timed("final"):
                final = train_stage(cfg, arrays, final=True, log=log, inits=inits)
            label = "final"
        if log is not None:
            with out.timed("log_models"):
                log.models(final, models_dir(cfg, label))
    elif results is not None and log is not None:
        with out.timed("log_models"):
            log.models(results, models_dir(cfg, "backtest"))
    if "promote" in stages:
        from pipeline.compare import promote
        with out.timed("promote"):
            out.promoted = promote(cfg, arrays, bt, log, final)
    if "forecast" in stages:
        with out.timed("forecast"):
            out.forecast_path = forecast_stage(cfg, arrays, final, run_id, bt_cols, log=log)
    if "registry_forecast" in stages:
        from pipeline.compare import registry_forecast
        with out.timed("forecast"):
            cols, labels = registry_forecast(cfg, arrays, getattr(args, "by", None))
            out.forecast_path = write_forecast(cfg, arrays, cols, run_id, bt_cols, log,
                                               labels)
    out.failed_jobs = sorted({r.name for r in (results or []) + (final or []) if not r.ok})


def _warm(cfg: C.Config) -> C.Config:
    """The fine-tuning budget of a warm start: train.warm_start_epochs epochs."""
    import dataclasses
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, epochs=cfg.train.warm_start_epochs))


def models_dir(cfg: C.Config, label: str) -> str:
    """Where a stage's model files go: next to the outputs when they are local; with outputs
    on object storage, a local staging folder ($PIPELINE_WORK_DIR or the temp dir) — the
    models themselves are kept by MLflow."""
    root = cfg.output.path
    if "://" in root:
        import tempfile
        root = os.environ.get("PIPELINE_WORK_DIR") or os.path.join(tempfile.gettempdir(),
                                                                   "forecast-pipeline")
    return os.path.join(root, cfg.name, "models", label)


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


def train_stage(cfg: C.Config, arrays, final: bool = False, label: str | None = None,
                log=None, inits: dict | None = None) -> list:
    """Train the plan of jobs where the config says (Ray tasks, Ray Train, or this process),
    save each model next to the outputs and print one line per job. final=True trains on all
    the data (the forecast model); otherwise training stops before the oldest backtest cutoff."""
    import dataclasses

    from pipeline.jobs import checkpoint_root, plan_jobs, run_jobs_locally, save_result
    from pipeline.train import resolve_device
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(   # resolved here, for every worker
        cfg.train, checkpoint_dir=checkpoint_root(cfg)))
    jobs = plan_jobs(arrays, cfg)
    what = "final model (all data)" if final else "before the backtest cutoffs"
    print(f"training     {cfg.model.name}: {len(jobs)} job(s), mode {cfg.train.mode}, "
          f"device {resolve_device(cfg.train.device)}, {what}")
    prefix = "final_" if final else ""
    loggers = log.loggers(jobs, prefix) if log is not None else None
    # warm-started jobs get the fine-tuning budget, the others (no champion of this
    # architecture) the full one
    parts = [(_warm(cfg), [j for j in jobs if j.name in (inits or {})]),
             (cfg, [j for j in jobs if j.name not in (inits or {})])]
    done = {}
    for part_cfg, part in parts:
        if not part:
            continue
        if not cfg.ray.enabled:
            res = run_jobs_locally(arrays, part, part_cfg, final=final, loggers=loggers,
                                   inits=inits)
        else:
            from pipeline import execution
            res = execution.train(arrays, part, part_cfg, final=final, loggers=loggers,
                                  inits=inits)
        done.update({r.name: r for r in res})
    results = [done[j.name] for j in jobs]
    if log is not None:
        log.trained(results, prefix)
    label = label or ("final" if final else "backtest")
    out = models_dir(cfg, label)
    print(f"  {'job':<12} {'series':>7} {'windows':>9} {'epochs':>6} {'best val':>9} "
          f"{'samples/s':>10}  status")
    shutil.rmtree(out, ignore_errors=True)    # no file of an earlier run is taken for ours
    for r in results:
        if r.ok:
            save_result(r, os.path.join(out, model_file(cfg.model.name, r.name)))
        status = (f"FAILED after {r.attempts} attempt(s): {r.error}" if not r.ok else
                  f"ok, resumed at epoch {r.resumed_epoch + 1}" if r.resumed_epoch else "ok")
        print(f"  {r.name:<12} {r.n_series:>7,} {r.n_windows:>9,} {len(r.history):>6} "
              f"{r.best_val:>9.4f} {r.samples_per_s:>10,.0f}  {status}")
    failed = [r for r in results if not r.ok]
    if failed and len(failed) == len(results):
        raise InfraError(f"every training job failed; first error: {failed[0].error}")
    print(f"models       {out}")
    return results


def backtest_stage(cfg: C.Config, arrays, results: list, run_id: str, log=None):
    """Score the models and the baselines at every cutoff, write predictions and per-series
    metrics, print the comparison; returns the Backtest and its prediction columns."""
    from pipeline import output
    from pipeline.backtest import backtest, concat_columns
    from pipeline.jobs import plan_jobs
    jobs = plan_jobs(arrays, cfg)
    bt = backtest(arrays, jobs, results, cfg)
    end = int(arrays.end_ns.max())
    pred_cols = concat_columns(bt.frames)
    preds = output.to_table(pred_cols, run_id)
    metrics = output.metrics_table(concat_columns(bt.metrics), run_id)
    p1 = output.write(cfg.output.path, "backtest", cfg.name, end, preds)
    p2 = output.write(cfg.output.path, "metrics", cfg.name, end, metrics)
    summary = bt.summary()
    print(f"backtest     {cfg.windows.n_windows} cutoff(s), every {cfg.windows.step} steps, "
          f"{cfg.windows.horizon} steps ahead")
    cols = ["mae", "rmse", "smape", "mase", "wape", "skill_mase"]
    print("  " + f"{'model':<22}" + "".join(f"{c:>11}" for c in cols))
    for model, row in summary.items():
        print("  " + f"{model:<22}" + "".join(f"{row.get(c, float('nan')):>11.4f}"
                                              for c in cols))
    print(f"  (skill_mase = 1 - MASE / MASE of seasonal naive)\noutputs      {p1}\n"
          f"             {p2}")
    if log is not None:
        log.backtest(bt, metrics)
    return bt, pred_cols


def forecast_stage(cfg: C.Config, arrays, results: list, run_id: str, bt_cols=None,
                   log=None) -> str:
    from pipeline.backtest import final_forecast
    from pipeline.jobs import plan_jobs
    cols = final_forecast(arrays, plan_jobs(arrays, cfg), results, cfg)
    return write_forecast(cfg, arrays, cols, run_id, bt_cols, log)


def write_forecast(cfg: C.Config, arrays, cols: dict, run_id: str, bt_cols=None, log=None,
                   champions: str | None = None) -> str:
    """Write the forecast partition (atomically), then plots, then tell the tracking run."""
    from pipeline import output
    from pipeline.backtest import FALLBACK
    table = output.to_table(cols, run_id)
    path = output.write(cfg.output.path, "forecasts", cfg.name, int(arrays.end_ns.max()), table)
    n = len(set(cols["unique_id"]))
    n_fb = int(len(set(cols["unique_id"][cols["model"] == FALLBACK])))
    print(f"forecast     {n:,} series × {cfg.windows.horizon} steps "
          f"({n_fb} by {FALLBACK}{', ' + champions if champions else ''}) -> {path}")
    pngs = []
    if cfg.evaluate.plots and "://" not in cfg.output.path:
        from pipeline.plots import plot_sample
        pngs = plot_sample(path.replace(os.sep + "forecasts" + os.sep, os.sep + "plots" + os.sep),
                           arrays, cols, bt_cols, cfg.evaluate.plots, cfg.windows.horizon,
                           cfg.model.quantiles)
        if pngs:
            print(f"plots        {len(pngs)} PNGs in {os.path.dirname(pngs[0])}")
    if log is not None:
        log.forecast(path, n, n_fb, pngs)
    return path


def cmd_compare(args: argparse.Namespace) -> None:
    from pipeline.compare import compare
    compare(C.load(args.config, args.set), metric=args.metric, by=args.by,
            all_cutoffs=args.all_cutoffs, register=not args.no_register)


def cmd_prepare(args: argparse.Namespace) -> None:
    run_stages(args)


def cmd_train(args: argparse.Namespace) -> None:
    run_stages(args, ("train",))


def cmd_backtest(args: argparse.Namespace) -> None:
    run_stages(args, ("backtest",))


def cmd_forecast(args: argparse.Namespace) -> None:
    run_stages(args, ("registry_forecast",) if args.from_registry else ("forecast",))


def cmd_run(args: argparse.Namespace) -> None:
    run_stages(args, ("backtest", "forecast"))


COMMANDS = {"make-demo-data": cmd_make_demo_data, "prepare": cmd_prepare, "train": cmd_train,
            "backtest": cmd_backtest, "forecast": cmd_forecast, "run": cmd_run,
            "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except InfraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (C.ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not type(e).__module__.startswith("mlflow"):
            raise
        print(f"error: MLflow: {type(e).__name__}: {str(e).splitlines()[0][:500]}",
              file=sys.stderr)
        return 1
    return 0
