import warnings

import pytest

from pipeline import config as C
from pipeline.config import Config, ConfigError, EncoderConfig, ModelConfig, WindowsConfig


def test_defaults_build_and_flatten():
    cfg = C.load(None)
    flat = cfg.flat()
    assert flat["windows.lookback"] == 168 and flat["model.encoder.type"] == "gru"
    assert cfg.windows.val_size == cfg.windows.horizon and cfg.windows.step == cfg.windows.horizon
    assert cfg.data.unit is None and C.load(None, ["data.unit=kWh"]).data.unit == "kWh"


def test_yaml_and_set_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nwindows: {lookback: 48, horizon: 12}\n")
    cfg = C.load(p, ["windows.horizon=6", "model.encoder.type=cnn", "data.static_cols=[a, b]"])
    assert (cfg.windows.lookback, cfg.windows.horizon) == (48, 6)
    assert cfg.model.encoder.type == "cnn" and cfg.data.static_cols == ["a", "b"]


@pytest.mark.parametrize("override, message", [
    (["windows.lookbak=3"], "unknown key 'windows.lookbak'; did you mean 'lookback'?"),
    (["windos.lookback=3"], "unknown key 'windos'; did you mean 'windows'?"),
    (["model.encoder.hiden_size=3"], "did you mean 'hidden_size'?"),
    (["windows.lookback=abc"], "windows.lookback must be an integer"),
    (["windows.lookback=0"], "windows.lookback = 0 must be > 0"),
    (["data.nan_policy=ignore"], "data.nan_policy = 'ignore' is not one of"),
    (["train.mode=per_group"], "train.mode = 'per_group' needs data.group_col"),
    (["model.loss=quantile"], "needs model.quantiles"),
    (["data.static_cols=[y]"], "given more than one role"),
    (["data.unit=[kWh]"], "data.unit must be a string, got ['kWh']"),
    (["data.unit=''"], "data.unit = '' names no unit"),
    (["windows"], "expected section.key=value"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(C.ConfigError, match=None) as e:
        C.load(None, override)
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("windows: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)


def test_cnn_receptive_field_refused_or_warned():
    args = ["model.encoder.type=cnn", "model.encoder.num_layers=2", "model.encoder.kernel_size=2",
            "model.season=24"]
    with pytest.warns(UserWarning, match="receptive field is 4 steps"):
        C.load(None, args)
    with pytest.raises(C.ConfigError, match="receptive field is 4 steps"):
        C.load(None, [*args, "model.require_receptive_field=true"])
    ok = C.load(None, ["model.encoder.type=cnn", "model.encoder.num_layers=5", "model.season=24"])
    assert ok.model.encoder.receptive_field() == 1 + 2 * (1 + 2 + 4 + 8 + 16)


def test_exponent_floats_without_a_dot_are_numbers():
    from pipeline.config import from_dict
    assert from_dict({}, ["train.lr=1e-5"]).train.lr == 1e-5
    with pytest.raises(C.ConfigError, match="train.lr must be a number, got 'fast'"):
        from_dict({}, ["train.lr=fast"])


def test_config_refuses_or_warns_when_receptive_field_misses_the_season():
    small = EncoderConfig(type="cnn", kernel_size=2, num_layers=2)  # receptive field 4
    windows = WindowsConfig(lookback=48, horizon=24)
    with pytest.raises(ConfigError, match="receptive field is 4"):
        Config(windows=windows, model=ModelConfig(encoder=small, season=24,
                                                  require_receptive_field=True))
    with pytest.warns(UserWarning, match="receptive field is 4"):
        Config(windows=windows, model=ModelConfig(encoder=small, season=24))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wide = EncoderConfig(type="cnn", kernel_size=2, num_layers=5)  # 32 >= 24
        Config(windows=windows, model=ModelConfig(encoder=wide, season=24,
                                                  require_receptive_field=True))


def test_config_warns_when_receptive_field_is_twice_the_lookback():
    deep = EncoderConfig(type="cnn", kernel_size=3, num_layers=6)  # 1 + 2 * 63 = 127
    with pytest.warns(UserWarning, match="at least twice windows.lookback 48"):
        Config(windows=WindowsConfig(lookback=48, horizon=24), model=ModelConfig(encoder=deep))
    # a field somewhat over the lookback (the recipe's "cover the longest lookback") is quiet
    near = EncoderConfig(type="cnn", kernel_size=3, num_layers=5)  # 1 + 2 * 31 = 63
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Config(windows=WindowsConfig(lookback=48, horizon=24), model=ModelConfig(encoder=near))


def test_hierarchy_and_reconcile_defaults():
    cfg = C.load(None)
    assert cfg.data.hierarchy == [] and cfg.reconcile.method == "auto"
    cfg = C.load(None, ["data.static_cols=[region]", "data.group_col=store",
                        "data.hierarchy=[[], [region], [region, store]]"])
    assert cfg.data.hierarchy == [[], ["region"], ["region", "store"]]
    assert cfg.flat()["reconcile.method"] == "auto"
    assert (cfg.reconcile.resolved(2000), cfg.reconcile.resolved(2001)) == \
        ("mint_shrink", "wls_struct")
    assert C.load(None, ["reconcile.method=bottom_up"]).reconcile.resolved(10) == "bottom_up"


@pytest.mark.parametrize("override, message", [
    (["data.hierarchy=store"], "data.hierarchy must be a list, got 'store'"),
    (["data.hierarchy=[[store]]"], "data.hierarchy names column 'store', which is not a "
                                   "static column"),
    (["data.static_cols=[a, b]", "data.hierarchy=[[a, b], [b]]"],
     "data.hierarchy level 2 ['b'] must start with the columns of level 1"),
    (["data.static_cols=[unique_id]", "data.hierarchy=[[unique_id]]"], "more than one role"),
    (["data.hierarchy=[[1]]"], "data.hierarchy[0][0] must be a string, got 1"),
    (["data.static_cols=[model]", "data.hierarchy=[[model]]"], "names column 'model', which "
                                                               "the levels' forecast files"),
    (["data.static_cols=[level, a]", "data.hierarchy=[[a]]"], "static column 'level' would be"),
    (["reconcile.method=mint"], "reconcile.method = 'mint' is not one of 'auto', 'bottom_up'"),
    (["reconcile.auto_max=0"], "reconcile.auto_max = 0 must be > 0"),
    (["reconcile.intervals=bootstrap"], "reconcile.intervals = 'bootstrap' is not one of "
                                        "'normality', 'quantiles'"),
    (["reconcile.methd=ols"], "unknown key 'reconcile.methd'; did you mean 'method'?"),
    (["data.group_col=store", "data.hierarchy=[[store]]",
      "reconcile.method=top_down_forecast_proportions"], "needs the grand total level []"),
])
def test_bad_hierarchy_or_reconcile_names_the_key(override, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, override)
    assert message in str(e.value) and "\n" not in str(e.value)
