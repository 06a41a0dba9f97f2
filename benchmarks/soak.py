"""A soak of the nightly flow: `python -m flows.nightly` N times in a row on the demo panel
(small settings, Ray on, tracking on its own `mlflow server`), one fault per run, then a clean
run; after each run the outputs, locks, runs and champions are checked.

    python benchmarks/soak.py [--runs 30] [--seed 0] [--kinds worker_kill,sigterm,...]
                              [--work DIR]

Faults (one per run, drawn at random, or in the order `--kinds` gives):
- worker_kill: SIGKILL of the first training task's worker, by the pid that task reported
  (its `_pack_task` wrapped to report it: tests/victims.py, as the tests do); `ray.max_retries`=1
  retries it: exit 0.
- commit_kill: the driver SIGKILLs itself once the forecasts' new file is written, before the
  rename (`PIPELINE_FAULT_AT=tmp-written@forecasts`): exit -9; the next run marks its runs.
- mlflow_stop: the tracking server stopped once training started (restarted after the run):
  exit 4 (outputs written, record incomplete) or 1 (the registry was needed and gone).
- disk_full: ENOSPC raised where the forecasts' file is written (an injected OSError: a
  `prlimit --fsize` on the driver is inherited by Ray's raylet, which is C++ and dies of
  SIGXFSZ, so the limit cannot be confined to the writer): exit 1, the old partition stays.
- sigterm: SIGTERM once training started: exit 1, the run marked KILLED.

After each run: every Parquet partition readable by pyarrow and from one run (a whole old or
whole new version), no duplicate rows, the forecasts' rows never fewer than the first whole
run's (data lost), no lock held, no run RUNNING but those a kill just left (the next run of
the batch marks them; none after the clean run), champions unchanged unless promoted. Prints a
table, then one JSON line. `--flow ARGS` is the flow itself with the fault hooks (internal).
"""
from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import glob
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]   # the tests' services and timeouts

KINDS = ("worker_kill", "commit_kill", "mlflow_stop", "disk_full", "sigterm")
EXPECTED = {"worker_kill": {0}, "commit_kill": {-signal.SIGKILL}, "mlflow_stop": {1, 4},
            "disk_full": {1}, "sigterm": {1}, "clean": {0}}
LEAVES_RUNNING = {"commit_kill", "mlflow_stop"}      # marked KILLED by the next run
SMALL = ["train.epochs=1", "train.steps_per_epoch=3", "model.encoder.hidden_size=8",
         "windows.lookback=72", "evaluate.comparators=[]", "evaluate.plots=0",
         "ray.max_retries=1", "ray.num_cpus=2", "tracking.experiment=soak"]
KEYS = {"forecasts": ["unique_id", "step"], "backtest": ["unique_id", "cutoff", "model", "step"]}


# ------------------------------------------------------------------ the flow, with its hooks

def run_flow(argv: list[str]) -> int:
    """flows.nightly with the hooks the environment asks for: SOAK_PIDS (training tasks
    report their pids there), SOAK_ENOSPC (writing the forecasts fails with ENOSPC)."""
    from victims import reporting_pid

    from flows import nightly
    from flows._common import main
    from pipeline.data import io
    from pipeline.execution import ray_train
    if os.environ.get("SOAK_PIDS"):
        ray_train._pack_task = reporting_pid(ray_train._pack_task, os.environ["SOAK_PIDS"])
    if os.environ.get("SOAK_ENOSPC"):
        point = io.fault_point

        def full(step: str, path: str) -> None:
            if step == "tmp-written" and "/forecasts/" in path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            point(step, path)
        io.fault_point = full
    return main(nightly.nightly, argv, registry=nightly.REGISTRY)


# ------------------------------------------------------------------ the checks

def partitions(out: str) -> dict[str, str]:
    """Every output partition file (dot-files, which readers skip, left out): path -> kind."""
    found = {}
    for kind in ("forecasts", "backtest", "metrics"):
        for path in glob.glob(os.path.join(out, kind, "**", "*.parquet"), recursive=True):
            if not any(p.startswith(".") for p in path[len(out):].split(os.sep)):
                found[path] = kind
    return found


