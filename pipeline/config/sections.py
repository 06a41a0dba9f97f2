"""The config schema: one dataclass per section, cross-field rules in each `__post_init__`
(DESIGN.md §3-§8). Loading YAML and `--set` overrides into it is `pipeline.config.loading`."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any


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
        """Steps of history one output of the causal CNN stack sees."""
        n = len(self.layer_dilations)
        return receptive_field([self.kernel_size] * n, self.layer_dilations, [self.stride] * n)


def receptive_field(kernel_sizes, dilations, strides) -> int:
    """Input steps one output of a stack of causal conv layers sees:
    1 + sum_i d_i (k_i - 1) prod_{j<i} s_j. The one formula, for the config's check and the
    built encoder alike."""
    field_, jump = 1, 1
    for k, d, s in zip(kernel_sizes, dilations, strides, strict=True):
        field_ += d * (k - 1) * jump
        jump *= s
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


PACKED_ENCODERS = ("cnn", "gru")   # what pipeline.models.packed can pack
PACKED_DECODERS = ("direct",)


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

    def unpackable(self) -> str | None:
        """Why models of this spec cannot be packed into one module (packed per-group
        training, ensembles), or None when they can."""
        enc, dec = self.encoder, self.decoder
        if enc.type not in PACKED_ENCODERS:
            return (f"packed models support encoder {' | '.join(PACKED_ENCODERS)}; got "
                    f"model.encoder.type = {enc.type!r}")
        if enc.type == "gru" and enc.bidirectional:
            return ("packed models support a unidirectional gru only; set "
                    "model.encoder.bidirectional = false")
        if dec.type not in PACKED_DECODERS:
            return (f"packed models support decoder {' | '.join(PACKED_DECODERS)}; got "
                    f"model.decoder.type = {dec.type!r}")
        return None


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
        if self.train.mode != "per_group":
            raise ConfigError("train.per_group.packed = true needs train.mode = 'per_group'")
        if why := self.model.unpackable():
            raise ConfigError(f"train.per_group.packed = true: {why}")

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
            warnings.warn(msg, stacklevel=2)
        if rf > self.windows.lookback:
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
