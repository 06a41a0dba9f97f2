"""MLflow tracking layer: run hierarchy, params, metrics, models and the registry, against the
embedded SQLite default and a real `mlflow server` process on loopback."""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

from pipeline.config import (
    Config,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    OutputConfig,
    TrackingConfig,
)
from pipeline.errors import InfraError
from pipeline.models import build_model
from pipeline.provenance import data_hash
from pipeline.tracking.runlog import RunLog
from pipeline.training.results import JobResult

mlflow = pytest.importorskip("mlflow")
tracking = pytest.importorskip("pipeline.tracking")
registry = pytest.importorskip("pipeline.tracking.read")
models = pytest.importorskip("pipeline.tracking.models")
runs = pytest.importorskip("pipeline.tracking.runs")

LOOKBACK, HORIZON = 12, 4


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder=EncoderConfig(type="gru", hidden_size=8, num_layers=1),
                      decoder=DecoderConfig(hidden_size=8))
    return build_model(cfg, lookback=LOOKBACK, horizon=HORIZON, past_size=1, future_size=0)


def batch(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, LOOKBACK, 2, generator=torch.Generator().manual_seed(seed))


def make_cfg(tmp_path, uri=None, child_runs="per_model", name="tracktest") -> Config:
    return Config(name=name, output=OutputConfig(path=str(tmp_path / "out")),
                  model=ModelConfig(quantiles=[0.1, 0.5, 0.9], loss="quantile"),
                  tracking=TrackingConfig(uri=uri, child_runs=child_runs))


def tracker(cfg) -> tracking.Tracker:
    uri = tracking.tracking_uri(cfg)
    return tracking.Tracker(uri, tracking.artifact_root(uri))


def start(tr, cfg, batch_id) -> str:
    """A parent run as the pipeline starts one (RunLog.start: tags, params, config)."""
    log = RunLog(tr, cfg)
    return log.start(batch_id, "2024-01-01")


def job_result(name="gru_direct", group=None) -> JobResult:
    hist = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.5 / (e + 1),
             "samples_per_s": 100.0} for e in range(3)]
    return JobResult(name, group, True, history=hist, best_val=0.5, best_epoch=2,
                     samples_per_s=123.0)


@pytest.fixture(scope="module")
def shared_sqlite(tmp_path_factory):
    """The embedded default (tracking_uri with neither uri nor env), one database file for the
    module: creating and migrating a fresh MLflow SQLite database costs ~2.5 s."""
    root = tmp_path_factory.mktemp("embedded")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = tracking.tracking_uri(make_cfg(root))
    assert uri == f"sqlite:///{root / 'out' / 'mlflow.db'}"
    (root / "out").mkdir()          # Tracker makes it on first use; plain clients need it
    return uri


