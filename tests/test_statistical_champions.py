"""Statistical champions end to end (#15 item 4): a comparator that wins the backtest is
registered as a spec (no weights), refitted by `forecast --from-registry` to statsforecast's own
forecast, promoted by the nightly flow, and mixed per group with a network."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from statsforecast.models import AutoETS, AutoTheta

CLASSES = {"auto_ets": AutoETS, "auto_theta": AutoTheta}


def seasonal_panel(path, n_series: int = 4, days: int = 16) -> str:
    """Hourly series of a pure daily pattern around a level each: AutoETS and AutoTheta all
    but recover it, a one-step tiny GRU cannot."""
    from conftest import hourly, write_long
    rng = np.random.default_rng(3)
    n = 24 * days
    t = np.arange(n)
    ys = [20 + 15 * i + 8 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.05, n)
          for i in range(n_series)]
    return write_long(path, np.repeat([f"s{i}" for i in range(n_series)], n),
                      np.tile(hourly(n), n_series), np.concatenate(ys))


def statistical_config(tmp_path) -> str:
    import yaml
    data = seasonal_panel(str(tmp_path / "data" / "panel.parquet"))
    cfg = {"name": "stat", "data": {"path": data, "freq": "1h", "calendar": []},
           "windows": {"lookback": 48, "horizon": 24, "n_windows": 2},
           "model": {"encoder": {"type": "gru", "hidden_size": 4},
                     "decoder": {"type": "direct", "hidden_size": 8}},
           "train": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 8},
           "evaluate": {"comparators": ["auto_ets", "auto_theta"],
                        "comparator_history": 120, "plots": 0, "intervals": "conformal"},
           "ray": {"enabled": False},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
           "output": {"path": str(tmp_path / "out")}}
    path = tmp_path / "stat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow
def test_a_winning_comparator_is_registered_as_a_spec_and_refitted(tmp_path):
    import json

    import mlflow

    from pipeline.cli import execute, main
    from pipeline.tracking import read
    config = statistical_config(tmp_path)
    run = execute(["run", "--config", config])
    assert run.exit_code == 0
    summary = run.outcome.scored.summary
    best = min(CLASSES, key=lambda m: summary[m]["mase"])
    assert summary[best]["mase"] < 0.2 * summary[run.cfg.model.name]["mase"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # conformal intervals: coverage logged per model, quantile columns in the forecast
    parent = mlflow.MlflowClient(tracking_uri=uri).get_run(run.log.parent_id).data
    cal = run.outcome.scored.calibration
    assert parent.metrics["coverage_80"] == cal.coverage[run.cfg.model.name]["coverage_80"]
    assert parent.metrics["auto_ets_coverage_95"] == cal.coverage["auto_ets"]["coverage_95"]
    cols = run.outcome.forecast.rows()
    assert [k for k in cols if k.startswith("q_")] == ["q_0.025", "q_0.1", "q_0.9", "q_0.975"]
    assert (cols["q_0.025"] <= cols["q_0.1"]).all() and (cols["q_0.1"] <= cols["y_hat"]).all()
    assert main(["compare", "--config", config]) == 0
    mv = mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias("stat", "champion")
    assert (mv.tags["kind"], mv.tags["model"]) == ("statistical", best)
    where = mlflow.MlflowClient(tracking_uri=uri).get_logged_model(mv.tags["model_id"])
    folder = pathlib.Path(where.artifact_location.removeprefix("file://"))
    assert sorted(os.listdir(folder)) == ["spec.json"]         # no weights, no pickle
    spec = json.loads((folder / "spec.json").read_text())
    assert spec == {"kind": "statistical", "model": best, "season": 24, "history": 120,
                    "horizon": 24}
    assert read.load_champion("stat", uri=uri).spec == spec
    fc = execute(["forecast", "--config", config, "--from-registry", "--set",
                  "evaluate.chunk_series=3"])             # refitted chunk by chunk
    assert fc.exit_code == 0
    cols = fc.outcome.forecast.rows()
    assert set(cols["model"]) == {best}
    arrays = fc.outcome.data.arrays
    for s in range(len(arrays)):
        hist = arrays.values[arrays.indptr[s]:arrays.indptr[s + 1]].astype(np.float64)
        want = CLASSES[best](season_length=24).forecast(y=hist[-120:], h=24)["mean"]
        rows = cols["unique_id"] == arrays.ids[s]
        np.testing.assert_array_equal(cols["y_hat"][rows], want.astype(np.float32))
    # the champion's intervals: the widths its run calibrated (stored with the run, read back
    # by a batch that ran no backtest), around the refitted forecast
    assert fc.outcome.scored is None                          # it ran no backtest
    conf = cal.fitted[best]
    for k, (lo, hi) in enumerate([("q_0.1", "q_0.9"), ("q_0.025", "q_0.975")]):
        width = conf.widths(1)[0, conf.levels.index((0.8, 0.95)[k])]             # [H]
        np.testing.assert_allclose((cols[hi] - cols["y_hat"]).reshape(-1, 24),
                                   np.broadcast_to(width, (len(arrays), 24)), atol=2e-5)  # float32
        np.testing.assert_allclose((cols["y_hat"] - cols[lo]).reshape(-1, 24),
                                   np.broadcast_to(width, (len(arrays), 24)), atol=2e-5)  # float32
    assert (conf.width > 0).all()


@pytest.mark.slow
def test_nightly_promotes_a_winning_comparator_and_forecasts_with_it(tmp_path):
    import mlflow

    from flows import nightly
    from flows._common import parser, run_flow
    config = statistical_config(tmp_path)
    args = parser("nightly", nightly.nightly.__doc__).parse_args(
        ["--config", config, "--set", "evaluate.intervals=none"])
    b = run_flow(nightly.nightly, args, registry=True)
    assert b.exit_code == 0
    (d,) = b.outcome.decisions
    summary = b.outcome.scored.summary
    best = min([*CLASSES, b.cfg.model.name], key=lambda m: summary[m]["mase"])
    assert best in CLASSES and (d.promoted, d.challenger_model) == (True, best)
    assert d.challenger == pytest.approx(summary[best]["mase"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mv = mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias("stat", "champion")
    assert (mv.tags["kind"], mv.tags["model"], str(mv.version)) == ("statistical", best,
                                                                 d.version)
    assert set(b.outcome.forecast.rows()["model"]) == {best}
    # the next night scores the registered comparator as the champion, on the same windows
    again = run_flow(nightly.nightly, parser("nightly", "").parse_args(
        ["--config", config, "--set", "evaluate.intervals=none", "--force"]), registry=True)
    (d2,) = again.outcome.decisions
    assert d2.champion == pytest.approx(d2.challenger) and not d2.promoted


@pytest.mark.slow
def test_per_group_champions_mix_a_comparator_and_a_network(tmp_path):
    """Per group, a comparator may win one group while a network keeps another: a per-group
    GRU run on stores A and B, then a run with AutoETS on store A's data only; `compare`
    registers AutoETS for A (a spec) and keeps the GRU for B, and `forecast --from-registry`
    refits AutoETS on A's series and forecasts B's with the GRU, as that run did."""
    import yaml
    from conftest import hourly, write_long

    from pipeline.cli import execute, main
    rng, n = np.random.default_rng(4), 24 * 16
    t = np.arange(n)
    ys = {f"{g}{i}": 20 + 15 * i + 8 * np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.05, n)
          for g in "ab" for i in range(2)}
    paths = {}
    for name, keys in {"all": list(ys), "a": ["a0", "a1"]}.items():
        paths[name] = write_long(str(tmp_path / name / "panel.parquet"), np.repeat(keys, n),
                                 np.tile(hourly(n), len(keys)),
                                 np.concatenate([ys[k] for k in keys]),
                                 store=np.repeat([k[0].upper() for k in keys], n))
    cfg = {"name": "mixed", "data": {"path": paths["all"], "freq": "1h", "calendar": [],
                                     "group_col": "store"},
           "windows": {"lookback": 48, "horizon": 24, "n_windows": 2},
           "model": {"encoder": {"type": "gru", "hidden_size": 4},
                     "decoder": {"type": "direct", "hidden_size": 8}},
           "train": {"mode": "per_group", "epochs": 1, "steps_per_epoch": 1, "batch_size": 8},
           "evaluate": {"comparators": [], "comparator_history": 120, "plots": 0},
           "ray": {"enabled": False},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "mixed"},
           "output": {"path": str(tmp_path / "out")}}
    config = tmp_path / "mixed.yaml"
    config.write_text(yaml.safe_dump(cfg))
    first = execute(["run", "--config", str(config)])
    assert first.exit_code == 0
    mine = first.outcome.forecast.rows()
    second = execute(["run", "--config", str(config), "--set", "name=mixed_a", "--set",
                      f"data.path={paths['a']}", "--set", "evaluate.comparators=[auto_ets]",
                      "--set", f"output.path={tmp_path / 'out_a'}"])
    assert second.exit_code == 0
    summary = second.outcome.scored.summary
    assert summary["auto_ets"]["mase"] < 0.2 * summary["gru_direct"]["mase"]
    assert main(["compare", "--config", str(config)]) == 0
    fc = execute(["forecast", "--config", str(config), "--from-registry", "--set",
                  f"output.path={tmp_path / 'registry'}"])
    assert fc.exit_code == 0 and fc.outcome.scored is None
    cols, arrays = fc.outcome.forecast.rows(), fc.outcome.data.arrays
    groups = dict(zip(cols["unique_id"], cols["group"], strict=False))
    models = dict(zip(cols["unique_id"], cols["model"], strict=False))
    assert {s: (groups[s], models[s]) for s in ys} == {
        "a0": ("A", "auto_ets"), "a1": ("A", "auto_ets"),
        "b0": ("B", "gru_direct"), "b1": ("B", "gru_direct")}
    for s in range(len(arrays)):
        sid = str(arrays.ids[s])
        rows = cols["unique_id"] == sid
        if sid.startswith("a"):         # refitted on today's data, as statsforecast does
            hist = arrays.values[arrays.indptr[s]:arrays.indptr[s + 1]].astype(np.float64)
            want = AutoETS(season_length=24).forecast(y=hist[-120:], h=24)["mean"]
            np.testing.assert_array_equal(cols["y_hat"][rows], want.astype(np.float32))
        else:                           # the GRU the first run trained, its forecast again
            np.testing.assert_array_equal(cols["y_hat"][rows],
                                          mine["y_hat"][mine["unique_id"] == sid])
