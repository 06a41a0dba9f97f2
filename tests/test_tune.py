"""`python -m pipeline tune`: the search space (parsing, what may be tuned, the configs of its
points), the trial (validation only, never the backtest's windows), and the search on a real
Ray instance with every trial a child run on a real MLflow server."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from timeouts import EVENT, STOP, scaled, wait_until

from pipeline import config as C
from pipeline.cli import main
from pipeline.cli import tune as tune_cmd
from pipeline.config import ConfigError, Domain
from pipeline.config.tune import parse_domain
from pipeline.data.prepare import prepare
from pipeline.models.losses import MASELoss, PointOf, make_val_loss
from pipeline.tuning.space import check_space, point_raw, trial_config, tuned_yaml, with_values
from pipeline.tuning.trial import run_trial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "demo_tune.yaml")
SMALL = ["train.epochs=2", "train.steps_per_epoch=3", "train.batch_size=32",
         "evaluate.comparators=[]", "evaluate.plots=0",
         "tune.space.windows.lookback_horizons=[2,3]"]


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def finished_trials(out: pathlib.Path) -> int:
    """The trials that Ray Tune's saved search state (its experiment_state-*.json files under
    `out`) records as finished (TERMINATED); 0 while none is, or while a file is half-written."""
    n = 0
    for path in out.glob("*/tune/*/experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text()).get("trial_data", [])
            n += sum(json.loads(t[0]).get("status") == "TERMINATED" for t in trials)
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            continue
    return n


# ------------------------------------------------------------------ the space

def test_domains_parse_choices_and_ranges_and_name_the_key_when_wrong():
    assert parse_domain("a.b", ["gru", "cnn"]) == Domain("choice", ("gru", "cnn"))
    assert parse_domain("a.b", "loguniform(1e-4, 1e-2)") == \
        Domain("loguniform", low=1e-4, high=1e-2)
    assert parse_domain("a.b", "int(1, 4)") == Domain("int", low=1, high=4)
    for bad, why in [("loguniform(0, 1)", "positive lower bound"),
                     ("int(1.5, 3)", "integer bounds"), ("uniform(2, 1)", "below the upper"),
                     ("normal(0, 1)", "list of choices"), (3, "list of choices"),
                     ([], "empty list")]:
        with pytest.raises(ConfigError, match=why) as e:
            parse_domain("train.lr", bad)
        assert "tune.space.train.lr" in str(e.value)


def test_a_grid_takes_choices_only_and_per_group_needs_per_group_training():
    with pytest.raises(ConfigError, match="grid"):
        C.from_dict({"tune": {"search": "grid", "space": {"train.lr": "uniform(0.1, 1)"}}})
    with pytest.raises(ConfigError, match="tune.per_group"):
        C.from_dict({"tune": {"per_group": True}})


@pytest.mark.parametrize("key, value, why", [
    ("windows.horizon", [12, 24], "forecasting task"),
    ("windows.n_windows", [1, 2], "backtest cutoffs"),
    ("data.path", ["a", "b"], "only windows., model. and train."),
    ("evaluate.season", [24, 168], "only windows., model. and train."),
    ("train.mode", ["global", "per_group"], "plan of jobs"),
    ("model.encoder.type", ["gru", "transformer"], "'transformer'"),
    ("train.lr", "uniform(-1, 1)", "train.lr"),
])
def test_keys_that_cannot_be_tuned_are_refused_before_any_trial(key, value, why):
    raw = {"tune": {"space": {key: value}}}
    with pytest.raises(ConfigError, match=why) as e:
        check_space(raw, C.from_dict(raw))
    assert f"tune.space.{key}" in str(e.value)


def test_ranking_by_each_trials_own_loss_is_refused_when_the_space_changes_the_loss():
    raw = {"tune": {"metric": "loss", "space": {"model.loss": ["mae", "mse"]}}}
    with pytest.raises(ConfigError, match="use mase or smape"):
        check_space(raw, C.from_dict(raw))


def test_a_point_sets_its_keys_a_lookback_in_horizons_replaces_one_in_steps():
    raw = {"windows": {"lookback": 168, "horizon": 24}, "tune": {"space": {}}}
    out = point_raw(raw, {"windows.lookback_horizons": 2, "train.lr": 0.01}, "mase")
    assert out["windows"] == {"horizon": 24, "lookback_horizons": 2}
    assert out["train"] == {"lr": 0.01, "val_metric": "mase"}
    assert raw["windows"]["lookback"] == 168           # the written mapping is untouched
    cfg = C.from_dict(out)
    assert cfg.windows.lookback == 48 and cfg.train.val_metric == "mase"
    assert with_values({}, {"model.encoder.type": "cnn"}) == {"model": {"encoder": {"type": "cnn"}}}


def test_the_tuned_yaml_is_the_config_as_written_with_the_point_and_without_tune():
    raw = C.read_raw(CONFIG, ["output.path=/tmp/x"])
    text = tuned_yaml(raw, {"model.encoder.type": "cnn", "train.lr": np.float64(0.003)},
                      "mase", "tuned for a test\nsecond line")
    assert text.startswith("# tuned for a test\n# second line\n")
    out = yaml.safe_load(text)
    assert "tune" not in out and out["output"]["path"] == "/tmp/x"
    cfg = C.from_dict(out)
    assert (cfg.model.encoder.type, cfg.train.lr, cfg.train.val_metric) == ("cnn", 0.003, "mase")
    assert cfg.data == C.load(CONFIG).data


def test_the_recipe_resolves_what_the_point_leaves_and_never_what_it_sets(demo_dir):
    raw = {"recipe": "auto", "data": {"path": demo_dir, "group_col": "store", "freq": "1h"},
           "windows": {"horizon": 24}}
    data = prepare(C.from_dict(raw))
    cfg = trial_config(raw, {"model.encoder.type": "gru", "train.lr": 0.005}, "mase",
                       data.arrays)
    assert (cfg.model.encoder.type, cfg.train.lr, cfg.train.val_metric) == ("gru", 0.005, "mase")
    assert cfg.train.sampling == "series"        # the recipe's, where the point is silent
    assert cfg.model.ensemble.members == 9       # the recipe's ensemble, of the point's GRUs


# ------------------------------------------------------------------ the validation metric

def test_the_validation_metric_of_a_quantile_model_is_its_median_forecast():
    cfg = C.from_dict({"model": {"loss": "quantile", "quantiles": [0.1, 0.5, 0.9]}}).model
    fn = make_val_loss(cfg, "mase")
    assert isinstance(fn, PointOf) and fn.index == 1
    assert make_val_loss(cfg, "loss") is None
    pred = torch.tensor([[[0.0, 1.0, 5.0], [0.0, 3.0, 9.0]]])        # [B=1, H=2, Q=3]
    y, w = torch.tensor([[2.0, 2.0]]), torch.tensor([0.5])
    assert float(fn(pred, y, None, None, None, w)) == pytest.approx(0.5 * (1 + 1) / 2)
    assert float(MASELoss()(pred[..., 1:2], y, weight=w)) == pytest.approx(0.5)


# ------------------------------------------------------------------ the trial

def poisoned(src: str, dst: str, steps: int) -> str:
    """A copy of the hourly demo dataset with each series' last `steps` targets replaced by
    huge values."""
    table = ds.dataset(src, format="parquet", partitioning="hive").to_table()
    ids, t, y = (table[c].to_numpy() for c in ("unique_id", "ds", "y"))
    y = y.copy()
    for s in np.unique(ids):
        rows = np.flatnonzero(ids == s)
        end = t[rows].max()
        hit = rows[t[rows] > end - np.timedelta64(steps, "h")]
        y[hit] = 1e6 + np.arange(len(hit))
    import pyarrow as pa
    table = table.set_column(table.schema.get_field_index("y"), "y", pa.array(y))
    os.makedirs(dst, exist_ok=True)
    pq.write_to_dataset(table, dst, partition_cols=["store"])
    return dst


def small_cfg(data_path: str, *extra: str) -> C.Config:
    return C.load(CONFIG, [f"data.path={data_path}", "ray.enabled=false", *SMALL, *extra])


def test_a_trial_never_reads_the_backtest_windows_but_does_read_up_to_them(demo_dir,
                                                                             tmp_path):
    """n_windows 2 × step 24 with horizon 24: the oldest backtest cutoff is 48 steps before
    each series' end. Poisoning those 48 steps leaves the trial's score unchanged to the last
    digit; poisoning 49 (one validation step) changes it."""
    point = {"model.encoder.type": "cnn", "windows.lookback_horizons": 2, "train.lr": 3e-3}
    scores = {}
    for name, steps in [("clean", 0), ("backtest", 48), ("one_more", 49)]:
        path = demo_dir if not steps else poisoned(demo_dir, str(tmp_path / name), steps)
        cfg = small_cfg(path)
        data = prepare(cfg)
        raw = C.read_raw(CONFIG, [f"data.path={path}", "ray.enabled=false", *SMALL])
        rows = []
        trial = trial_config(raw, point, "mase", data.arrays)
        scores[name] = run_trial(data.arrays, trial, report=rows.append).score
        assert scores[name] == pytest.approx(min(r["val_loss"] for r in rows), rel=1e-6)
    assert scores["backtest"] == scores["clean"]
    assert abs(scores["one_more"] - scores["clean"]) > 1e-3


# ------------------------------------------------------------------ the search on Ray

@pytest.mark.slow
@pytest.mark.ray
def test_tune_on_ray_logs_each_trial_as_a_child_run_and_writes_a_config_run_accepts(
        demo_dir, tmp_path, ray_session, mlflow_server, capsys):
    mlflow = pytest.importorskip("mlflow")
    out, tuned = tmp_path / "out", tmp_path / "tuned.yaml"
    common = sets(f"data.path={demo_dir}", f"output.path={out}", *SMALL,
                  f"tracking.uri={mlflow_server}", "tracking.experiment=tune_e2e")
    searched, checked = tune_cmd(["tune", "--config", CONFIG, *common, "--trials", "4",
                                  "--out", str(tuned)])
    assert (searched.exit_code, checked.exit_code) == (0, 0)
    text = capsys.readouterr().out
    assert "trial 4/4" in text and f"tuned config: {tuned}" in text
    c = mlflow.MlflowClient(mlflow_server)
    parent = c.get_run(searched.log.parent_id)
    trials = c.search_runs([parent.info.experiment_id],
                           f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 4
    assert {r.data.tags["pipeline.role"] for r in trials} == {"trial"}
    assert {r.info.status for r in trials} == {"FINISHED"}
    record = searched.outcome.tuned
    best = record.best[None]
    for r in trials:
        assert set(r.data.params) == {"model.encoder.type", "windows.lookback_horizons",
                                      "train.lr"}
        assert len(c.get_metric_history(r.info.run_id, "val_loss")) >= 1
    scores = sorted(r.data.metrics["score"] for r in trials
                    if r.data.tags.get("stopped_early") != "true")
    assert best.score == pytest.approx(scores[0])
    # the parent holds the space and the best config, and points at the backtest's run
    assert parent.data.params["tune.space.train.lr"] == "loguniform(1e-4, 1e-2)"
    assert {k: parent.data.params[f"best.{k}"] for k in best.point} == \
        {k: str(v) for k, v in best.point.items()}
    assert parent.data.metrics["best_score"] == pytest.approx(best.score)
    logged = c.download_artifacts(parent.info.run_id, "tune/tuned.yaml", str(tmp_path))
    assert pathlib.Path(logged).read_text() == tuned.read_text()
    assert c.get_run(parent.info.run_id).data.tags["tune.backtest_run_id"] == \
        checked.log.parent_id
    bt = c.get_run(checked.log.parent_id)
    assert "backtest_mase" in bt.data.metrics and bt.data.tags["pipeline.role"] == "parent"
    # the tuned config is a config `run` accepts unchanged (its own tracking and outputs)
    cfg = C.load(str(tuned))
    assert {"model.encoder.type": cfg.model.encoder.type, "train.lr": cfg.train.lr,
            "windows.lookback_horizons": cfg.windows.lookback_horizons} == best.point
    assert main(["run", "--config", str(tuned)]) == 0
    capsys.readouterr()
    assert main(["compare", "--config", str(tuned), "--no-register", "--by", "global"]) == 0
    board = capsys.readouterr().out       # the backtest's run is ranked; no trial is
    assert checked.log.parent_id[:8] in board and "trial" not in board


@pytest.mark.ray
def test_a_trial_holds_its_cpus_and_a_fraction_of_a_gpu_where_there_are_gpus(ray_session):
    from pipeline.execution.ray_tune import trial_resources
    cfg = C.from_dict({"tune": {"cpus_per_trial": 2, "gpus_per_trial": 0.25}})
    assert trial_resources(cfg) == {"cpu": 2.0, "gpu": 0.25}
    auto = C.from_dict({})                # this Ray instance has no GPU: auto asks for none
    assert ray_session.cluster_resources().get("GPU", 0) == 0
    assert trial_resources(auto) == {"cpu": 1.0, "gpu": 0.0}
    with pytest.raises(ConfigError, match="tune.gpus_per_trial"):
        C.from_dict({"tune": {"gpus_per_trial": -1}})


@pytest.mark.slow
@pytest.mark.ray
def test_the_search_scores_are_the_same_when_the_backtest_windows_are_poisoned(
        demo_dir, tmp_path, ray_session):
    """The same grid searched on Ray Tune over the clean data and over data whose backtest
    windows (the last 48 steps of every series) hold huge values: every trial scores the
    same."""
    grid = sets("tune.search=grid", "tune.scheduler=none", "tracking.enabled=false",
                "tune.space.model.encoder.type=[cnn]", "tune.space.train.lr=[0.001, 0.004]")
    scores = {}
    for name, path in [("clean", demo_dir),
                       ("poisoned", poisoned(demo_dir, str(tmp_path / "p"), 48))]:
        (searched,) = tune_cmd(["tune", "--config", CONFIG, *sets(
            f"data.path={path}", f"output.path={tmp_path / name}", *SMALL), *grid,
            "--trials", "1", "--no-backtest", "--out", str(tmp_path / f"{name}.yaml")])
        assert searched.exit_code == 0
        records = searched.outcome.tuned.records
        assert len(records) == 4 and {r.status for r in records} == {"finished"}
        scores[name] = {tuple(sorted(r.point.items())): r.score for r in records}
    assert scores["poisoned"] == scores["clean"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_search_resumes_keeping_its_finished_trials(demo_dir, tmp_path, ray_session,
                                                            capsys):
    """The search's process is killed once the search's saved state records a finished trial
    (an event, not a clock: tests/timeouts.py); the same command again resumes it: the
    finished trials are kept (logged into the new run, tagged restored), the others run, and
    the search ends with all its trials."""
    argv = ["tune", "--config", CONFIG, *sets(
        f"data.path={demo_dir}", f"output.path={tmp_path / 'out'}", *SMALL,
        "tune.max_concurrent=1", "tune.search=random", "tune.scheduler=none"),
        "--trials", "3", "--no-backtest", "--out", str(tmp_path / "tuned.yaml")]
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: finished_trials(tmp_path / "out") or proc.poll() is not None,
                   EVENT, "a finished trial in the search's saved state")
        assert proc.poll() is None, \
            f"the search ended (rc {proc.returncode}) before it could be killed: " \
            + (tmp_path / "first.log").read_text()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)     # its own process group (start_new_session)
        proc.wait(scaled(STOP))
    (searched,) = tune_cmd(argv)
    assert searched.exit_code == 0
    assert "resuming the unfinished search" in capsys.readouterr().out
    tuned = searched.outcome.tuned
    assert tuned.results[0].resumed and len(tuned.records) == 3
    assert {r.status for r in tuned.records} == {"finished"}
    mlflow = pytest.importorskip("mlflow")   # every trial a child run of the new run
    c = mlflow.MlflowClient(searched.log.uri)
    runs = c.search_runs([c.get_run(searched.log.parent_id).info.experiment_id],
                         f"tags.`mlflow.parentRunId` = '{searched.log.parent_id}'")
    assert len(runs) == 3 and sum(r.data.tags.get("restored") == "true" for r in runs) >= 1


@pytest.mark.slow
@pytest.mark.ray
def test_a_search_whose_ray_state_file_was_cut_short_keeps_its_journal_trials(
        demo_dir, tmp_path, ray_session, capsys):
    """Ray Tune rewrites its state file in place: a kill at that moment leaves it empty (seen
    in CI). The next `tune` then keeps the trials of the search's own journal and runs only the
    rest, Optuna told the kept scores; the search ends with all its trials."""
    out = tmp_path / "out"
    base = ["tune", "--config", CONFIG, *sets(
        f"data.path={demo_dir}", f"output.path={out}", *SMALL, "tune.max_concurrent=1",
        "tune.scheduler=none"), "--no-backtest", "--out", str(tmp_path / "tuned.yaml")]
    (first,) = tune_cmd([*base, "--trials", "1"])
    assert first.exit_code == 0
    (done,) = out.glob("*/tune/*/search.done")
    (state,) = done.parent.glob("experiment_state-*.json")
    done.unlink()                                   # as a kill leaves it: unfinished,
    state.write_text("")                            # the state file truncated mid-write
    kept = first.outcome.tuned.records[0]
    capsys.readouterr()
    (searched,) = tune_cmd([*base, "--trials", "3"])
    assert searched.exit_code == 0
    printed = capsys.readouterr().out
    assert "cannot be read" in printed and "keeping the 1 trial(s)" in printed, printed
    tuned = searched.outcome.tuned
    assert tuned.results[0].resumed and len(tuned.records) == 3
    assert {r.status for r in tuned.records} == {"finished"}
    (again,) = [r for r in tuned.records if r.trial_id == kept.trial_id]
    assert again.point == kept.point and again.score == kept.score
    assert again.history == kept.history and len(again.history) == 2
    assert len({r.trial_id for r in tuned.records}) == 3


def test_a_grid_resumed_from_its_journal_runs_only_the_points_not_done():
    from pipeline.execution.ray_tune import TrialRecord, _fresh_search
    cfg = C.load(CONFIG, ["tune.trials=2"])   # the grid flag is the argument
    domains = {"model.encoder.type": Domain("choice", ("gru", "cnn")),
               "windows.lookback_horizons": Domain("choice", (2, 4))}
    kept = [TrialRecord("a", {"model.encoder.type": "cnn", "windows.lookback_horizons": 4},
                        "finished", 1.0),
            TrialRecord("b", {"model.encoder.type": "gru", "windows.lookback_horizons": 2},
                        "stopped", 2.0)]
    space, searcher, samples = _fresh_search(cfg, domains, True, kept)
    assert samples == 6 and set(space) == set(domains)
    todo = searcher._points_to_evaluate
    assert len(todo) == 6 and todo.count(kept[0].point) == 1 and todo.count(kept[1].point) == 1
    assert todo.count({"model.encoder.type": "gru", "windows.lookback_horizons": 4}) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_per_group_searches_run_at_once_one_tuned_config_per_group(demo_dir, tmp_path,
                                                                    ray_session):
    """tune.per_group: one search per store, each driven by its own Ray task; each store's
    trials train on its series only (their scores differ), are child runs tagged with the
    store, and each store gets its tuned config."""
    mlflow = pytest.importorskip("mlflow")
    (searched,) = tune_cmd(["tune", "--config", CONFIG, *sets(
        f"data.path={demo_dir}", f"output.path={tmp_path / 'out'}", *SMALL,
        "train.mode=per_group", "tune.per_group=true", "tune.search=random",
        "tune.scheduler=none", "tune.space.model.encoder.type=[cnn]"),
        "--trials", "1", "--out", str(tmp_path / "tuned")])
    assert searched.exit_code == 0
    tuned = searched.outcome.tuned
    groups = ["store_A", "store_B", "store_C", "store_D"]
    assert sorted(g for g in tuned.files) == groups
    assert len({round(r.score, 9) for r in tuned.records}) == 4   # each on its own series
    for g in groups:
        cfg = C.load(str(tmp_path / "tuned" / f"tuned.{g}.yaml"))
        assert cfg.train.lr == tuned.best[g].point["train.lr"]
    c = mlflow.MlflowClient(searched.log.uri)
    runs = c.search_runs([c.get_run(searched.log.parent_id).info.experiment_id],
                         f"tags.`mlflow.parentRunId` = '{searched.log.parent_id}'")
    assert sorted(r.data.tags["group"] for r in runs) == groups
