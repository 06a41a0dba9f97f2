"""What a run publishes (`evaluate.select`, `pipeline.forecasting.select`): per group the
candidate with the lowest backtest MASE, the default on ties; a run's forecast publishes each
group's choice; the network's rows, where a group publishes the network alone under
`evaluate.combine`, come from the pass that made the combination."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

from pipeline import config as C


def test_select_publishes_each_groups_lowest_backtest_mase_the_default_on_ties():
    from pipeline.forecasting.backtest import Backtest
    from pipeline.forecasting.select import select
    cfg = C.load(None, ["evaluate.comparators=[auto_ets, auto_theta]", "model.name=net"])
    bt = Backtest()
    scores = {"A": {"net": 0.9, "auto_ets": 0.7, "auto_theta": 0.8},
              "B": {"net": 0.6, "auto_ets": 0.6, "auto_theta": 0.9},      # a tie: the network
              "C": {"net": float("nan"), "auto_ets": float("nan"), "auto_theta": 1.2}}
    for g, by_model in scores.items():
        for m, v in by_model.items():
            bt.metrics.append({"unique_id": np.array([f"{g}1"]), "cutoff": np.array([0]),
                               "model": np.array([m], object), "group": np.array([g], object),
                               "mase": np.array([v])})
    got = select(bt, cfg)
    assert {g: c.model for g, c in got.items()} == {"A": "auto_ets", "B": "net",
                                                    "C": "auto_theta"}
    assert got["A"].scores == pytest.approx(scores["A"])
    assert select(bt, C.load(None, ["evaluate.comparators=[auto_ets]", "model.name=net",
                                    "evaluate.select=network"])) == {}


def test_under_a_hierarchy_each_group_and_level_has_its_own_choice():
    """The backtest's rows keyed by group and level (`selection_key`): a total may publish a
    comparator where its bottom series publish the network."""
    from pipeline.data.series import LEVEL, SeriesArrays
    from pipeline.forecasting.backtest import Backtest
    from pipeline.forecasting.select import published, select, series_keys
    cfg = C.load(None, ["evaluate.comparators=[auto_ets]", "model.name=net"])
    arrays = SeriesArrays.from_list([[1.0, 2.0]] * 3, ids=["x", "y", "total"])
    arrays.static = {LEVEL: np.array(["unique_id", "unique_id", "total"], dtype=object)}
    assert series_keys(arrays).tolist() == ["unique_id", "unique_id", "total"]
    bt = Backtest()
    for i, (net, ets) in {"x": (0.5, 0.9), "y": (0.7, 0.8), "total": (0.9, 0.4)}.items():
        for m, v in (("net", net), ("auto_ets", ets)):
            bt.metrics.append({"unique_id": np.array([i]), "cutoff": np.array([0]),
                               "model": np.array([m], object), "group": np.array([""], object),
                               "mase": np.array([v])})
    got = select(bt, cfg, arrays)
    assert {k: c.model for k, c in got.items()} == {"unique_id": "net", "total": "auto_ets"}
    assert got["unique_id"].scores == pytest.approx({"net": 0.6, "auto_ets": 0.85})
    assert {k: c.model for k, c in select(bt, cfg).items()} == {"": "net"}   # no levels
    arrays.groups = np.array(["a", "b", "total"], dtype=object)
    assert series_keys(arrays).tolist() == ["unique_id:a", "unique_id:b", "total:total"]
    assert published(got, "total", cfg) == "auto_ets" and published(got, "other", cfg) == "net"


@pytest.mark.slow
@pytest.mark.parametrize("select", ["auto", "network"])
def test_the_run_publishes_what_its_backtest_preferred(demo_dir, tmp_path, select):
    """A barely trained network (one epoch of two steps) against AutoTheta: `evaluate.select:
    auto` publishes, per store, the lower backtest MASE of the two (read back from the metrics
    output); `network` publishes the network everywhere. The run's outcome says the choice."""
    import polars as pl

    from pipeline.cli import execute
    b = execute(["run", "--config", "configs/demo.yaml", "--set", f"data.path={demo_dir}",
                 "--set", f"output.path={tmp_path}", "--set", "ray.enabled=false", "--set",
                 "tracking.enabled=false", "--set", "train.epochs=1", "--set",
                 "train.steps_per_epoch=2", "--set", "windows.lookback=72", "--set",
                 "model.encoder.hidden_size=8", "--set", "evaluate.plots=0", "--set",
                 f"evaluate.select={select}"])
    assert b.exit_code == 0
    read = lambda kind: pl.read_parquet(  # noqa: E731
        [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / kind) for f in fs
         if f.endswith(".parquet")])
    metrics, fc = read("metrics"), read("forecasts").filter(
        ~pl.col("model").str.starts_with("fallback"))
    best = (metrics.filter(pl.col("model").is_in(["gru_direct", "auto_theta"]))
            .group_by("group", "model").agg(pl.col("mase").mean())
            .sort("mase").group_by("group", maintain_order=True).first())
    want = dict(best.select("group", "model").iter_rows()) if select == "auto" else \
        {g: "gru_direct" for g in best["group"]}
    assert dict(fc.select("group", "model").unique().iter_rows()) == want
    chosen = {g: c.model for g, c in b.outcome.scored.selection.items()}
    assert chosen == (want if select == "auto" else {})
    page = pathlib.Path(b.outcome.report).read_text(encoding="utf-8")   # the page says what
    assert ("published by backtest MASE: " in page) == (select == "auto")   # was published


