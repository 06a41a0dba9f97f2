"""`recipe: auto`: the table of pipeline/config/recipes.py, the user's keys winning over it, and the
resolved config reaching the run."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import hourly, write_long

from pipeline import config as C
from pipeline.config.model import layers_to_cover
from pipeline.config.model import receptive_field as _field
from pipeline.config.recipes import after_load, before_load, choose


def receptive_field(kernel, dilations):
    return _field([kernel] * len(dilations), dilations, [1] * len(dilations))


def auto(*overrides: str) -> C.Config:
    return C.load(None, ["recipe=auto", *overrides])


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 8, 48, 96, 168, 336, 1000])
def test_layers_to_cover_is_the_fewest_whose_field_covers(steps):
    n = layers_to_cover(steps)
    assert receptive_field(3, [2 ** i for i in range(n)]) >= steps
    if n > 1:
        assert receptive_field(3, [2 ** i for i in range(n - 1)]) < steps


def test_before_load_sets_what_the_data_read_needs():
    cfg = before_load(auto("windows.horizon=24", "windows.n_windows=2", "windows.step=24"))
    w = cfg.windows
    assert (w.min_length, w.scaling, w.lookback) == (2 * 24 + 24, "window_recent", 7 * 24)
    assert before_load(C.load(None, ["windows.horizon=24"])).windows.min_length \
        == C.load(None, ["windows.horizon=24"]).windows.min_length   # recipe none: untouched


def test_hourly_recipe_from_the_table():
    cfg = auto("windows.horizon=48", "windows.n_windows=1")
    lengths = np.full(414, 700 + 48)                 # M4 Hourly: 700 points before the cutoff
    got = choose(cfg, lengths, 24)
    assert got["model.ensemble.lookbacks"] == [2, 5, 7]
    assert got["windows.lookback"] == 7 * 48
    # 14.6 horizons of history: long series, an MLP over the window
    assert (got["model.encoder.type"], got["model.encoder.hidden_size"],
            got["model.encoder.num_layers"]) == ("ffn", 512, 3)
    assert (got["model.decoder.type"], got["model.decoder.hidden_size"]) == ("direct", 128)
    assert got["model.ensemble.losses"] == ["mase", "smape", "mae"]
    assert got["model.ensemble.members"] == 9
    assert got["train.steps_per_epoch"] == 51 and got["train.batch_size"] == 256
    assert (got["train.epochs"], got["train.patience"]) == (60, 10)
    assert got["train.sampling"] == "series"


def test_short_series_get_a_causal_cnn_that_covers_the_longest_lookback():
    got = choose(auto("windows.horizon=48", "windows.n_windows=1"), np.full(414, 9 * 48 + 48),
                 24)                                 # 9 horizons of history: short
    assert got["model.encoder.type"] == "cnn" and got["windows.lookback"] == 7 * 48
    assert got["model.encoder.num_layers"] == 8      # field 511 >= 336 > 255
    assert got["model.encoder.hidden_size"] == 32 and got["model.decoder.hidden_size"] == 128
    assert (got["train.epochs"], got["train.patience"]) == (20, 5)
    # the user's CNN on long series keeps the CNN's epochs
    mine = choose(auto("windows.horizon=48", "windows.n_windows=1", "model.encoder.type=cnn"),
                  np.full(414, 700 + 48), 24)
    assert "model.encoder.type" not in mine and mine["train.epochs"] == 20


def test_short_series_combine_the_network_with_the_comparators_long_ones_do_not():
    """Under 10 horizons of history (median): the forecast averages the ensemble with
    AutoETS, AutoTheta and DynamicOptimizedTheta (added to the default comparators), those
    of them the comparators run where the user named them; the user's key wins."""
    short, long = np.full(100, 9 * 18 + 18), np.full(100, 10 * 18 + 18)
    three = ["auto_ets", "auto_theta", "dynamic_theta"]
    got = choose(auto("windows.horizon=18", "windows.n_windows=1"), short, 12)
    assert got["evaluate.combine"] == got["evaluate.comparators"] == three
    cfg, _ = after_load(auto("windows.horizon=18", "windows.n_windows=1"), short, 12)
    assert cfg.evaluate.combine == cfg.evaluate.comparators == three
    got = choose(auto("windows.horizon=18", "windows.n_windows=1"), long, 12)
    assert got["evaluate.combine"] == [] and "evaluate.comparators" not in got   # unchanged
    theta = auto("windows.horizon=18", "windows.n_windows=1", "evaluate.comparators=[auto_theta]")
    assert choose(theta, short, 12)["evaluate.combine"] == ["auto_theta"]
    assert "evaluate.comparators" not in choose(theta, short, 12)
    two = auto("windows.horizon=18", "evaluate.comparators=[auto_ets, auto_theta]")
    assert choose(two, short, 12)["evaluate.combine"] == three[:2]
    assert choose(auto("windows.horizon=18", "evaluate.comparators=[]"), short, 12)[
        "evaluate.combine"] == []
    mine = auto("windows.horizon=18", "windows.n_windows=1", "evaluate.combine=[auto_ets]")
    assert "evaluate.combine" not in choose(mine, short, 12)
    cfg, _ = after_load(mine, short, 12)
    assert cfg.evaluate.combine == ["auto_ets"] and cfg.evaluate.comparators == three[:2]


