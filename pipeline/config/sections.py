"""The config schema: one dataclass per section, cross-field rules in each `__post_init__`
(DESIGN.md §3-§8). Loading YAML and `--set` overrides into it is `pipeline.config.loading`."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.checks import NAME, ConfigError
from pipeline.config.checks import choice as _choice
from pipeline.config.checks import positive as _positive
from pipeline.config.evaluate import (  # noqa: F401 - re-exported
    STATISTICAL,
    EvaluateConfig,
    PromoteConfig,
)
from pipeline.config.hierarchy import ReconcileConfig, check_hierarchy
from pipeline.config.model import (  # noqa: F401 - the model sections, re-exported
    PACKED_DECODERS,
    PACKED_ENCODERS,
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
    receptive_field,
)
from pipeline.config.output import OutputConfig  # noqa: F401 - re-exported
from pipeline.config.tune import TuneConfig

MAX_HORIZON = 32767     # the outputs' `step` column is an int16
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
    freq: str | int | None = None        # "1h", "1d", "1w-mon", "1bd", "1mo", "1q", "1y", 1
                                         # (integer steps); None: inferred
    nan_policy: str = "impute"           # NaN/inf targets: impute (and mask) | drop | fail
    nonnegative: bool = False            # series with negative targets are skipped when true
    rows_per_task: int = 5_000_000       # a file larger than this is split into chunks of series
    unit: str | None = None              # the target's unit ("kWh"): the report's axes, values
    hierarchy: list[list[str]] = field(default_factory=list)  # levels of static columns, top
                                         # first ([[], [store]]); [] = the series alone

    def __post_init__(self) -> None:
        if isinstance(self.freq, int):
            self.freq = str(self.freq)
        _choice("data.nan_policy", self.nan_policy, ("impute", "drop", "fail"))
        _positive("data.rows_per_task", self.rows_per_task)
        if self.unit is not None and not self.unit.strip():
            raise ConfigError("data.unit = '' names no unit; leave it out or give one (\"kWh\")")
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
        check_hierarchy(self)


@dataclass
class WindowsConfig:
    """Window geometry and the cutoffs of the backtest (DESIGN.md §4).

    Positions are per series, counted from its end: backtest cutoff k (0 = latest) leaves
    `len - horizon - k * step` steps for training. `val_size` steps before a cutoff are held out
    for validation (windows whose target ends inside them). The lookback is given in steps
    (`lookback`, default 168) or in horizons (`lookback_horizons`), not both. Series shorter
    than `required_length` are skipped (fallback forecast) unless `min_length` is lower: then
    series of at least `min_length` steps train and forecast on windows left-padded (the first
    value repeated) where their history is shorter than the lookback.
    """

    lookback: int | None = None          # steps of history a window reads; None: 168
    lookback_horizons: int | None = None # or that many horizons (exclusive with lookback)
    horizon: int = 24
    min_length: int | None = None        # shortest series kept (left-padded windows); None:
                                         # required_length, no padding
    stride: int = 1                      # distance between consecutive training windows
    max_windows_per_series: int | None = None  # keep the most recent ones
    val_size: int | None = None          # steps held out before the cutoff; None = horizon
    n_windows: int = 1                   # backtest cutoffs
    step: int | None = None              # steps between backtest cutoffs; None = horizon
    scaling: str = "standard"            # none | standard | robust | minmax | window |
                                         # window_recent (each window centred on its last
                                         # season's mean, scaled by its lookback's std)
    recent_steps: int | None = None      # window_recent: the lookback's last steps whose mean
                                         # centres a window; None: one season, fixed in the
                                         # config the run logs (a champion keeps its own)

    def __post_init__(self) -> None:
        _positive("windows.horizon", self.horizon)
        if self.lookback_horizons is not None:
            if self.lookback is not None:
                raise ConfigError("windows.lookback and windows.lookback_horizons are both set; "
                                  "give one")
            _positive("windows.lookback_horizons", self.lookback_horizons)
            self.lookback = self.lookback_horizons * self.horizon
        self.lookback = 168 if self.lookback is None else self.lookback
        _positive("windows.lookback", self.lookback)
        if self.min_length is not None:
            _positive("windows.min_length", self.min_length)
        if self.horizon > MAX_HORIZON:
            raise ConfigError(f"windows.horizon = {self.horizon} is more than {MAX_HORIZON:,} "
                              "steps (the outputs' `step` column is an int16)")
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
                ("none", "standard", "robust", "minmax", "window", "window_recent"))
        if self.recent_steps is not None:
            _positive("windows.recent_steps", self.recent_steps)

    @property
    def required_length(self) -> int:
        """Shortest series that can be backtested at every cutoff with a full lookback before
        the oldest one."""
        return self.lookback + self.horizon + (self.n_windows - 1) * self.step

    @property
    def shortest(self) -> int:
        """Shortest series kept: `min_length` when set (at least a horizon per backtest cutoff
        and one step before the oldest), else `required_length`."""
        if self.min_length is None:
            return self.required_length
        return max(self.min_length, 1 + self.horizon + (self.n_windows - 1) * self.step)

    @property
    def padded(self) -> bool:
        """Whether windows may start before a series' first step (left-padded)."""
        return self.shortest < self.required_length


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
    val_metric: str = "loss"       # what validation scores (early stopping, best weights, the
                                   # `val_loss` logged): loss (the training loss) | mase |
                                   # smape (in original units; a quantile model's median)
    val_max_windows: int | str | None = "auto"  # validate on a fixed seeded sample of at
                                   # most this many windows per job; auto: a quarter of what
                                   # an epoch trains on (at least 3,000); null: all
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
    sampling: str = "windows"      # windows: every window alike (a permutation per epoch) |
                                   # series: B series uniformly per batch, one window of each
    recency_halflife: float | None = None  # series sampling: a window's weight halves every
                                   # this many windows back from the series' latest
    pack: str = "auto"             # an ensemble's members (and per_group.packed groups) train
                                   # as one packed module (always), one after another (never),
                                   # or packed on GPUs only (auto; on a CPU a pack is slower)
    threads: int | str = "auto"    # torch threads of a training process, part of a result's
                                   # identity (float sums); auto: resolved per run and logged:
                                   # a Ray task's CPUs, in-process torch's own setting

    def __post_init__(self) -> None:
        _choice("train.mode", self.mode, ("global", "per_group"))
        _positive("train.warm_start_epochs", self.warm_start_epochs)
        _choice("train.sampling", self.sampling, ("windows", "series"))
        _choice("train.val_metric", self.val_metric, ("loss", "mase", "smape"))
        _choice("train.pack", self.pack, ("auto", "always", "never"))
        if isinstance(self.threads, str):
            _choice("train.threads", self.threads, ("auto",))
        else:
            _positive("train.threads", self.threads)
        if self.recency_halflife is not None:
            _positive("train.recency_halflife", self.recency_halflife)
            if self.sampling != "series":
                raise ConfigError("train.recency_halflife needs train.sampling = 'series'")
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
class RayConfig:
    enabled: bool = True           # false: everything runs in this process (tests, debugging)
    address: str | None = None     # None: start a local instance; "auto" or "ray://…" joins
    num_cpus: int | None = None    # for a local instance; None = all cores
    num_workers: int = 1           # Ray Train workers for global training
    task_num_cpus: float = 1.0     # per data or per-group task
    task_num_gpus: float = 0.0     # fractions allowed (a scheduling label, not a memory cap)
    max_retries: int = 2
    task_timeout_minutes: float | None = 1440.0  # a task (or DDP run) still running after
                                   # this long is cancelled and fails; null: wait forever

    def __post_init__(self) -> None:
        _positive("ray.num_workers", self.num_workers)
        if self.task_timeout_minutes is not None:
            _positive("ray.task_timeout_minutes", self.task_timeout_minutes)
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
    timeout_seconds: float = 10.0  # per request to a server (one retry); one that does not
                                   # answer is given up for the rest of the run

    def __post_init__(self) -> None:
        _choice("tracking.child_runs", self.child_runs, ("per_model", "per_group"))
        _positive("tracking.timeout_seconds", self.timeout_seconds)