def check_outputs(out: str, base_rows: int | None) -> tuple[list[str], int, dict]:
    """(problems, rows lost, forecast rows per partition) of the outputs as they are now."""
    import pyarrow.parquet as pq
    problems, lost, rows = [], 0, {}
    for path, kind in partitions(out).items():
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - an unreadable partition is the finding
            problems.append(f"unreadable {path}: {type(e).__name__}: {e}")
            continue
        if "run_id" in table.column_names and len(set(table["run_id"].to_pylist())) > 1:
            problems.append(f"{path} mixes runs")
        key = [k for k in KEYS.get(kind, []) if k in table.column_names]
        if key and table.group_by(key).aggregate([]).num_rows != table.num_rows:
            problems.append(f"{path} has duplicate rows")
        if kind == "forecasts":
            rows[path] = table.num_rows
            lost += max(0, (base_rows or 0) - table.num_rows)
    return problems, lost, rows


def locks_held(out: str) -> list[str]:
    held = []
    for path in glob.glob(os.path.join(out, "_locks", "*.lock")):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(path)
        finally:
            os.close(fd)
    return held


def registry_state(url: str) -> tuple[list[str], dict[str, str]]:
    """(ids of runs RUNNING, registered model -> its champion's version)."""
    import mlflow
    c = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    ids = [e.experiment_id for e in c.search_experiments()]
    running = [r.info.run_id for r in c.search_runs(ids, "attributes.status = 'RUNNING'")]
    champions = {}
    for m in c.search_registered_models():
        if "champion" in (m.aliases or {}):
            champions[m.name] = str(m.aliases["champion"])
    return running, champions


# ------------------------------------------------------------------ the soak

