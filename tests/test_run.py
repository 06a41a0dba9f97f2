"""The `run` main job end to end on the demo data: outputs, schema, idempotent reruns."""
import glob
import os

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import config as C
from pipeline.cli import execute, main
from pipeline.data.calendar import Freq
from pipeline.stages.steps import Outcome

FAST = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set",
        "tracking.enabled=false", "--set",
        "windows.lookback=72", "--set", "model.encoder.hidden_size=8", "--set",
        "evaluate.comparators=[]"]  # on in the demo.yaml run below; more in their own tests
SCHEMA = ["unique_id", "ds", "cutoff", "step", "y_hat", "model", "group", "run_id",
          "created_at"]


def run(config, data, out, *extra):
    """`python -m pipeline run`; the finished batch, with each stage's result."""
    b = execute(["run", "--config", config, "--set", f"data.path={data}", "--set",
                 f"output.path={out}", *FAST, *extra])
    assert b.exit_code == 0
    no_results_store(b)
    return b


def no_results_store(b) -> None:
    """What the flow made comes back typed (`Batch.outcome`); the batch keeps no store of
    results by name (its only mapping is the seconds per stage)."""
    assert isinstance(b.outcome, Outcome) and not hasattr(b, "results")
    stores = [k for k, v in vars(b).items() if isinstance(v, dict)
              and any(not isinstance(x, int | float) for x in v.values())]
    assert stores == []


def read(out, kind):
    files = glob.glob(os.path.join(out, kind, "job=*", "**", "*.parquet"), recursive=True)
    return files, pl.read_parquet(files, hive_partitioning=False) if files else None


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/per_group.yaml"])
def test_run_writes_one_forecast_per_series_and_step(demo_dir, tmp_path, config, capsys):
    on = [] if "per_group" in config else ["--set", "evaluate.comparators=[auto_ets, auto_theta]",
                                           "--set", "evaluate.comparator_history=100"]
    comparators = ["auto_ets", "auto_theta"] if on else []
    b = run(config, demo_dir, tmp_path, "--set", "ray.enabled=false", *on)
    name = "demo_per_group" if "per_group" in config else "demo"
    report = pl.read_parquet(tmp_path / name / "validation_report.parquet")
    skipped = sorted(report.filter(pl.col("action") == "skipped")["series"])
    assert skipped and set(skipped) <= {"S0001", "S0002", "S0003"}
    assert b.outcome.data.report.equals(report)
    assert set(b.outcome.scored.summary) == {b.outcome.trained.results[0].spec["model"][
        "name"], "naive", "seasonal_naive", *comparators}
    fc_result = b.outcome.forecast
    assert (fc_result.n_series, fc_result.n_fallback) == (40, len(skipped))
    files, fc = read(tmp_path, "forecasts")
    assert fc_result.path == os.path.dirname(files[0])
    assert len(files) == 1 and fc.columns == SCHEMA
    assert fc.group_by("unique_id", "step").len()["len"].max() == 1
    assert fc["unique_id"].n_unique() == 40 and len(fc) == 40 * 24
    assert fc["y_hat"].is_finite().all()
    fallback = fc.filter(pl.col("model") == "fallback:seasonal_naive")["unique_id"].unique()
    assert sorted(fallback) == skipped
    assert (fc["ds"] > fc["cutoff"]).all() and set(fc["group"]) == {f"store_{c}" for c in "ABCD"}
    _, metrics = read(tmp_path, "metrics")
    assert set(metrics["model"]) >= {"naive", "seasonal_naive"}
    model_rows = metrics.filter(~pl.col("model").is_in(["naive", "seasonal_naive",
                                                        *comparators]))
    assert len(model_rows) == 2 * (40 - len(skipped))
    for c in comparators:      # every scored series at both cutoffs, like the baselines
        assert len(metrics.filter(pl.col("model") == c)) == 2 * (40 - len(skipped))
    assert np.isfinite(model_rows["mase"].to_numpy()).all()
    _, bt = read(tmp_path, "backtest")
    assert {"y", "y_hat"} <= set(bt.columns) and bt["y"].is_finite().all()