@dataclass
class Config:
    explicit = frozenset()          # dotted keys the YAML and --set gave (from_dict sets it)

    name: str = "demo"
    recipe: str = "none"            # none | auto: sizes from the data (config/recipes.py);
                                    # keys set in the YAML or with --set win
    data: DataConfig = field(default_factory=DataConfig)
    windows: WindowsConfig = field(default_factory=WindowsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)   # `python -m pipeline tune` only
    promote: PromoteConfig = field(default_factory=PromoteConfig)  # challenger vs champion
    reconcile: ReconcileConfig = field(default_factory=ReconcileConfig)  # data.hierarchy's

    def __post_init__(self) -> None:
        _choice("recipe", self.recipe, ("none", "auto"))
        if self.tune.per_group and self.train.mode != "per_group":
            raise ConfigError("tune.per_group = true needs train.mode = 'per_group'")
        for key, value in (("name", self.name), ("model.name", self.model.name)):
            if not NAME.fullmatch(value):
                raise ConfigError(f"{key} = {value!r}: use letters, digits and _ . - (it "
                                  "names folders, files and runs)")
        if self.train.mode == "per_group" and not self.data.group_col:
            raise ConfigError("train.mode = 'per_group' needs data.group_col")
        if self.train.per_group.packed:
            self._check_packable()
        if self.model.embedding == "group" and not self.data.group_col:
            raise ConfigError("model.embedding = 'group' needs data.group_col")
        if self.model.name in STATISTICAL or self.model.name in ("naive", "seasonal_naive"):
            raise ConfigError(f"model.name = {self.model.name!r} is a comparator's or "
                              "baseline's name; choose another")
        self._check_intervals()
        self._check_receptive_field()
        self.reconcile.check(self.data)

    def _check_intervals(self) -> None:
        if self.evaluate.combine and self.model.quantiles:
            raise ConfigError("evaluate.combine averages point forecasts; leave "
                              "model.quantiles empty (evaluate.intervals: conformal gives the "
                              "combination its intervals)")
        if self.evaluate.intervals != "conformal":
            return
        if self.windows.n_windows < 2:
            raise ConfigError("evaluate.intervals = 'conformal' needs windows.n_windows >= 2 "
                              "(older cutoffs calibrate, the latest measures coverage)")
        if self.model.quantiles:
            raise ConfigError("evaluate.intervals = 'conformal' writes the quantile columns "
                              "itself; leave model.quantiles empty (model.loss not quantile)")

    def check_ensemble_windows(self, sized: bool = False) -> None:
        """A single model (one member) reads windows.lookback itself, so the member's
        lookback must be it (an ensemble's members each get windows of their own). Checked on
        the config as loaded (`from_dict`; under `recipe: auto` once the recipe has sized
        the members and windows.lookback, `sized`, unless the user set both), not on the
        configs a member derives."""
        ens, w = self.model.ensemble, self.windows
        set_here = "model.ensemble.members" in self.explicit and bool(
            {"windows.lookback", "windows.lookback_horizons"} & self.explicit)
        sized_later = not sized and self.recipe == "auto" and not set_here
        if not ens.lookbacks or sized_later:
            return
        steps = [ens.lookbacks[0] * w.horizon]
        if ens.members == 1 and steps[0] != w.lookback:
            raise ConfigError(f"model.ensemble.members = 1 with model.ensemble.lookbacks = "
                              f"{ens.lookbacks}: the one model reads windows.lookback = "
                              f"{w.lookback} steps, not {steps[0]}; drop "
                              "model.ensemble.lookbacks or make them agree")

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
        if self.model.season is not None:
            self.check_season(self.model.season, "model.season")
        if rf >= 2 * self.windows.lookback:
            warnings.warn(f"model.encoder: receptive field {rf} is at least twice "
                          f"windows.lookback {self.windows.lookback}; most taps of the oldest "
                          "outputs only see padding (fewer layers would do)",
                          stacklevel=2)

    def check_season(self, season: int, source: str) -> None:
        """The CNN's receptive field must cover `season` steps (`model.season`, or the data's
        default season by frequency): refused with `model.require_receptive_field`, else a
        warning."""
        enc = self.model.encoder
        rf = enc.receptive_field()
        if enc.type != "cnn" or rf >= season:
            return
        msg = (f"model.encoder: the CNN's receptive field is {rf} steps (kernel_size "
               f"{enc.kernel_size}, dilations {enc.layer_dilations}, stride {enc.stride}) but "
               f"{source} = {season}; add layers or raise dilation_base")
        if self.model.require_receptive_field:
            raise ConfigError(msg)
        warnings.warn(msg, stacklevel=3)

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
