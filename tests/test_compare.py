"""The tracked main job end to end: nested runs, logged models, `compare` and
`forecast --from-registry`, on the embedded SQLite default and on a real `mlflow server` with a
PostgreSQL backend store; an unreachable server stops the job before training."""
from __future__ import annotations

import glob
import os
import pathlib

import numpy as np
import polars as pl
import pytest
import torch

from pipeline import tracking
from pipeline.cli import main
from pipeline.models import load_model
from pipeline.tracking import models as tracked_models
from pipeline.tracking import read as registry

mlflow = pytest.importorskip("mlflow")
ROOT = pathlib.Path(__file__).resolve().parents[1]

FAST = ["--set", "train.epochs=2", "--set", "train.steps_per_epoch=2", "--set",
        "windows.lookback=72", "--set", "evaluate.plots=0", "--set", "model.season=24",
        "--set", "evaluate.comparators=[]"]  # the comparators' own tests run them


def args(cmd, config, data, out, *extra):
    return [cmd, "--config", config, "--set", f"data.path={data}", "--set",
            f"output.path={out}", *FAST, *extra]


def read(out, kind, job):
    files = glob.glob(os.path.join(out, kind, f"job={job}", "**", "*.parquet"), recursive=True)
    assert len(files) == 1, files
    return pl.read_parquet(files[0])


def runs(client, exp_name, role):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], f"tags.`pipeline.role` = '{role}'")


def expected_champions(out, jobs):
    """Per group, the model whose backtest MASE (mean over the group's series and cutoffs, as
    the pipeline summarises it) is lowest, computed from the per-series metrics files."""
    frames = [read(out, "metrics", j).filter(~pl.col("model").is_in(["naive",
                                                                      "seasonal_naive"]))
              for j in jobs]
    per_group = pl.concat(frames).group_by("model", "group").agg(pl.col("mase").mean())
    best = per_group.sort("mase").group_by("group", maintain_order=True).first()
    return dict(zip(best["group"], best["model"], strict=True)), per_group


