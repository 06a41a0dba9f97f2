"""The CLI: demo data, the data stage, and clear one-line errors."""
import subprocess
import sys

import polars as pl

from pipeline.cli import main


def test_make_demo_data_then_prepare(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["make-demo-data", "--out", str(out), "--series", "30"]) == 0
    assert "too_short" in capsys.readouterr().out
    code = main(["prepare", "--config", "configs/demo.yaml", "--set", f"data.path={out}",
                 "--set", f"output.path={tmp_path / 'out'}", "--set", "ray.enabled=false"])
    text = capsys.readouterr().out
    assert code == 0
    for needle in ("series read  30 (27 usable", "skipped      3 too_short", "windows ",
                   "skipped S0001: too_short", "wall time"):
        assert needle in text, needle
    report = pl.read_parquet(tmp_path / "out" / "demo" / "validation_report.parquet")
    assert set(report["issue"]) >= {"too_short", "gaps", "nan_target", "unsorted"}


def test_errors_are_one_line_without_traceback(tmp_path):
    cases = [["prepare", "--config", "configs/demo.yaml", "--set", "windows.lookbak=3"],
             ["prepare", "--config", "configs/demo.yaml", "--set", f"data.path={tmp_path}/x"],
             ["prepare", "--config", str(tmp_path / "missing.yaml")]]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                           text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