@pytest.mark.slow
def test_rerun_of_the_same_cutoff_leaves_one_copy(demo_dir, tmp_path):
    run("configs/demo.yaml", demo_dir, tmp_path, "--set", "ray.enabled=false")
    first = read(tmp_path, "forecasts")[1]["run_id"].unique().to_list()
    run("configs/demo.yaml", demo_dir, tmp_path, "--set", "ray.enabled=false")
    for kind in ("forecasts", "backtest", "metrics"):
        files, frame = read(tmp_path, kind)
        assert len(files) == 1, files
        assert frame["run_id"].n_unique() == 1 and frame["run_id"][0] not in first
    leftovers = [p for p in glob.glob(os.path.join(tmp_path, "**", ".*"), recursive=True)]
    assert leftovers == []


def test_forecast_schema_is_pinned(tmp_path):
    from pipeline.outputs import partitions as output
    cols = {"unique_id": np.array(["a"]), "ds": np.array([0]), "cutoff": np.array([0]),
            "step": np.array([1], np.int16),
            "y_hat": np.array([1.0], np.float32), "q_0.1": np.array([0.5], np.float32),
            "model": np.array(["m"], object), "group": np.array([""], object)}
    table = output.to_table(cols, "rid", Freq("ns", 3600 * 10**9))
    assert [f"{f.name}:{f.type}" for f in table.schema] == [
        "unique_id:string", "ds:timestamp[ns]", "cutoff:timestamp[ns]", "step:int16",
        "y_hat:float", "q_0.1:float", "model:string", "group:string", "run_id:string",
        "created_at:timestamp[us, tz=UTC]"]
    cfg = C.load(None, [f"output.path={tmp_path}", "name=job"])
    path = output.write(cfg, "forecasts", "19700101T000000", table)
    assert path == str(tmp_path / "forecasts" / "job=job" / "data_end=19700101T000000")
    assert pq.read_table(path).num_rows == 1