class Soak:
    """The demo panel, the outputs and an `mlflow server` (SQLite backend) in `work`; `run`
    runs the flow once with a fault and checks what it left."""

    def __init__(self, work: str) -> None:
        from services import MlflowServer

        from pipeline.data.demo import make_demo_data
        self.work, self.out = work, os.path.join(work, "out")
        self.data = os.path.join(work, "demo")
        make_demo_data(self.data, n_series=40, seed=1)
        self.backend = f"sqlite:///{os.path.join(work, 'mlflow.db')}"
        self.server = MlflowServer(self.backend, work)
        self.url = self.server.wait()
        self.base_rows: int | None = None
        self.rows: list[dict] = []
        self.running_before: list[str] = []

    def close(self) -> None:
        self.server.stop()

    def restart_server(self) -> None:
        from services import MlflowServer
        if self.server.proc.poll() is None:
            return
        self.server = MlflowServer(self.backend, self.work, port=self.server.port)
        self.server.wait()

    def command(self) -> list[str]:
        sets = [f"data.path={self.data}", f"output.path={self.out}", f"tracking.uri={self.url}",
                *SMALL]
        return [sys.executable, os.path.abspath(__file__), "--flow", "--config",
                "configs/demo.yaml", "--force", *[a for s in sets for a in ("--set", s)]]

    def start(self, kind: str, n: int) -> tuple[subprocess.Popen, str]:
        pids = os.path.join(self.work, f"pids-{n}")
        env = {**os.environ, "PYTHONPATH": ROOT, "SOAK_PIDS": pids, "OMP_NUM_THREADS": "1",
               "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        if kind == "commit_kill":
            env["PIPELINE_FAULT_AT"] = "tmp-written@forecasts"
        if kind == "disk_full":
            env["SOAK_ENOSPC"] = "1"
        log = open(os.path.join(self.work, f"run-{n}.log"), "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        return proc, pids

    def fault(self, kind: str, proc: subprocess.Popen, pids: str) -> bool:
        """Inject `kind` once training started (its first task reported its pid); False when
        the run ended first."""
        from timeouts import EVENT, wait_until
        from victims import reported
        if kind not in ("worker_kill", "mlflow_stop", "sigterm"):
            return True
        wait_until(lambda: reported(pids) or proc.poll() is not None, EVENT, "a training task")
        if proc.poll() is not None:
            return False
        if kind == "worker_kill":
            os.kill(reported(pids)[0], signal.SIGKILL)      # the pid its own task reported
        elif kind == "mlflow_stop":
            self.server.stop()
        else:
            proc.send_signal(signal.SIGTERM)
        return True

    def run(self, kind: str, n: int) -> dict:
        from timeouts import COMMAND, scaled
        _, champions = registry_state(self.url)
        t0 = time.monotonic()
        proc, pids = self.start(kind, n)
        try:
            injected = self.fault(kind, proc, pids)
            rc = proc.wait(scaled(COMMAND))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)     # its own session (start_new_session)
                proc.wait()
        self.restart_server()
        return self.check(kind, n, rc, injected, champions, time.monotonic() - t0)

    def check(self, kind: str, n: int, rc: int, injected: bool, champions: dict,
              seconds: float) -> dict:
        log = pathlib.Path(self.work, f"run-{n}.log").read_text(errors="replace")
        problems, lost, rows = check_outputs(self.out, self.base_rows)
        if rc in (0, 4) and self.base_rows is None and rows:
            self.base_rows = max(rows.values())
        if rc not in EXPECTED[kind]:
            problems.append(f"exit {rc}, documented {sorted(EXPECTED[kind])}")
        lines = [x for x in log.splitlines() if x.startswith("error: ")]
        if rc not in (0, 4, -signal.SIGKILL) and len(lines) != 1:
            problems.append(f"{len(lines)} error: lines")
        problems += [f"lock held: {p}" for p in locks_held(self.out)]
        running, after = registry_state(self.url)
        if running and kind not in LEAVES_RUNNING:
            problems.append(f"{len(running)} run(s) left RUNNING")
        if after != champions and "-> promoted" not in log:
            problems.append(f"champions changed without a promotion: {champions} -> {after}")
        row = {"run": n, "fault": kind, "injected": injected, "exit": rc, "lost": lost,
               "running": len(running), "seconds": round(seconds, 1), "problems": problems}
        self.rows.append(row)
        return row


def table(rows: list[dict]) -> dict:
    """Print the table by fault kind; return the figures."""
    by = collections.defaultdict(list)
    for r in rows:
        by[r["fault"]].append(r)
    print(f"{'fault':<12} {'runs':>5} {'injected':>9} {'survived':>9} {'exit codes':<16} "
          f"{'lost':>5}")
    for kind, rs in sorted(by.items()):
        codes = ",".join(str(c) for c in sorted({r['exit'] for r in rs}))
        print(f"{kind:<12} {len(rs):>5} {sum(r['injected'] for r in rs):>9} "
              f"{sum(not r['problems'] for r in rs):>9} {codes:<16} "
              f"{sum(r['lost'] for r in rs):>5}")
    last = rows[-1] if rows else {"running": -1}
    return {"benchmark": "soak", "runs": len(rows),
            "faults": {k: len(v) for k, v in sorted(by.items()) if k != "clean"},
            "survived": sum(not r["problems"] for r in rows),
            "data_lost": sum(r["lost"] for r in rows),
            "running_left": last["running"],
            "problems": [f"run {r['run']} {r['fault']}: {p}" for r in rows
                         for p in r["problems"]],
            "seconds": round(sum(r["seconds"] for r in rows), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="runs with a fault (then one clean)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="", help="comma-separated faults, in this order "
                                              "(cycled); default: drawn at random")
    p.add_argument("--work", default=None, help="a folder (default: a temporary one)")
    args = p.parse_args(argv)
    order = [k for k in args.kinds.split(",") if k]
    if any(k not in KINDS for k in order):
        print(f"error: --kinds: choose among {', '.join(KINDS)}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    kinds = [order[i % len(order)] if order else rng.choice(KINDS) for i in range(args.runs)]
    soak = Soak(args.work or tempfile.mkdtemp(prefix="soak-"))
    try:
        for n, kind in enumerate([*kinds, "clean"], 1):
            r = soak.run(kind, n)
            print(f"run {n:>3} {kind:<12} exit {r['exit']:>3}  {r['seconds']:>6.1f} s  "
                  f"{'ok' if not r['problems'] else '; '.join(r['problems'])}", flush=True)
    finally:
        soak.close()
    figures = table(soak.rows)
    print(json.dumps(figures))
    return 0 if not figures["problems"] and figures["data_lost"] == 0 else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--flow"]:
        sys.exit(run_flow(sys.argv[2:]))
    sys.exit(main())
