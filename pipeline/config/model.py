"""The model sections of the config: the encoder and decoder blocks, the model around them
(loss, quantiles, embedding, the season its CNN must see, an ensemble of it), and what can be
packed."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.checks import ConfigError
from pipeline.config.checks import choice as _choice
from pipeline.config.checks import positive as _positive


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


def layers_to_cover(steps: int, kernel: int = 3, base: int = 2) -> int:
    """The fewest causal conv layers (dilations 1, base, base², …, stride 1) whose receptive
    field 1 + (kernel − 1)·Σ dilations covers `steps`."""
    layers, field_ = 0, 1
    while field_ < steps:
        field_ += (kernel - 1) * base ** layers
        layers += 1
    return max(layers, 1)


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


PACKED_ENCODERS = ("ffn", "cnn", "gru")   # what pipeline.models.packed can pack
PACKED_DECODERS = ("direct",)
LOSSES = ("mae", "mse", "huber", "quantile", "mase", "smape")
COMBINE = ("median", "mean")


@dataclass
class EnsembleConfig:
    """`model.ensemble`: `members` models of the one architecture, trained packed. Member i
    reads `lookbacks[i % n_l]` horizons (None: windows.lookback), trains on loss
    `losses[(i // n_l) % n_loss]` (None: model.loss) with seed train.seed + i; member 0 is the
    plain model. Forecasts are combined per series, step and quantile (`combine`)."""

    members: int = 1                      # 1: no ensemble
    lookbacks: list[int] | None = None    # in horizons
    losses: list[str] | None = None
    combine: str = "median"               # median | mean

    def __post_init__(self) -> None:
        _positive("model.ensemble.members", self.members)
        _choice("model.ensemble.combine", self.combine, COMBINE)
        for name, values in (("lookbacks", self.lookbacks), ("losses", self.losses)):
            if values is not None and not values:
                raise ConfigError(f"model.ensemble.{name} is empty; give at least one or null")
        for i, lb in enumerate(self.lookbacks or []):
            _positive(f"model.ensemble.lookbacks[{i}]", lb)
        for i, loss in enumerate(self.losses or []):
            _choice(f"model.ensemble.losses[{i}]", loss, LOSSES)


@dataclass
class ModelConfig:
    name: str = ""                 # label used in outputs and tracking; default "<enc>_<dec>"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: str = "mae"              # mae | mse | huber | quantile | mase | smape
    huber_delta: float = 1.0
    quantiles: list[float] = field(default_factory=list)  # non-empty with loss = quantile
    embedding: str = "none"        # none | series | group: learned id embedding (global models)
    embedding_dim: int = 8
    season: int | None = None      # the seasonality the CNN must see (e.g. 24, 168)
    require_receptive_field: bool = False  # refuse (true) or warn (false) when it does not
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def __post_init__(self) -> None:
        _choice("model.loss", self.loss, LOSSES)
        _choice("model.embedding", self.embedding, ("none", "series", "group"))
        if self.loss == "quantile" and not self.quantiles:
            raise ConfigError("model.loss = 'quantile' needs model.quantiles, e.g. [0.1, 0.5, 0.9]")
        if any(not 0 < q < 1 for q in self.quantiles):
            raise ConfigError(f"model.quantiles = {self.quantiles}: each must be in (0, 1)")
        if self.quantiles and self.loss != "quantile":
            raise ConfigError("model.quantiles is set but model.loss is not 'quantile'")
        if not self.name:
            self.name = f"{self.encoder.type}_{self.decoder.type}"
        self._check_ensemble()

    def _check_ensemble(self) -> None:
        """An ensemble packs its members: a packable architecture; quantile models combine
        quantiles, so their members all learn the quantile loss (and point models none)."""
        ens = self.ensemble
        if ens.members > 1 and (why := self.unpackable()):
            raise ConfigError(f"model.ensemble.members = {ens.members}: {why}")
        for loss in ens.losses or []:
            if (loss == "quantile") != (self.loss == "quantile"):
                raise ConfigError(f"model.ensemble.losses = {ens.losses}: with model.loss = "
                                  f"{self.loss!r} every member's loss must "
                                  f"{'be' if self.loss == 'quantile' else 'not be'} 'quantile'")

    def member_losses(self) -> list[str]:
        """The losses the model's members train on (the one `loss` without an ensemble)."""
        return list(self.ensemble.losses or [self.loss])

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