def test_bad_config_and_path_fail_before_training(tmp_path, capsys, monkeypatch):
    config = os.path.abspath("configs/demo.yaml")
    monkeypatch.chdir(tmp_path)          # the default output path is ./outputs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "--config", config, "--set", "evaluate.final_model=x"]) == 2
    assert "evaluate.final_model = 'x' is not one of" in capsys.readouterr().err
    assert main(["run", "--config", config, "--set", f"data.path={tmp_path}/missing"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []    # no outputs, no empty tracking database


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_an_output_path_that_cannot_be_written_fails_first_in_one_line(tmp_path, capfd, where):
    """Checked before Ray starts or any data is read (ray.enabled stays on, the data path is
    the demo's, never read): one `error:` line naming output.path, exit 2, nothing on stdout,
    in seconds."""
    import time
    (tmp_path / "a_file").write_text("x")
    out = {"file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "out"}[where]
    t0 = time.perf_counter()
    code = main(["run", "--config", "configs/demo.yaml", "--set", f"output.path={out}",
                 "--set", f"data.path={tmp_path}/never_read"])
    seconds = time.perf_counter() - t0
    printed = capfd.readouterr()
    lines = printed.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: output.path "), lines
    assert printed.out == "" and seconds < 5
    assert os.listdir(tmp_path) == ["a_file"]


@pytest.mark.slow
def test_refit_per_cutoff_trains_before_each_cutoff(demo_dir, tmp_path):
    b = run("configs/demo.yaml", demo_dir, tmp_path, "--set", "ray.enabled=false", "--set",
            "evaluate.refit=true", "--set", "windows.n_windows=2", "--set", "evaluate.plots=0")
    (refit,) = b.outcome.scored.refits          # the later cutoff's own training
    assert not refit.tracked and refit.folder.endswith("backtest-cutoff0")
    assert not b.outcome.trained.final and b.outcome.final.final
    assert sorted(os.listdir(tmp_path / "demo" / "models")) == [
        "backtest", "backtest-cutoff0", "final"]
    _, metrics = read(tmp_path, "metrics")
    rows = metrics.filter(pl.col("model") == "gru_direct")
    assert rows["cutoff"].n_unique() == 2 and rows["mase"].is_finite().all()


@pytest.mark.slow
def test_quantile_model_writes_quantiles_coverage_and_plots(demo_dir, tmp_path):
    run("configs/demo.yaml", demo_dir, tmp_path, "--set", "ray.enabled=false", "--set",
        "model.loss=quantile", "--set", "model.quantiles=[0.1, 0.5, 0.9]", "--set",
        "evaluate.plots=2", "--set", "evaluate.final_model=reuse")
    _, fc = read(tmp_path, "forecasts")
    assert {"q_0.1", "q_0.5", "q_0.9"} <= set(fc.columns)
    model = fc.filter(pl.col("model") == "gru_direct")
    assert (model["q_0.1"] <= model["q_0.5"]).all() and (model["q_0.5"] <= model["q_0.9"]).all()
    assert (model["y_hat"] == model["q_0.5"]).all()
    _, metrics = read(tmp_path, "metrics")
    q_rows = metrics.filter(pl.col("model") == "gru_direct")
    assert q_rows["pinball"].is_finite().all()
    assert q_rows["coverage_80"].is_between(0, 1).all()
    pngs = glob.glob(os.path.join(tmp_path, "plots", "job=demo", "data_end=*", "*.png"))
    assert len(pngs) == 2 and all(os.path.getsize(p) > 5000 for p in pngs)
    assert not os.path.exists(tmp_path / "demo" / "models" / "final")  # reused


@pytest.mark.slow
def test_backtest_and_forecast_commands_run_their_parts(demo_dir, tmp_path):
    base = ["--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}", "--set",
            f"output.path={tmp_path}", "--set", "ray.enabled=false", *FAST]
    assert main(["backtest", *base]) == 0
    assert read(tmp_path, "metrics")[0] and not read(tmp_path, "forecasts")[0]
    assert main(["forecast", *base]) == 0
    files, fc = read(tmp_path, "forecasts")
    assert len(files) == 1 and fc["unique_id"].n_unique() == 40


@pytest.mark.slow
def test_make_runs_printed_metrics_equal_the_golden_file(tmp_path, capsys):
    """`make run` on the demo (its data, configs/demo.yaml) prints the metrics frozen in
    tests/golden/make_run_metrics.txt, digit for digit: here in this process with one torch
    thread, as each of make run's Ray tasks trains (Ray = local is tested bit for bit)."""
    from pipeline.data.demo import make_demo_data
    make_demo_data(str(tmp_path / "demo"))
    b = execute(["run", "--config", "configs/demo.yaml", "--set", f"data.path={tmp_path}/demo",
                 "--set", f"output.path={tmp_path}/out", "--set", "ray.enabled=false",
                 "--set", "train.threads=1", "--set", "tracking.enabled=false"])
    assert b.exit_code == 0
    lines = capsys.readouterr().out.splitlines()
    with open(os.path.join(os.path.dirname(__file__), "golden", "make_run_metrics.txt")) as f:
        golden = [line.rstrip("\n") for line in f if not line.startswith("#")]
    table = [g for g in golden if not g.startswith("best val")]
    start = lines.index(table[0])
    assert lines[start:start + len(table)] == table
    best = [line.split()[4] for line in lines if line.startswith("  global ")]
    assert [f"best val {k} {v}" for k, v in zip(("backtest", "final"), best, strict=True)] \
        == [g for g in golden if g.startswith("best val")]


def test_the_console_renders_stage_results_as_the_golden_text(capsys):
    """The console renderer itself, on fixed results (no run): training (a job that failed),
    the backtest against the baselines, the promotion and the forecast, line for line as
    tests/golden/console.txt. The other tests assert on results, not on this text."""
    from types import SimpleNamespace as NS

    from pipeline.outputs import console
    from pipeline.tracking.champions import Decision
    ok = NS(name="store_A", ok=True, n_series=10, n_windows=1234, history=[{}] * 3,
            best_val=0.51234, samples_per_s=5321.4, resumed_epoch=None, attempts=1, error=None)
    bad = NS(name="store_B", ok=False, n_series=0, n_windows=0, history=[], best_val=np.nan,
             samples_per_s=0.0, resumed_epoch=None, attempts=3, error="ValueError: no windows")
    console.training(NS(results=[ok, bad], folder="out/demo/models/backtest"))
    cfg = C.load("configs/demo.yaml", [])
    summary = {"gru_direct": {"mae": 1.5, "rmse": 2.25, "smape": 10.125, "mase": 0.75,
                              "wape": 0.0625, "skill_mase": 0.25},
               "seasonal_naive": {"mae": 2.0, "rmse": 3.0, "smape": 13.5, "mase": 1.0,
                                  "wape": 0.083, "skill_mase": 0.0}}
    console.backtest(NS(summary=summary, paths=["out/backtest/x", "out/metrics/x"]), cfg)
    console.promotion("gru_direct", [
        Decision("store_A", 0.75, 0.8, "run 1a2b3c4d", True, version="2"),
        Decision("store_B", 0.9, 0.85, "run 1a2b3c4d", False),
        Decision("store_C", None, None, "", False, note="no backtest score")])
    console.forecast(NS(n_series=40, n_fallback=3, fallback="seasonal_naive",
                        note="champions demo.store_A v2", path="out/forecasts/x", plots=[]), 24)
    with open(os.path.join(os.path.dirname(__file__), "golden", "console.txt")) as f:
        golden = f.read().splitlines()
    assert capsys.readouterr().out.splitlines() == golden


@pytest.mark.slow
def test_sales_get_no_negative_forecast_and_an_all_zero_series_gets_zeros(demo_dir, tmp_path):
    """output.clip_at_zero: auto on non-negative data (the demo plus a series that sold
    nothing): every published point, quantile and conformal bound is >= 0 and the all-zero
    series is forecast 0 with a [0, 0] interval (its interval was about ±3,100 on a retail
    panel); the backtest scores the forecasts clipped the same way (its sMAPE is 0, not 200)."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    t = pq.read_table(sorted(glob.glob(str(data / "store=store_A" / "*.parquet")))[0])
    one = pl.from_arrow(t).filter(pl.col("unique_id") == t["unique_id"][0].as_py())
    zero = one.with_columns(pl.lit("Z0001").alias("unique_id"), pl.lit(0.0).alias("y"))
    zero.write_parquet(data / "store=store_A" / "part-zero.parquet")
    b = run("configs/demo.yaml", data, tmp_path, "--set", "ray.enabled=false", "--set",
            "evaluate.intervals=conformal", "--set", "windows.n_windows=2")
    assert b.cfg.output.clip_at_zero is True           # resolved from the data
    _, fc = read(tmp_path, "forecasts")
    q = [c for c in fc.columns if c.startswith("q_")]
    assert q and fc.select(pl.min_horizontal("y_hat", *q).min()).item() >= 0
    z = fc.filter(pl.col("unique_id") == "Z0001")
    assert len(z) == 24 and (z.select(pl.max_horizontal("y_hat", *q)) == 0).to_series().all()
    _, bt = read(tmp_path, "backtest")
    assert bt["y_hat"].min() >= 0
    _, metrics = read(tmp_path, "metrics")
    mine = metrics.filter((pl.col("unique_id") == "Z0001") & (pl.col("model") == "gru_direct"))
    assert len(mine) == 2 and (mine["smape"] == 0).all()