@pytest.mark.slow
def test_run_on_the_embedded_sqlite_default(demo_dir, tmp_path, monkeypatch, capsys):
    """Global GRU, tracking on with no URI: sqlite:///<output>/mlflow.db. Parent and child
    runs, params, per-epoch metrics, per-group table, artifacts, input, and a logged model that
    reloads and predicts like the model the forecasts came from."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)              # MLflow's own default would put artifacts in ./mlruns
    assert main(args("run", str(ROOT / "configs" / "demo.yaml"), demo_dir, out, "--set",
                     "ray.enabled=false")) == 0
    assert os.listdir(cwd) == [] and (out / "mlartifacts").is_dir()
    text = capsys.readouterr().out
    uri = f"sqlite:///{out / 'mlflow.db'}"
    assert f"tracking     {uri} experiment 'demo' run " in text and "failure" not in text
    c = mlflow.MlflowClient(tracking_uri=uri)
    (parent,) = runs(c, "demo", "parent")
    (child,) = runs(c, "demo", "job")
    fc = read(out, "forecasts", "demo")
    assert set(fc["run_id"]) == {parent.info.run_id}          # outputs point at the run
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (child.data.tags["model"], child.data.tags["group"]) == ("gru_direct", "global")
    assert parent.data.tags["cutoff"] == parent.data.tags["batch_id"] == "20240630T230000"
    assert len(parent.data.tags["data_hash"]) == 64 and parent.data.tags["pipeline_version"]
    assert parent.data.params["windows.lookback"] == "72"
    assert parent.data.params["data.path"] == demo_dir
    for m in ("backtest_mase", "seasonal_naive_mase", "naive_smape", "backtest_skill_mase",
              "forecast_series", "seconds_data", "seconds_train", "seconds_backtest",
              "seconds_final", "seconds_forecast"):
        assert m in parent.data.metrics, m
    assert "wall time" in text and "(data " in text and "forecast " in text.split("wall time")[1]
    assert {"backtest_mase", "best_val", "final_best_val", "groups_backtest_mase_mean"} <= \
        set(child.data.metrics)
    assert [h.step for h in c.get_metric_history(child.info.run_id, "val_loss")] == [0, 1]
    assert len(c.get_metric_history(child.info.run_id, "final_train_loss")) == 2
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "validation_report.parquet", "per_series_metrics.parquet"} <= arts
    (ds,) = parent.inputs.dataset_inputs
    assert ds.dataset.digest == parent.data.tags["data_hash"][:36]
    table = pl.read_parquet(c.download_artifacts(child.info.run_id, tracking.GROUP_TABLE,
                                                 str(tmp_path)))
    assert table["group"].to_list() == [f"store_{g}" for g in "ABCD"]
    assert table["backtest_mase"].is_finite().all()
    # the logged model is filed under the run's experiment (not Default) and is the final
    # model the forecasts came from
    model_id = child.data.tags[tracking.MODEL_URI_TAG].split("/")[-1]
    assert c.get_logged_model(model_id).experiment_id == parent.info.experiment_id
    mlflow.set_tracking_uri(uri)
    try:
        logged = mlflow.pytorch.load_model(child.data.tags[tracking.MODEL_URI_TAG])
    finally:
        mlflow.set_tracking_uri(None)
    saved = load_model(str(out / "demo" / "models" / "final" / "gru_direct-global.pt"))
    batch = tracked_models.example_inputs(saved.spec, rows=5, seed=3)
    with torch.no_grad():
        assert torch.equal(logged.eval()(**batch), saved.eval()(**batch))


@pytest.mark.slow
def test_compare_and_forecast_from_registry_on_a_postgres_backed_server(
        demo_dir, tmp_path, mlflow_server, ray_session, capsys):
    """Two models into one experiment on a real server: a global GRU (one Ray task) and
    per-group CNNs (one Ray task per store, each logging into its own child run). `compare`
    must pick, per store, the model with the lower backtest MASE (checked against the metrics
    files), register it under the alias, and `forecast --from-registry` must reproduce the
    champions' forecasts exactly, without training."""
    out = tmp_path / "out"
    common = ["--set", f"tracking.uri={mlflow_server}", "--set", "tracking.experiment=nightly"]
    before = {e.name for e in mlflow.MlflowClient(mlflow_server).search_experiments()}
    assert main(args("run", "configs/demo.yaml", demo_dir, out, *common)) == 0
    assert main(args("run", "configs/per_group.yaml", demo_dir, out, *common, "--set",
                     "train.per_group.packed=false", "--set",
                     "tracking.child_runs=per_group")) == 0
    c = mlflow.MlflowClient(tracking_uri=mlflow_server)
    parents = runs(c, "nightly", "parent")
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    jobs = runs(c, "nightly", "job")
    assert sorted(r.data.tags["group"] for r in jobs) == \
        ["global", "store_A", "store_B", "store_C", "store_D"]
    for r in jobs:   # every job run is nested and got its epochs from the Ray worker
        assert r.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
        assert len(c.get_metric_history(r.info.run_id, "train_loss")) == 2
        assert tracking.MODEL_URI_TAG in r.data.tags
    # the same names in every run, whatever the model or layout: runs compare column by column
    assert set(parents[0].data.params) == set(parents[1].data.params)
    assert {"backtest_mase", "seasonal_naive_mase", "naive_mase", "backtest_skill_mase"} <= \
        set(parents[0].data.metrics) & set(parents[1].data.metrics)
    assert {"train_loss", "val_loss", "best_val", "final_best_val", "backtest_mase",
            "seasonal_naive_mase"} <= set.intersection(*(set(r.data.metrics) for r in jobs))
    after = {e.name for e in c.search_experiments()}
    assert after - before == {"nightly"}       # the workers made no experiments of their own
    capsys.readouterr()

    assert main(["compare", "--config", "configs/demo.yaml", "--set",
                 f"output.path={out}", *common]) == 0
    printed = capsys.readouterr()
    text = printed.out
    assert "Downloading artifacts" not in printed.err       # MLflow's bars stay off
    want, per_group = expected_champions(out, ["demo", "demo_per_group"])
    board = registry.leaderboard("nightly", "mase", uri=mlflow_server)
    got = {}
    for g, model in want.items():
        mv = c.get_model_version_by_alias(f"nightly.{g}", "champion")
        got[g] = mv.tags["model"]
        value = per_group.filter((pl.col("group") == g) & (pl.col("model") == model))["mase"][0]
        assert float(mv.tags["value"]) == pytest.approx(value, rel=1e-9)
        assert f"champion     nightly.{g}@champion = version 1 ({model}" in text
        assert board.filter(pl.col("group") == g)["value"].min() == pytest.approx(value)
    assert got == want
    assert main(["compare", "--config", "configs/demo.yaml", "--set",
                 f"output.path={out}", *common]) == 0
    assert capsys.readouterr().out.count("(unchanged)") == 4     # rerun: same champions

    # forecast from the registry into another folder: equal to each champion's own forecast
    reg_out = tmp_path / "registry"
    assert main(args("forecast", "configs/demo.yaml", demo_dir, reg_out, *common,
                     "--from-registry")) == 0
    text = capsys.readouterr().out
    assert "training" not in text and "champions nightly.store_A v1" in text
    mine = read(reg_out, "forecasts", "demo")
    theirs = {"gru_direct": read(out, "forecasts", "demo"),
              "cnn_direct": read(out, "forecasts", "demo_per_group")}
    for g, model in want.items():
        a = mine.filter((pl.col("group") == g) & (pl.col("model") == model)).sort(
            "unique_id", "step")
        b = theirs[model].filter((pl.col("group") == g) & (pl.col("model") == model)).sort(
            "unique_id", "step")
        assert len(a) and a["unique_id"].to_list() == b["unique_id"].to_list()
        np.testing.assert_array_equal(a["y_hat"].to_numpy(), b["y_hat"].to_numpy())
    assert mine["unique_id"].n_unique() == 40


