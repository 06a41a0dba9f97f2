"""One writer per partition (finding 6 of the output-integrity review): every flow and command
takes the lock of the partition it writes before writing anything, the validation report
included (atomic commits: test_atomicity.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ENV, FAST, ROOT, run_args

from pipeline import config as C
from pipeline import paths
from pipeline.cli import main
from pipeline.errors import EXIT_LOCKED

HOLD = """
import sys
from pipeline.stages.batch import lock
with lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()        # held until the test kills this process (no clock)
"""


@pytest.mark.slow
def test_every_writer_of_a_partition_takes_its_one_lock_before_writing(demo_dir, tmp_path,
                                                                       capsys):
    """Finding 6: locks were per flow, so `run`, `flows.nightly` and `flows.forecast_only`
    on one config and data end wrote the same partition at once; a run that found the lock
    still overwrote the validation report first."""
    out = tmp_path / "out"
    cfg = C.load("configs/demo.yaml", [f"output.path={out}"])
    path = paths.partition_lock(cfg, "20240630T230000")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(run_args("run", demo_dir, out, "--set", "tracking.enabled=false")) == \
            EXIT_LOCKED
        from flows import _common, forecast_only, nightly
        for flow in (nightly.nightly, forecast_only.forecast_only):
            args = _common.parser(flow.__name__, "").parse_args(
                ["--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}", "--set",
                 f"output.path={out}", *FAST])
            assert _common.run_flow(flow, args, registry=False).exit_code == EXIT_LOCKED
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert err.count(f"another run holds {path}") == 3
    assert sorted(os.listdir(out)) == ["_locks"]                # not even the report