def test_short_series_with_one_cutoff_publish_the_combination_without_selection():
    """One backtest cutoff judges a network trained without a large share of each short
    series: the recipe publishes its combination there; with more cutoffs, on long series,
    without a combination or with the user's own `evaluate.select`, the backtest selects."""
    short, long = np.full(100, 9 * 18 + 18), np.full(100, 10 * 18 + 18)
    one = auto("windows.horizon=18", "windows.n_windows=1")
    assert choose(one, short, 12)["evaluate.select"] == "network"
    assert after_load(one, short, 12)[0].evaluate.select == "network"
    assert "evaluate.select" not in choose(one, long, 12)
    three = auto("windows.horizon=18", "windows.n_windows=3", "windows.step=1")
    assert "evaluate.select" not in choose(three, short + 2, 12)
    for key in ("evaluate.comparators=[]", "evaluate.combine=[]"):
        assert "evaluate.select" not in choose(
            auto("windows.horizon=18", "windows.n_windows=1", key), short, 12)
    mine = auto("windows.horizon=18", "windows.n_windows=1", "evaluate.select=auto")
    assert after_load(mine, short, 12)[0].evaluate.select == "auto"


def test_windows_are_centred_on_their_recent_level_unless_the_user_scales():
    """Short and long series: `window_recent` scaling; the user's own scaling wins."""
    short, long = np.full(100, 9 * 18 + 18), np.full(100, 10 * 18 + 18)
    cfg = auto("windows.horizon=18", "windows.n_windows=1")
    assert after_load(before_load(cfg), short, 12)[0].windows.scaling == "window_recent"
    assert after_load(before_load(cfg), long, 12)[0].windows.scaling == "window_recent"
    mine = auto("windows.horizon=18", "windows.n_windows=1", "windows.scaling=window")
    assert after_load(before_load(mine), short, 12)[0].windows.scaling == "window"


def test_short_monthly_series_get_short_lookbacks_that_still_see_two_seasons():
    cfg = auto("windows.horizon=18", "windows.n_windows=1")
    got = choose(cfg, np.full(1428, 50 + 18), 12)     # M3 monthly-like: ~50 points of history
    assert got["model.ensemble.lookbacks"] == [2, 3]   # top = clip(50 // 18, 3, 7) = 3
    assert got["windows.lookback"] == 54 >= 2 * 12
    yearly = choose(auto("windows.horizon=6", "windows.n_windows=1"), np.full(645, 20 + 6), 1)
    assert yearly["model.ensemble.lookbacks"] == [2, 3]
    # a season longer than the lookbacks: all of them scaled until the longest sees two
    weekly = choose(auto("windows.horizon=24", "windows.n_windows=1"), np.full(50, 24 * 4), 168)
    assert weekly["windows.lookback"] >= 2 * 168
    assert weekly["windows.lookback"] == max(weekly["model.ensemble.lookbacks"]) * 24