@pytest.fixture
def sqlite_uri(shared_sqlite, monkeypatch):
    """The shared embedded store; the URI is passed explicitly, never set globally."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return shared_sqlite


def check_run_hierarchy_and_model(uri, tmp_path, name="tracktest"):
    """The shared checks: nesting, params, epoch metrics, backtest names, model reload."""
    cfg = make_cfg(tmp_path, uri, name=name)
    data = tmp_path / "data.parquet"
    data.write_bytes(b"rows")
    cfg.data.path = str(data)
    tr = tracker(cfg)
    parent = RunLog(tr, cfg).start("b1", "2024-01-01", tags={"who": "test"})
    kids = {m: tr.child(m, "g1") for m in ("gru_direct", "cnn_direct")}
    assert tr.child("gru_direct", "g1") == kids["gru_direct"]      # reused, not duplicated
    for m, run_id in kids.items():
        tr.log_job(run_id, job_result(m, "g1"))
        tr.log_backtest(run_id, {m: {"mase": 0.9, "smape": 10.0, "mae": float("nan")},
                                 "seasonal_naive": {"mase": 1.0}}, m)
    tr.log_backtest(parent, {"gru_direct": {"mase": 0.9}, "seasonal_naive": {"mase": 1.0}},
                    "gru_direct")
    model = tiny_model()
    uri_model = tr.log_model(kids["gru_direct"], model)
    tr.finish()
    assert tr.failures == []

    c = mlflow.MlflowClient(tracking_uri=uri)
    p = c.get_run(parent)
    assert p.data.tags["batch_id"] == "b1" and p.data.tags["cutoff"] == "2024-01-01"
    assert p.data.tags["data_hash"] == data_hash([data]) and p.data.tags["pipeline_version"]
    assert p.data.tags["who"] == "test" and p.data.tags["pipeline.role"] == "parent"
    assert p.data.params["train.epochs"] == str(cfg.train.epochs)
    assert p.data.params["model.quantiles"] == "[0.1,0.5,0.9]"
    assert set(p.data.params) == set(cfg.flat())
    assert p.data.metrics["seasonal_naive_mase"] == 1.0 and p.data.metrics["backtest_mase"] == 0.9
    assert p.info.status == "FINISHED"
    exp = c.get_experiment_by_name(name)
    assert p.info.experiment_id == exp.experiment_id
    for m, run_id in kids.items():
        r = c.get_run(run_id)
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert (r.data.tags["model"], r.data.tags["group"]) == (m, "g1")
        assert r.info.experiment_id == exp.experiment_id and r.info.status == "FINISHED"
        hist = c.get_metric_history(run_id, "val_loss")
        assert sorted((h.step, h.value) for h in hist) == [(0, 1.5), (1, 0.75), (2, 0.5)]
        assert len(c.get_metric_history(run_id, "train_loss")) == 3
        # the same names whatever the model, so runs compare column by column
        assert {"best_val", "samples_per_s", "backtest_mase", "backtest_smape",
                "seasonal_naive_mase"} <= set(r.data.metrics)
        assert "backtest_mae" not in r.data.metrics        # NaN is not logged
        assert (r.data.tags["batch_id"], r.data.tags["cutoff"]) == ("b1", "2024-01-01")
    # the model reloads and predicts identically on a batch size other than the example's
    assert c.get_run(kids["gru_direct"]).data.tags[tracking.MODEL_URI_TAG] == uri_model
    mlflow.set_tracking_uri(uri)                   # as a person would, to load the flavor
    try:
        loaded = mlflow.pytorch.load_model(uri_model)
    finally:
        mlflow.set_tracking_uri(None)
    x = batch(7, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
    return tr, kids, model


# ------------------------------------------------------------------------------ SQLite

def test_sqlite_hierarchy_params_metrics_model(sqlite_uri, tmp_path):
    check_run_hierarchy_and_model(sqlite_uri, tmp_path)


def test_multi_input_model_reloads_and_predicts_identically(sqlite_uri):
    """xf, static and idx: logged as the real module; the example is a dict of tensors."""
    torch.manual_seed(0)
    cfg = ModelConfig(encoder=EncoderConfig(type="gru", hidden_size=8, num_layers=1),
                      decoder=DecoderConfig(hidden_size=8), embedding="series")
    model = build_model(cfg, lookback=LOOKBACK, horizon=HORIZON, past_size=1, future_size=2,
                        static_size=3, num_embeddings=5)

    def inputs(n):
        g = torch.Generator().manual_seed(n)
        return {"x": torch.randn(n, LOOKBACK, 2, generator=g),
                "xf": torch.randn(n, HORIZON, 2, generator=g),
                "static": torch.randn(n, 3, generator=g),
                "idx": torch.randint(0, 5, (n,), generator=g)}
    c = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    run = c.create_run(c.create_experiment("multi_input",
                                           artifact_location=tracking.artifact_root(sqlite_uri)))
    model_uri = models.log_model(tracking.client(sqlite_uri), run.info.run_id, model)
    mlflow.set_tracking_uri(sqlite_uri)
    try:
        loaded = mlflow.pytorch.load_model(model_uri)
        sig = mlflow.models.get_model_info(model_uri).signature
    finally:
        mlflow.set_tracking_uri(None)
    assert set(sig.inputs.input_names()) == {"x", "xf", "static", "idx"}
    b = inputs(9)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**b), model.eval()(**b))


def test_per_group_child_runs_get_group_metrics(sqlite_uri, tmp_path):
    import polars as pl
    cfg = make_cfg(tmp_path, sqlite_uri, child_runs="per_group", name="pergroup")
    tr = tracker(cfg)
    start(tr, cfg, "b5")
    tr.log_group_table(None, "gru_direct", pl.DataFrame({"group": ["g1", "g2"],
                                                         "backtest_mase": [0.5, 1.5]}),
                       runs=True)
    tr.finish()
    board = registry.leaderboard("pergroup", uri=sqlite_uri)
    assert board.select("group", "value").rows() == [("g1", 0.5), ("g2", 1.5)]
    assert len(registry.champion_per_group(board)) == 0      # no model logged: no champion
    assert set(tr.children) == {("gru_direct", "g1"), ("gru_direct", "g2")}


def test_inputs_artifacts_and_per_group_parquet(sqlite_uri, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.parquet").write_bytes(b"x" * 3_000_000)
    (data / "b.parquet").write_bytes(b"y" * 10)
    h = data_hash([data])
    assert h == data_hash([data]) and len(h) == 64
    (data / "b.parquet").write_bytes(b"z" * 10)
    assert data_hash([data]) != h
    h = data_hash([data])
    cfg = make_cfg(tmp_path, sqlite_uri, name="inputs")
    cfg.data.path = str(data)
    tr = tracker(cfg)
    parent = start(tr, cfg, "b2")               # logs the input (a local folder) and its hash
    (tmp_path / "config.yaml").write_text("name: tracktest\n")
    tr.log_artifacts(parent, [tmp_path / "config.yaml"])
    job = tr.child("gru_direct", "all")
    import polars as pl
    tr.log_group_table(job, "gru_direct", pl.DataFrame({"group": ["g1", "g2"],
                                                        "backtest_mase": [0.5, 1.5]}),
                       runs=False)
    tr.finish()
    assert tr.failures == []
    c = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    run = c.get_run(parent)
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == h[:36] and str(data) in ds.dataset.source
    assert {a.path for a in c.list_artifacts(parent)} >= {"config.yaml"}
    job_run = c.get_run(job)
    assert job_run.data.metrics["groups_backtest_mase_mean"] == 1.0
    assert {a.path for a in c.list_artifacts(job, "metrics")} == {tracking.GROUP_TABLE}
    # the leaderboard reads the table: one row per group, none for the "all" run itself
    board = registry.leaderboard("inputs", uri=sqlite_uri)
    assert board.select("group", "value", "run_id").rows() == [("g1", 0.5, job),
                                                               ("g2", 1.5, job)]


def test_leaderboard_champion_registry(sqlite_uri, tmp_path):
    cfg = make_cfg(tmp_path, sqlite_uri, name="compare")
    tr = tracker(cfg)
    start(tr, cfg, "b3")
    # (model, group, backtest MASE, model logged?): the best g2 score has no model (its final
    # training failed), so it cannot be the champion
    cases = [("gru_direct", "g1", 0.8, False), ("cnn_direct", "g1", 0.6, True),
             ("gru_direct", "g2", 0.7, True), ("cnn_direct", "g2", 0.5, False)]
    trained = {}
    for i, (m, g, mase, logged) in enumerate(cases):
        run_id = tr.child(m, g)
        tr.log_backtest(run_id, {m: {"mase": mase}, "seasonal_naive": {"mase": 1.0}}, m)
        if logged:
            trained[run_id] = tiny_model(seed=i)
            tr.log_model(run_id, trained[run_id])
    tr.finish()
    board = registry.leaderboard("compare", "mase", uri=sqlite_uri)
    assert board["value"].to_list() == [0.5, 0.6, 0.7, 0.8]
    assert board["has_model"].to_list() == [False, True, True, False]
    champ = registry.champion_per_group(board)
    assert champ["group"].to_list() == ["g1", "g2"]
    assert champ["model"].to_list() == ["cnn_direct", "gru_direct"]
    assert champ["value"].to_list() == [0.6, 0.7]
    assert champ["run_id"][0] == tr.children[("cnn_direct", "g1")]
    run_id = champ["run_id"][0]
    version = models.register(tracking.client(sqlite_uri), run_id, "tracktest_g1", "champion")
    assert version == "1"
    loaded = registry.load_champion("tracktest_g1", uri=sqlite_uri)
    x = batch(9, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), trained[run_id].eval()(x))
    # champions registered before group values got safe_key names are still found, but only
    # for the group their version is tagged with ("a b" and "a_b" once shared a name)
    c = tracking.client(sqlite_uri)
    models.register(c, run_id, "legacy.North_East", "champion", group="North/East")
    models.register(c, run_id, "legacy.a_b", "champion", group="a_b")
    name, mv = registry.find_champion("legacy", "North/East", uri=sqlite_uri)
    assert (name, mv.tags["group"]) == ("legacy.North_East", "North/East")
    assert registry.find_champion("legacy", "a b", uri=sqlite_uri) == ("legacy.a_b-7dbde935",
                                                                       None)
    assert registry.find_champion("legacy", "a_b", uri=sqlite_uri)[0] == "legacy.a_b"


def test_a_retried_job_does_not_log_its_epochs_twice(sqlite_uri):
    """The first attempt logged epochs 0-2 and died; the retry (a fresh, unpickled logger)
    trains from scratch: epochs 0-2 are not logged again, 3-4 are."""
    import pickle
    client = mlflow.MlflowClient(tracking_uri=sqlite_uri)
    run_id = client.create_run(client.create_experiment("retried")).info.run_id
    first = tracking.EpochLogger(sqlite_uri, run_id)
    retry = pickle.loads(pickle.dumps(first))
    for epoch in range(3):
        first({"epoch": epoch, "train_loss": 1.0 - epoch / 10, "val_loss": 1.0})
    for epoch in range(5):
        retry({"epoch": epoch, "train_loss": 1.0 - epoch / 10, "val_loss": 1.0})
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [0, 1, 2, 3, 4] and not first.errors and not retry.errors
    final = tracking.EpochLogger(sqlite_uri, run_id, prefix="final_")   # another history
    final({"epoch": 0, "train_loss": 0.5, "val_loss": 0.5})
    assert [m.step for m in client.get_metric_history(run_id, "final_train_loss")] == [0]


def test_logging_failures_are_recorded_not_raised(sqlite_uri, tmp_path):
    cfg = make_cfg(tmp_path, sqlite_uri, name="failures")
    tr = tracker(cfg)
    start(tr, cfg, "b4")
    with pytest.warns(UserWarning, match="MLflow logging failed"):
        tr.log_metrics("no-such-run", {"x": 1.0})
        tr.log_artifacts("no-such-run", [tmp_path / "missing.txt"])
    assert len(tr.failures) == 2
    tr.finish()


def test_a_server_that_stops_answering_is_not_waited_for_again(monkeypatch):
    """After the first connection failure the tracker skips (and counts) the rest, so a dead
    server costs one timeout, not one per remaining call."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tr = tracking.Tracker("http://127.0.0.1:9")
    with pytest.warns(UserWarning, match="skipping further logging"):
        tr.log_metrics("some-run", {"x": 1.0})
    t0 = time.perf_counter()
    for _ in range(20):
        tr.log_metrics("some-run", {"x": 1.0})
    assert time.perf_counter() - t0 < 0.5
    assert len(tr.failures) == 21 and tr.failures[-1].endswith("stopped answering")