def test_the_published_network_rows_are_the_networks_forecast_from_the_combining_pass(
        monkeypatch):
    """evaluate.combine with evaluate.select: auto: the series whose group published the
    network alone get the network's forecast from the one pass that made the combination (one
    forward pass per job and chunk, not a second over the same windows), bit for bit what the
    network forecasts without evaluate.combine; the combination's group keeps the combination
    and a comparator's group gets the comparator refitted. Whole, and chunk by chunk."""
    import contextlib
    import dataclasses
    from types import SimpleNamespace as NS

    from conftest import sines

    import pipeline.forecasting.final as final
    from pipeline.forecasting.backtest import chunk_jobs
    from pipeline.forecasting.select import Choice
    from pipeline.stages.forecast import forecast
    from pipeline.training.jobs import run_jobs_locally
    from pipeline.training.plan import plan_jobs
    arrays = sines(6, length=200, groups=["A", "B", "C"])
    cfg = C.load(None, ["windows.lookback=48", "windows.horizon=12", "windows.n_windows=2",
                        "data.calendar=[]", "evaluate.season=24",
                        "evaluate.comparator_history=96", "evaluate.comparators=[auto_theta]",
                        "evaluate.combine=[auto_theta]", "train.epochs=1",
                        "train.steps_per_epoch=2", "model.encoder.hidden_size=4",
                        "model.decoder.hidden_size=4"])
    plain = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, combine=[]))
    jobs = plan_jobs(arrays, cfg)
    models = {r.name: r.model() for r in run_jobs_locally(arrays, jobs, cfg)}
    net = cfg.model.name
    selection = {"A": Choice(net), "B": Choice("combination"), "C": Choice("auto_theta")}
    b = NS(cfg=cfg, runner=None, stage=lambda name: contextlib.nullcontext())
    fc = forecast(b, NS(arrays=arrays), jobs, NS(models=lambda: models), selection=selection)
    passes = []
    predict_job = final.predict_job
    monkeypatch.setattr(final, "predict_job",
                        lambda *a, **k: passes.append(1) or predict_job(*a, **k))
    for chunks in ([(0, 6)], [(0, 2), (2, 4), (4, 6)]):
        for lo, hi in chunks:
            within = np.isin(np.arange(len(arrays)), np.arange(lo, hi))
            part = chunk_jobs(jobs, lo, hi)
            del passes[:]
            cols, bad = fc.make(lo, hi)
            assert bad == [] and len(passes) == len(jobs)           # one forward pass
            alone, comb = (final.final_forecast(arrays, part, models, c, within=within)
                           for c in (plain, cfg))
            for s in range(lo, hi):
                sid, group = arrays.ids[s], arrays.groups[s]
                rows = cols["unique_id"] == sid
                assert rows.sum() == cfg.windows.horizon
                if group == "C":
                    assert set(cols["model"][rows]) == {"auto_theta"}
                    continue
                want = alone if group == "A" else comb
                mine = want["unique_id"] == sid
                assert set(cols) == set(want)
                for k in want:
                    np.testing.assert_array_equal(cols[k][rows], want[k][mine], err_msg=k)
                assert set(cols["model"][rows]) == {net if group == "A" else "combination"}