def test_sizes_grow_with_the_series_count():
    cfg = auto("windows.horizon=12")
    small, mid, big = (choose(cfg, np.full(n, 100), 12) for n in (500, 5_000, 200_000))
    assert [g["model.encoder.hidden_size"] for g in (small, mid, big)] == [32, 64, 128]
    assert [g["train.batch_size"] for g in (small, mid, big)] == [256, 256, 1024]
    assert [g["train.steps_per_epoch"] for g in (small, mid, big)] == [62, 100, 100]
    assert big["model.ensemble.losses"] == ["mase"]
    long = choose(cfg, np.full(200_000, 200), 12)      # the MLP keeps its size
    assert (long["model.encoder.hidden_size"], long["train.batch_size"]) == (512, 1024)


def test_user_keys_win_over_the_recipe():
    cfg = auto("windows.horizon=24", "windows.n_windows=1", "windows.lookback=96",
               "model.encoder.type=gru", "train.epochs=3", "model.loss=mae")
    resolved, chosen = after_load(before_load(cfg), np.full(100, 24 * 9), 24)
    assert resolved.windows.lookback == 96 and resolved.train.epochs == 3
    assert resolved.model.encoder.type == "gru" and resolved.model.loss == "mae"
    assert not any(k.startswith("model.encoder.") for k in chosen)
    assert "windows.lookback" not in chosen and "model.ensemble.losses" not in chosen
    assert resolved.train.sampling == "series"       # what the user left is the recipe's
    assert resolved.explicit == cfg.explicit


def test_an_architecture_that_cannot_be_packed_gets_no_ensemble():
    cfg = auto("windows.horizon=24", "windows.n_windows=1", "model.encoder.type=lstm",
               "model.decoder.type=lstm")
    resolved, _ = after_load(before_load(cfg), np.full(100, 24 * 9), 24)
    assert resolved.model.ensemble.members == 1
    assert resolved.model.encoder.type == "lstm"


def test_recipe_none_changes_nothing():
    cfg = C.load(None, ["windows.horizon=24"])
    resolved, chosen = after_load(before_load(cfg), np.full(10, 500), 24)
    assert chosen == {} and resolved.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("days,encoder", [(9, "cnn"), (20, "ffn")])
def test_prepare_resolves_the_config_for_the_data_and_the_network_sees_its_lookback(
        tmp_path, days, encoder):
    from pipeline.data.prepare import prepare
    n, t = 12, 24 * days
    rng = np.random.default_rng(0)
    ids = np.repeat([f"s{i}" for i in range(n)], t)
    ds = np.tile(hourly(t), n)
    y = np.tile(np.sin(np.arange(t) * 2 * np.pi / 24), n) + rng.normal(0, .1, n * t)
    path = write_long(str(tmp_path / "in" / "a.parquet"), ids, ds, y)
    cfg = C.load(None, ["recipe=auto", f"data.path={path}", "data.freq=1h", "data.calendar=[]",
                        "windows.horizon=24", "windows.n_windows=1", "train.epochs=2"])
    prep = prepare(cfg)
    r = prep.cfg
    assert prep.recipe["windows.lookback"] == r.windows.lookback == 7 * 24
    assert r.train.epochs == 2                        # the user's
    assert r.model.ensemble.members == 9 and r.model.ensemble.lookbacks == [2, 5, 7]
    enc = r.model.encoder
    assert enc.type == encoder
    if encoder == "cnn":
        assert receptive_field(enc.kernel_size, [2 ** i for i in range(enc.num_layers)]) \
            >= r.windows.lookback
    assert prep.plan is not None


# ------------------------------------------------------------------ overrides stay consistent

def _monthly(n: int = 6, length: int = 60):
    """A tiny monthly-like panel: season 12, levels and phases apart."""
    from pipeline.data.series import SeriesArrays
    rng = np.random.default_rng(0)
    t = np.arange(length)
    return SeriesArrays.from_list([20 + 5 * np.sin(2 * np.pi * (t + k) / 12)
                                   + rng.normal(0, 0.3, length) for k in range(n)])


TINY = ["recipe=auto", "windows.horizon=6", "windows.val_size=6", "windows.n_windows=1",
        "data.calendar=[]", "evaluate.comparators=[]", "train.epochs=1",
        "train.steps_per_epoch=1", "model.encoder.hidden_size=8",
        "model.decoder.hidden_size=8"]