@pytest.mark.slow
def test_per_model_runs_keep_one_run_and_promote_a_file_model(demo_dir, tmp_path,
                                                              monkeypatch, capsys):
    """Packed per-group CNNs with child_runs per_model: one job run holding every group's
    model as a file and the per-group table; promoting a group logs that model with the
    PyTorch flavor on demand, and the registry forecast equals the run's own. Group values
    that are no file or registry name ("North/East", "a b" beside "a_b") stay apart."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    stores = {"store_A": "North/East", "store_B": "a b", "store_C": "a_b", "store_D": "D"}
    data = tmp_path / "in.parquet"
    pl.read_parquet(demo_dir).with_columns(pl.col("store").replace(stores)).write_parquet(data)
    out = tmp_path / "out"
    assert main(args("run", "configs/per_group.yaml", data, out, "--set",
                     "ray.enabled=false")) == 0
    uri = f"sqlite:///{out / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking_uri=uri)
    (job,) = runs(c, "demo_per_group", "job")
    assert job.data.tags["group"] == "all"
    files = {a.path for a in c.list_artifacts(job.info.run_id, "models")}
    keys = {"North_East-d839ae0a", "a_b-7dbde935", "a_b", "D"}
    assert files == {f"models/cnn_direct-{k}.pt" for k in keys}
    assert main(["compare", "--config", "configs/per_group.yaml", "--set",
                 f"output.path={out}"]) == 0
    for k in keys:
        mv = c.get_model_version_by_alias(f"demo_per_group.{k}", "champion")
        assert mv.tags["run_id"] == job.info.run_id
    assert c.get_model_version_by_alias("demo_per_group.a_b-7dbde935",
                                        "champion").tags["group"] == "a b"
    capsys.readouterr()
    assert main(args("forecast", "configs/per_group.yaml", data, tmp_path / "reg",
                     "--from-registry", "--set", f"tracking.uri={uri}")) == 0
    a = read(tmp_path / "reg", "forecasts", "demo_per_group").sort("unique_id", "step")
    b = read(out, "forecasts", "demo_per_group").sort("unique_id", "step")
    assert a["model"].to_list() == b["model"].to_list()
    np.testing.assert_array_equal(a["y_hat"].to_numpy(), b["y_hat"].to_numpy())


def test_unreachable_server_stops_the_job_before_training(demo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(args("run", "configs/demo.yaml", demo_dir, out, "--set", "ray.enabled=false",
                     "--set", "tracking.uri=http://user:secret@127.0.0.1:9"))
    err = capsys.readouterr().err
    assert code == 1                            # a service is down: worth retrying, unlike 2
    assert err.startswith("error: MLflow tracking server at http://127.0.0.1:9 is unreachable")
    assert "secret" not in err and "tracking.required: false" in err
    assert not out.exists()                                   # nothing read, trained, written


@pytest.mark.slow
def test_not_required_tracking_and_logging_failures_keep_the_outputs(
        demo_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="unreachable"):
        assert main(args("run", "configs/demo.yaml", demo_dir, out, "--set",
                         "ray.enabled=false", "--set", "tracking.uri=http://127.0.0.1:9",
                         "--set", "tracking.required=false")) == 0
    assert len(read(out, "forecasts", "demo")) == 40 * 24
    assert "tracking " not in capsys.readouterr().out

    def broken(*a, **k):
        raise mlflow.exceptions.MlflowException("artifact store is full")
    monkeypatch.setattr(tracking.runs, "log_model", broken)     # what Tracker.log_model calls
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out2 = tmp_path / "out2"
    with pytest.warns(UserWarning, match="artifact store is full"):
        assert main(args("run", "configs/demo.yaml", demo_dir, out2, "--set",
                         "ray.enabled=false")) == 4       # done, but the record is not whole
    printed = capsys.readouterr()
    assert "(1 logging failure(s), outputs kept)" in printed.out
    assert "warning: MLflow logging failed 1 time(s)" in printed.err
    assert len(read(out2, "forecasts", "demo")) == 40 * 24


@pytest.mark.slow
def test_an_ensemble_is_logged_registered_and_forecast_from_the_registry_as_one_model(
        demo_dir, tmp_path, monkeypatch, capsys):
    """Three CNN members (two lookbacks, two losses) through run → compare → forecast
    --from-registry on the embedded SQLite store: each member's validation score in the job's
    run, one registered model, and the registry's forecast equal to the run's own."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    ens = ["--set", "model.encoder.type=cnn", "--set", "model.encoder.num_layers=6",
           "--set", "model.ensemble.members=3", "--set", "model.ensemble.lookbacks=[3, 2]",
           "--set", "model.ensemble.losses=[mae, mase]", "--set", "ray.enabled=false",
           "--set", "windows.lookback=null"]
    assert main(args("run", "configs/demo.yaml", demo_dir, out, *ens)) == 0
    uri = f"sqlite:///{out / 'mlflow.db'}"
    c = mlflow.MlflowClient(tracking_uri=uri)
    (child,) = runs(c, "demo", "job")
    metrics = child.data.metrics
    for i in range(3):
        assert np.isfinite(metrics[f"member_{i}_best_val"]), i
        assert f"final_member_{i}_best_val" in metrics
    assert main(["compare", "--config", "configs/demo.yaml", "--set", f"output.path={out}",
                 *ens]) == 0
    for g in "ABCD":                                   # configs/demo.yaml compares by group
        mv = c.get_model_version_by_alias(f"demo.store_{g}", "champion")
        assert (mv.tags["model"], mv.tags["run_id"]) == ("cnn_direct", child.info.run_id)
    capsys.readouterr()
    assert main(args("forecast", "configs/demo.yaml", demo_dir, tmp_path / "reg", *ens,
                     "--from-registry", "--set", f"tracking.uri={uri}")) == 0
    printed = capsys.readouterr()
    assert "training" not in printed.out and "Downloading artifacts" not in printed.err
    a = read(tmp_path / "reg", "forecasts", "demo").sort("unique_id", "step")
    b = read(out, "forecasts", "demo").sort("unique_id", "step")
    assert a["model"].to_list() == b["model"].to_list()
    np.testing.assert_array_equal(a["y_hat"].to_numpy(), b["y_hat"].to_numpy())