def test_uri_resolution_and_redaction(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:secret@host:5000")
    assert tracking.tracking_uri(make_cfg(tmp_path)) == "http://u:secret@host:5000"
    assert tracking.tracking_uri(make_cfg(tmp_path, "sqlite:///x.db")) == "sqlite:///x.db"
    assert tracking.redact("https://u:secret@host:5000/p") == "https://host:5000/p"
    assert runs.param_value("http://u:pw@h/x") == "http://h/x"
    assert len(runs.param_value("a" * 7000)) == 6000


def test_the_pipeline_sets_no_global_mlflow_state(sqlite_uri, tmp_path, monkeypatch):
    """Runs, models and registrations all go through clients bound to the run's URI: neither
    MLflow's global tracking URI nor its environment variables are touched."""
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    before = mlflow.get_tracking_uri()
    cfg = make_cfg(tmp_path, sqlite_uri, name="noglobals")
    tr = tracker(cfg)
    start(tr, cfg, "b6")
    tr.log_model(tr.child("gru_direct", "global"), tiny_model())
    models.register(tracking.client(sqlite_uri), tr.children[("gru_direct", "global")],
                    "noglobals", "champion")
    registry.load_champion("noglobals", uri=sqlite_uri)
    tr.finish()
    assert tr.failures == [] and mlflow.get_tracking_uri() == before
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


# ------------------------------------------------------------------------------ unreachable

def test_unreachable_server_fails_fast_with_a_clear_error():
    t0 = time.perf_counter()
    with pytest.raises(InfraError, match=r"MLflow tracking server at http://127\.0\.0\.1:9 "
                                            r"is unreachable"):
        tracking.check_server("http://user:pw@127.0.0.1:9", timeout=2)
    assert time.perf_counter() - t0 < 15
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert tracking.check_server("http://127.0.0.1:9", timeout=2, required=False) is False
    assert any("unreachable" in str(x.message) for x in w)
    assert all("pw" not in str(x.message) for x in w)
    assert tracking.check_server("sqlite:///whatever.db") is True


# ------------------------------------------------------------------------------ real server

def test_real_server_hierarchy_params_metrics_model(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.check_server(mlflow_server) is True
    tr, kids, model = check_run_hierarchy_and_model(mlflow_server, tmp_path)
    assert models.register(tracking.client(mlflow_server), kids["gru_direct"], "srv_model",
                           "champion") == "1"
    loaded = registry.load_champion("srv_model", uri=mlflow_server)
    x = batch(6, seed=8)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model.eval()(x))