def _resolve_train_forecast(overrides: list[str]):
    """The recipe resolved under `overrides` on the tiny panel, one step of training, and the
    forecast of every series from the trained model (None when refused: the ConfigError)."""
    from pipeline.forecasting.final import final_forecast
    from pipeline.training.jobs import run_job
    from pipeline.training.plan import plan_jobs
    arrays = _monthly()
    try:
        cfg = before_load(C.load(None, [*TINY, *overrides]))       # before any data is read
        cfg, _ = after_load(cfg, arrays.lengths, 12)
    except C.ConfigError as e:
        return e
    (job,) = plan_jobs(arrays, cfg)
    res = run_job(arrays, job, cfg)
    assert res.ok, (overrides, res.error)
    cols = final_forecast(arrays, [job], {job.name: res.model()}, cfg)
    return cfg, cols


def test_one_member_of_the_recipe_trains_and_forecasts_end_to_end():
    """`--set model.ensemble.members=1` under recipe: auto (once: sized for the ensemble's
    shortest lookback and the windows of its longest, it failed at forecast time)."""
    cfg, cols = _resolve_train_forecast(["model.ensemble.members=1"])
    assert cfg.model.ensemble.members == 1
    assert cfg.model.ensemble.lookbacks in (None, [cfg.windows.lookback // 6])
    assert len(cols["y_hat"]) == 6 * 6 and np.isfinite(cols["y_hat"]).all()


def test_one_member_with_a_lookback_it_cannot_read_is_refused_in_one_line():
    e = _resolve_train_forecast(["model.ensemble.members=1", "model.ensemble.lookbacks=[2]",
                                 "windows.lookback=24"])
    assert isinstance(e, C.ConfigError) and "\n" not in str(e)
    assert "model.ensemble.members = 1" in str(e) and "windows.lookback = 24" in str(e)


def test_any_override_of_the_recipe_builds_a_model_that_reads_its_windows():
    """Property: whatever keys a user sets among members, lookbacks, lookback, encoder,
    losses and loss, the recipe resolves a config whose model trains on its windows and
    forecasts every series, or refuses it in one line naming a key."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    keys = {"model.ensemble.members": st.sampled_from([1, 2, 3, 4, 9]),
            "model.ensemble.lookbacks": st.sampled_from(["[1]", "[2, 3]", "[1, 2, 4]"]),
            "model.ensemble.losses": st.sampled_from(["[mae]", "[mase, smape]"]),
            "windows.lookback": st.sampled_from([6, 18, 24]),
            "model.encoder.type": st.sampled_from(["cnn", "ffn", "gru"]),
            "model.loss": st.sampled_from(["mae", "mase", "smape"])}

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.fixed_dictionaries({}, optional=keys))
    def check(chosen):
        got = _resolve_train_forecast([f"{k}={v}" for k, v in chosen.items()])
        if isinstance(got, C.ConfigError):
            assert "\n" not in str(got) and any(k in str(got) for k in chosen), got
            return
        cfg, cols = got
        assert len(cols["y_hat"]) == 6 * 6 and np.isfinite(cols["y_hat"]).all(), chosen
    check()


def test_monthly_data_gets_no_calendar_features_unless_the_user_set_them():
    """The month's sin/cos did not help the network on M1 or M3 monthly: the recipe turns
    `data.calendar: auto` off for monthly data only; the user's own setting wins."""
    lengths = np.full(100, 9 * 18 + 18)
    cfg = auto("windows.horizon=18", "windows.n_windows=1")
    assert choose(cfg, lengths, 12, ["month"])["data.calendar"] == []
    assert after_load(cfg, lengths, 12, ["month"])[0].data.calendar == []
    for other in (["quarter"], ["hour", "dayofweek"], [], None):
        assert "data.calendar" not in choose(cfg, lengths, 12, other)
    mine = auto("windows.horizon=18", "windows.n_windows=1", "data.calendar=[month]")
    assert after_load(mine, lengths, 12, ["month"])[0].data.calendar == ["month"]
