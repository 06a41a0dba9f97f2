"""The CLI: demo data, the data stage, and clear one-line errors."""
import subprocess
import sys

import polars as pl
import pytest

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
    assert set(report["issue"]) >= {"too_short", "gaps", "nan_target", "unsorted",
                                    "covariate_missing"}
    assert report["series"].null_count() == 0 and report["file"].null_count() == 0


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


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["global", "packed"])
def test_run_trains_on_ray_and_saves_loadable_models(ray_session, demo_dir, tmp_path, capsys,
                                                     mode):
    from pipeline.models import load_model
    config = "configs/demo.yaml" if mode == "global" else "configs/per_group.yaml"
    args = ["run", "--config", config, "--set", f"data.path={demo_dir}", "--set",
            f"output.path={tmp_path}", "--set", "train.epochs=1", "--set",
            "train.steps_per_epoch=2", "--set", "evaluate.comparators=[auto_theta]"]  # cheap
    assert main(args) == 0
    text = capsys.readouterr().out
    models = sorted((tmp_path).glob("*/models/*/*.pt"))  # (MLflow keeps copies elsewhere)
    expected = 2 * (1 if mode == "global" else 4)  # backtest models and final models
    assert len(models) == expected and text.count("  ok") == expected
    assert len(list((tmp_path / "forecasts").rglob("*.parquet"))) == 1
    model = load_model(models[0])
    assert sum(p.numel() for p in model.parameters()) > 0
