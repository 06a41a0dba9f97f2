"""Typed job configuration: dataclass sections loaded from YAML, `--set` overrides, checks.

`load(path, overrides)` reads a YAML file whose top-level keys are the sections below,
applies `section.key=value` overrides (values parsed as YAML), and builds the dataclass tree.
Unknown keys are errors that name the key and suggest the nearest valid one; cross-field
rules live in each section's `__post_init__`. This module imports nothing of the project.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(f"{name} = {value!r} must be {'>= 0' if allow_zero else '> 0'}")


CALENDAR_FEATURES = ("hour", "dayofweek", "dayofmonth", "month")


@dataclass
class DataConfig:
    """Where the input lives and what its columns mean (DESIGN.md §3)."""

    path: str = "data/demo"              # file, folder or hive dataset; local or a pyarrow fs URI
    id_col: str = "unique_id"
    time_col: str = "ds"
    target_col: str = "y"
    group_col: str | None = None         # per-group training partitions on this column
    static_cols: list[str] = field(default_factory=list)
    past_covariates: list[str] = field(default_factory=list)    # known only up to now
    future_covariates: list[str] = field(default_factory=list)  # known ahead (price plans, promos)
    calendar: list[str] | str = "auto"   # "auto" (by frequency), [] or CALENDAR_FEATURES items
    freq: str | None = None              # polars duration ("1h", "15m", "1d"); None = inferred
    nan_policy: str = "impute"           # NaN/inf targets: impute (and mask) | drop | fail
    nonnegative: bool = False            # series with negative targets are skipped when true
    rows_per_task: int = 5_000_000       # a file larger than this is split into chunks of series

    def __post_init__(self) -> None:
        _choice("data.nan_policy", self.nan_policy, ("impute", "drop", "fail"))
        _positive("data.rows_per_task", self.rows_per_task)
        if isinstance(self.calendar, str) and self.calendar != "auto":
            raise ConfigError(f"data.calendar = {self.calendar!r}: use 'auto' or a list of "
                              f"{', '.join(CALENDAR_FEATURES)}")
        if isinstance(self.calendar, list):
            for name in self.calendar:
                _choice("data.calendar[]", name, CALENDAR_FEATURES)
        named = [self.id_col, self.time_col, self.target_col, self.group_col,
                 *self.static_cols, *self.past_covariates, *self.future_covariates]
        named = [c for c in named if c]
        dup = sorted({c for c in named if named.count(c) > 1})
        if dup:
            raise ConfigError(f"data: column(s) {dup} are given more than one role")


@dataclass
class WindowsConfig:
    """Window geometry and the cutoffs of the backtest (DESIGN.md §4).

    Positions are per series, counted from its end: backtest cutoff k (0 = latest) leaves
    `len - horizon - k * step` steps for training. `val_size` steps before a cutoff are held out
    for validation (windows whose target ends inside them).
    """

    lookback: int = 168
    horizon: int = 24
    stride: int = 1                      # distance between consecutive training windows
    max_windows_per_series: int | None = None  # keep the most recent ones
    val_size: int | None = None          # steps held out before the cutoff; None = horizon
    n_windows: int = 1                   # backtest cutoffs
    step: int | None = None              # steps between backtest cutoffs; None = horizon
    scaling: str = "standard"            # none | standard | robust | minmax | window

    def __post_init__(self) -> None:
        _positive("windows.lookback", self.lookback)
        _positive("windows.horizon", self.horizon)
        _positive("windows.stride", self.stride)
        _positive("windows.n_windows", self.n_windows)
        if self.max_windows_per_series is not None:
            _positive("windows.max_windows_per_series", self.max_windows_per_series)
        if self.val_size is None:
            self.val_size = self.horizon
        _positive("windows.val_size", self.val_size, allow_zero=True)
        if self.step is None:
            self.step = self.horizon
        _positive("windows.step", self.step)
        _choice("windows.scaling", self.scaling,
                ("none", "standard", "robust", "minmax", "window"))

    @property
    def min_length(self) -> int:
        """Shortest series that can be backtested at every cutoff (one full lookback before the
        oldest cutoff); shorter series are skipped and get a fallback forecast."""
        return self.lookback + self.horizon + (self.n_windows - 1) * self.step


@dataclass
class EncoderConfig:
    """Encoder block. `type`: ffn | rnn | lstm | gru | cnn (DESIGN.md §5)."""

    type: str = "gru"
    hidden_size: int = 64        # RNN hidden size, FFN units, CNN channels
    num_layers: int = 2          # RNN layers, FFN hidden layers, CNN conv layers
    dropout: float = 0.0         # between layers
    bias: bool = True
    bidirectional: bool = False  # rnn | lstm | gru
    nonlinearity: str = "tanh"   # rnn only: tanh | relu
    kernel_size: int = 3         # cnn
    dilation_base: int = 2       # cnn: layer i has dilation base**i unless `dilations` is set
    dilations: list[int] | None = None
    stride: int = 1              # cnn
    padding_mode: str = "zeros"  # cnn: zeros | replicate (left side only)
    residual: bool = True        # cnn

    def __post_init__(self) -> None:
        _choice("model.encoder.type", self.type, ("ffn", "rnn", "lstm", "gru", "cnn"))
        _choice("model.encoder.nonlinearity", self.nonlinearity, ("tanh", "relu"))
        _choice("model.encoder.padding_mode", self.padding_mode, ("zeros", "replicate"))
        for key in ("hidden_size", "num_layers", "kernel_size", "dilation_base", "stride"):
            _positive(f"model.encoder.{key}", getattr(self, key))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.encoder.dropout = {self.dropout} must be in [0, 1)")
        if self.dilations is not None and len(self.dilations) != self.num_layers:
            raise ConfigError(f"model.encoder.dilations has {len(self.dilations)} entries but "
                              f"model.encoder.num_layers = {self.num_layers}")

    @property
    def layer_dilations(self) -> list[int]:
        return list(self.dilations or [self.dilation_base ** i for i in range(self.num_layers)])

    def receptive_field(self) -> int:
        """Steps of history one output of the causal CNN stack sees: 1 + Σ d_i (k-1) s^(i)."""
        field_, jump = 1, 1
        for d in self.layer_dilations:
            field_ += d * (self.kernel_size - 1) * jump
            jump *= self.stride
        return field_


@dataclass
class DecoderConfig:
    """Decoder block. `type`: direct (FFN emits all H steps) | rnn | lstm | gru (autoregressive)."""

    type: str = "direct"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    teacher_forcing: float = 0.0   # probability of feeding the true value during training

    def __post_init__(self) -> None:
        _choice("model.decoder.type", self.type, ("direct", "rnn", "lstm", "gru"))
        _positive("model.decoder.hidden_size", self.hidden_size)
        _positive("model.decoder.num_layers", self.num_layers)
        if not 0 <= self.teacher_forcing <= 1:
            raise ConfigError(f"model.decoder.teacher_forcing = {self.teacher_forcing} "
                              "must be in [0, 1]")


@dataclass
class ModelConfig:
    name: str = ""                 # label used in outputs and tracking; default "<enc>_<dec>"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: str = "mae"              # mae | mse | huber | quantile
    huber_delta: float = 1.0
    quantiles: list[float] = field(default_factory=list)  # non-empty with loss = quantile
    embedding: str = "none"        # none | series | group: learned id embedding (global models)
    embedding_dim: int = 8
    season: int | None = None      # the seasonality the CNN must see (e.g. 24, 168)
    require_receptive_field: bool = False  # refuse (true) or warn (false) when it does not

    def __post_init__(self) -> None:
        _choice("model.loss", self.loss, ("mae", "mse", "huber", "quantile"))
        _choice("model.embedding", self.embedding, ("none", "series", "group"))
        if self.loss == "quantile" and not self.quantiles:
            raise ConfigError("model.loss = 'quantile' needs model.quantiles, e.g. [0.1, 0.5, 0.9]")
        if any(not 0 < q < 1 for q in self.quantiles):
            raise ConfigError(f"model.quantiles = {self.quantiles}: each must be in (0, 1)")
        if self.quantiles and self.loss != "quantile":
            raise ConfigError("model.quantiles is set but model.loss is not 'quantile'")
        if not self.name:
            self.name = f"{self.encoder.type}_{self.decoder.type}"


@dataclass
class PerGroupConfig:
    """`train.per_group.packed`: train every group's model together as one packed module (one
    grouped kernel for all groups) instead of one task per group. CNN or GRU encoder with the
    direct decoder only."""

    packed: bool = False


@dataclass
class TrainConfig:
    mode: str = "global"           # global | per_group
    per_group: PerGroupConfig = field(default_factory=PerGroupConfig)
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"        # adam | adamw
    scheduler: str = "none"        # none | cosine | onecycle
    grad_clip: float | None = 1.0
    patience: int = 5              # early stopping on validation loss
    val_max_windows: int | str | None = "auto"  # validate on a fixed seeded sample of at
                                   # most this many windows per job; auto: as many as an
                                   # epoch trains on (at least 1,024); null: all
    steps_per_epoch: int | None = None  # None = one pass over the training windows
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    precision: str = "auto"        # auto (bf16 on CUDA) | fp32 | bf16
    warm_start: bool = False       # start from the registered champion (same architecture)
    warm_start_epochs: int = 2     # the fine-tuning budget: epochs × steps_per_epoch steps
    checkpoint_minutes: float | None = 10.0  # save a job's state at the end of an epoch at
                                   # most this often (0: every epoch; null: never); a retried
                                   # or rerun job resumes from it
    checkpoint_dir: str = ""       # "" = <output.path>/<name>/checkpoints (any pyarrow URI)

    def __post_init__(self) -> None:
        _choice("train.mode", self.mode, ("global", "per_group"))
        _positive("train.warm_start_epochs", self.warm_start_epochs)
        if isinstance(self.val_max_windows, str):
            _choice("train.val_max_windows", self.val_max_windows, ("auto",))
        elif self.val_max_windows is not None:
            _positive("train.val_max_windows", self.val_max_windows)
        if self.checkpoint_minutes is not None:
            _positive("train.checkpoint_minutes", self.checkpoint_minutes, allow_zero=True)
        _choice("train.optimizer", self.optimizer, ("adam", "adamw"))
        _choice("train.scheduler", self.scheduler, ("none", "cosine", "onecycle"))
        _choice("train.precision", self.precision, ("auto", "fp32", "bf16"))
        for key in ("epochs", "batch_size", "lr"):
            _positive(f"train.{key}", getattr(self, key))


@dataclass
class EvaluateConfig:
    """Backtest and final forecast. The backtest cutoffs are `windows.n_windows` / `step`."""

    season: int | None = None      # m of MASE and seasonal naive; None = from the frequency
    final_model: str = "refit"     # refit: train again on all data for the forecast | reuse
    refit: bool = False            # backtest: train before every cutoff (else once, before the
                                   # oldest, and predict every cutoff with that model)
    plots: int = 6                 # PNGs of this many series (history, backtest, forecast)

    def __post_init__(self) -> None:
        _choice("evaluate.final_model", self.final_model, ("refit", "reuse"))
        if self.season is not None:
            _positive("evaluate.season", self.season)
        _positive("evaluate.plots", self.plots, allow_zero=True)


@dataclass
class RayConfig:
    enabled: bool = True           # false: everything runs in this process (tests, debugging)
    address: str | None = None     # None: start a local instance; "auto" or "ray://…" joins
    num_cpus: int | None = None    # for a local instance; None = all cores
    num_workers: int = 1           # Ray Train workers for global training
    task_num_cpus: float = 1.0     # per data or per-group task
    task_num_gpus: float = 0.0     # fractions allowed (a scheduling label, not a memory cap)
    max_retries: int = 2

    def __post_init__(self) -> None:
        _positive("ray.num_workers", self.num_workers)
        _positive("ray.task_num_cpus", self.task_num_cpus, allow_zero=True)
        _positive("ray.task_num_gpus", self.task_num_gpus, allow_zero=True)
        _positive("ray.max_retries", self.max_retries, allow_zero=True)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None         # None: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
    experiment: str | None = None  # None: the config's name
    required: bool = True
    child_runs: str = "per_model"  # per_model | per_group

    def __post_init__(self) -> None:
        _choice("tracking.child_runs", self.child_runs, ("per_model", "per_group"))


@dataclass
class OutputConfig:
    path: str = "outputs"          # local path or pyarrow fs URI
    report: bool = True            # write the validation report next to the outputs


@dataclass
class Config:
    name: str = "demo"
    data: DataConfig = field(default_factory=DataConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        if self.train.mode == "per_group" and not self.data.group_col:
            raise ConfigError("train.mode = 'per_group' needs data.group_col")
        if self.train.per_group.packed:
            self._check_packable()
        if self.model.embedding == "group" and not self.data.group_col:
            raise ConfigError("model.embedding = 'group' needs data.group_col")
        self._check_receptive_field()

    def _check_packable(self) -> None:
        enc, dec = self.model.encoder, self.model.decoder
        if self.train.mode != "per_group":
            raise ConfigError("train.per_group.packed = true needs train.mode = 'per_group'")
        if enc.type not in ("cnn", "gru") or enc.bidirectional or dec.type != "direct":
            raise ConfigError(
                "train.per_group.packed = true supports model.encoder.type cnn or gru "
                "(unidirectional) with model.decoder.type direct; got encoder "
                f"{enc.type!r}{' (bidirectional)' if enc.bidirectional else ''}, decoder "
                f"{dec.type!r}")

    def _check_receptive_field(self) -> None:
        enc = self.model.encoder
        if enc.type != "cnn":
            return
        rf = enc.receptive_field()
        season = self.model.season
        if season is not None and rf < season:
            msg = (f"model.encoder: the CNN's receptive field is {rf} steps (kernel_size "
                   f"{enc.kernel_size}, dilations {enc.layer_dilations}, stride {enc.stride}) "
                   f"but model.season = {season}; add layers or raise dilation_base")
            if self.model.require_receptive_field:
                raise ConfigError(msg)
            import warnings
            warnings.warn(msg, stacklevel=2)
        if rf > self.windows.lookback:
            import warnings
            warnings.warn(f"model.encoder: receptive field {rf} exceeds windows.lookback "
                          f"{self.windows.lookback}; the oldest taps only see padding",
                          stacklevel=2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key` → value, for logging as params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj
        walk("", self.to_dict())
        return out


# ---------------------------------------------------------------- building from dicts

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = _hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in valid:
            raise ConfigError(f"unknown key {name!r}{_suggest(str(key), valid)}")
        kwargs[key] = _coerce(hints[key], value, name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - guarded by the key check above
        raise ConfigError(f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{name} may not be null")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{name} = {value!r} matches none of the allowed types")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):   # YAML 1.1 reads `1e-5` (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None


def from_dict(raw: dict | None, overrides: list[str] | tuple = ()) -> Config:
    raw = dict(raw or {})
    for item in overrides:
        _apply_override(raw, item)
    return _build(Config, raw, "")


def load(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    return from_dict(raw, overrides)