@pytest.mark.parametrize("margin,promoted", [(0.02, ["store_B"]),
                                             (0.0, ["store_A", "store_B"])])
def test_a_challenger_replaces_a_champion_only_beyond_the_margin(monkeypatch, margin, promoted):
    """promote.min_improvement: store_A's challenger is 1 % better than its champion (noise
    between equally good runs: kept at the default 2 %), store_B's 5 % (promoted), store_C's
    1 % worse (kept). Both scores and the note are in the decision."""
    from types import SimpleNamespace as NS

    from pipeline import config as C
    from pipeline.data.calendar import Freq
    from pipeline.tracking import champions
    cfg = C.load("configs/demo.yaml", ["evaluate.comparators=[]",
                                       f"promote.min_improvement={margin}"])
    challenger = {"store_A": 0.99, "store_B": 0.95, "store_C": 1.01}

    def cols(model: str, values: dict) -> dict:
        groups = np.repeat(list(values), 4)
        return {"unique_id": np.array([f"{g}_{i}" for g in values for i in range(4)]),
                "group": groups, "model": np.full(len(groups), model),
                "cutoff": np.zeros(len(groups), np.int64),
                "mase": np.repeat(np.array(list(values.values())), 4)}
    found = [champions.Champion(NS(name=g, group=g), NS(), NS(tags={"model": "gru_direct"},
                                                              version="1"), cfg)
             for g in challenger]
    champs = champions.Champions("group", "sqlite://", found, [])
    theirs = {g: cols("gru_direct", {g: 1.0}) for g in challenger}
    registered = []
    monkeypatch.setattr(champions, "_register",
                        lambda cfg, log, uri, g, *a, **k: registered.append(g) or "2")
    log = NS(metrics=lambda values: None)
    decisions = champions.promote(cfg, log, champs, cols("gru_direct", challenger), theirs,
                                  Freq("ns", 3600 * 10**9))
    assert [d.group for d in decisions if d.promoted] == promoted == registered
    a = decisions[0]
    assert (a.challenger, a.champion) == pytest.approx((0.99, 1.0))
    assert ("min_improvement" in a.note) == (margin > 0)
    assert not decisions[2].promoted and "min_improvement" not in decisions[2].note
