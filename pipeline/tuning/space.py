"""A search space over config keys (`tune.space`) and the configs of its points, without Ray.

A point is {dotted key: value}. Its config is the config as written (the YAML and `--set`,
`loading.read_raw`) with the point's keys set, then resolved for the data as the data stage
would (`recipe: auto` fills what nobody set; the tuned keys are set, so they win), with
`train.val_metric = tune.metric`: every trial is scored on the same validation metric. The
tuned config written for `run` is the same mapping, so `run` trains what the trial trained.

Only keys of `windows.`, `model.` and `train.` are searched; those that decide which data the
job sees or where it runs (the horizon, the backtest cutoffs, the series kept, the mode,
devices, checkpoints) are refused with the reason.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import yaml

from pipeline.config import Config, ConfigError, Domain, from_dict
from pipeline.config.recipes import after_load, before_load
from pipeline.data.series import SeriesArrays, season_of

SECTIONS = ("windows.", "model.", "train.")
FIXED = {"windows.horizon": "it is the forecasting task itself",
         "windows.n_windows": "it sets the backtest cutoffs, which trials never see",
         "windows.step": "it sets the backtest cutoffs, which trials never see",
         "windows.min_length": "it decides which series the data stage keeps",
         "model.name": "the tuned config's model is named from its blocks",
         "train.mode": "one search trains one plan of jobs (tune.per_group searches groups)",
         "train.val_metric": "tune.metric sets it for every trial",
         "train.device": "trials are placed by tune.cpus_per_trial / gpus_per_trial",
         "train.warm_start": "trials train from scratch",
         "train.warm_start_epochs": "trials train from scratch",
         "train.checkpoint_minutes": "trials are checkpointed by the search",
         "train.checkpoint_dir": "trials are checkpointed by the search"}
LOSS_KEYS = ("model.loss", "model.quantiles", "model.ensemble.losses")
EXCLUSIVE = {"windows.lookback": "windows.lookback_horizons",
             "windows.lookback_horizons": "windows.lookback"}


def check_space(raw: dict, cfg: Config) -> dict[str, Domain]:
    """The searched keys and their domains, each checked before any trial: a key that can be
    tuned, and a config that accepts every choice (or both ends of a range)."""
    domains = cfg.tune.domains()
    if not domains:
        raise ConfigError("tune.space is empty: list the keys to search, e.g. "
                          "`tune: {space: {train.lr: loguniform(1e-4, 1e-2)}}`")
    for key, dom in domains.items():
        if not key.startswith(SECTIONS):
            raise ConfigError(f"tune.space.{key}: only windows., model. and train. keys are "
                              "searched (data, evaluation and infrastructure stay as set)")
        if key in FIXED or key.startswith("train.per_group"):
            why = FIXED.get(key, "the plan of jobs is fixed")
            raise ConfigError(f"tune.space.{key} cannot be tuned: {why}")
        for value in dom.bounds():
            try:
                from_dict(with_values(raw, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key} = {value!r}: {e}") from None
    if cfg.tune.metric == "loss" and any(k.startswith(LOSS_KEYS) for k in domains):
        raise ConfigError("tune.metric = 'loss' ranks trials by their own loss, which the "
                          "space changes; use mase or smape")
    return domains


def with_values(raw: dict, values: dict[str, Any]) -> dict:
    """A copy of the config mapping `raw` with dotted keys set (a lookback in steps replaces
    one in horizons and the other way round)."""
    out = copy.deepcopy(raw)
    for key, value in values.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"tune.space.{key}: {part!r} is not a section")
        node[last] = value
        if key in EXCLUSIVE:
            node.pop(EXCLUSIVE[key].rsplit(".", 1)[1], None)
    return out


def point_raw(raw: dict, point: dict[str, Any], metric: str) -> dict:
    """The config mapping of a point: `raw` with the point's keys and the search's metric."""
    values = dict(point)
    if metric != "loss":
        values["train.val_metric"] = metric
    return with_values(raw, values)


def trial_config(raw: dict, point: dict[str, Any], metric: str, arrays: SeriesArrays) -> Config:
    """The config a trial trains: the point's mapping, resolved for the data."""
    cfg = before_load(from_dict(point_raw(raw, point, metric)))
    return after_load(cfg, arrays.lengths[arrays.status == 0], season_of(cfg, arrays),
                      arrays.freq.auto_features())[0]


def plain(value: Any) -> Any:
    """A sampled value as plain YAML (NumPy scalars from the samplers become Python ones)."""
    return value.item() if isinstance(value, np.generic) else value


def tuned_yaml(raw: dict, point: dict[str, Any], metric: str, header: str) -> str:
    """The tuned config as YAML `run` accepts: the mapping as written, with the best point
    and the metric it was chosen on, without the `tune:` section; `header` as comments."""
    out = point_raw(raw, {k: plain(v) for k, v in point.items()}, metric)
    out.pop("tune", None)
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(out, sort_keys=False)
