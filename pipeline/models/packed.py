"""Packed per-group models: G models of one architecture as one module (DESIGN.md §6).

    packed = PackedModel.build(model_cfg, groups=G, lookback=L, horizon=H, past_size=C, ...)
    y_hat = packed(x, xf, static)          # [G, B, L, 1+C], [G, B, H, C_fut], [G, B, C_s]
                                           # -> [G, B, H, Q]
    # training it: pipeline.training.loop.fit (one loss per group, gradients clipped per group)
    model_g = packed.extract(g)            # an ordinary EncoderDecoder (build_model, save_model)

Every parameter is the stack of the G models' copies of one parameter: [G, *its single shape].
The CNN runs as one grouped `Conv1d(groups=G)` over G·C channels, the GRU cell and the MLPs as
batched matmuls, so hundreds of small models share one kernel launch. Group g computes exactly
what model g computes alone; with the loss a sum of per-group means, per-group gradient clipping
and an elementwise optimizer (Adam, AdamW, SGD), training the pack equals training the G models
separately on the same batches, up to float rounding.

Supported (the zoo's single models support every encoder x decoder pair):
- encoder `ffn`: every option (hidden layers, dropout, bias);
- encoder `cnn`: every option (kernel_size, dilations, stride, padding_mode zeros | replicate,
  residual with identity or 1x1 projection, dropout, bias);
- encoder `gru`: unidirectional, any num_layers, dropout between layers, bias or not;
- decoder `direct`, any hidden layers and dropout, point or quantile outputs (non-crossing);
- past / known-future / static features, and a learned embedding (idx [G, B] indexes each
  group's own table).
Refused with ValueError: encoders rnn | lstm, a bidirectional gru, decoders rnn | lstm |
gru (autoregressive), and models built with different specs (but for the loss: an ensemble's
members may learn different losses; `extract(g)` gives member g its own spec).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models.decoders import DirectDecoder
from pipeline.models.encoders import (
    CausalConvLayer,
    CNNEncoder,
    FFNEncoder,
    RNNEncoder,
    SparseLayer,
    causal_conv,
    newest_features,
)
from pipeline.models.seq2seq import EncoderDecoder, build_model, model_config_from_dict


def check_packable(model_cfg: ModelConfig) -> None:
    """Raise ValueError unless `model_cfg` names an architecture PackedModel supports
    (`ModelConfig.unpackable` says which)."""
    if why := model_cfg.unpackable():
        raise ValueError(why)


def _stack(tensors: Sequence[torch.Tensor | None]) -> nn.Parameter | None:
    """G copies of one parameter -> one parameter [G, *shape] (None when the models have none)."""
    if tensors[0] is None:
        return None
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-group x @ W^T + b: x [G, N, in], weight [G, out, in], bias [G, out] -> [G, N, out]."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class _Packed(nn.Module):
    """A packed block. `sources` maps each of its parameter names to the full name of the
    parameter it stacks in a single EncoderDecoder (what `from_models` and `extract` copy)."""

    sources: dict[str, str]

    def __init__(self) -> None:
        super().__init__()
        self.sources = {}

    def stack(self, name: str, source: str, tensors: Sequence[torch.Tensor | None]) -> None:
        self.register_parameter(name, _stack(tensors))
        if tensors[0] is not None:
            self.sources[name] = source


# ---------------------------------------------------------------- MLP (direct decoder)

class PackedLinear(_Packed):
    """G nn.Linear as one: [G, N, in] -> [G, N, out]."""

    def __init__(self, linears: Sequence[nn.Linear], source: str):
        super().__init__()
        self.stack("weight", f"{source}.weight", [m.weight for m in linears])  # [G, out, in]
        self.stack("bias", f"{source}.bias", [m.bias for m in linears])        # [G, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _affine(x, self.weight, self.bias)


def packed_mlp(nets: Sequence[nn.Sequential], source: str) -> nn.Sequential:
    """The G copies of one `mlp` Sequential -> the same Sequential with each Linear packed.

    ReLU and Dropout act elementwise, so they are kept as they are; position i of the result is
    position i of the original, hence the source names `{source}.{i}.weight`.
    """
    layers: list[nn.Module] = []
    for i, block in enumerate(nets[0]):
        if isinstance(block, nn.Linear):
            layers.append(PackedLinear([net[i] for net in nets], f"{source}.{i}"))
        elif isinstance(block, (nn.ReLU, nn.Dropout)):
            layers.append(type(block)(block.p) if isinstance(block, nn.Dropout) else nn.ReLU())
        else:
            raise ValueError(f"cannot pack MLP block {type(block).__name__}")
    return nn.Sequential(*layers)


class PackedDirectDecoder(nn.Module):
    """G DirectDecoders: [latent summary, flat xf, context] -> MLP -> non-crossing head."""

    def __init__(self, decoders: Sequence[DirectDecoder], source: str = "decoder"):
        super().__init__()
        first = decoders[0]
        self.horizon, self.future_size = first.horizon, first.future_size
        self.context_size = first.context_size
        self.head = copy.deepcopy(first.head)  # no parameters; acts on the last dim
        self.net = packed_mlp([d.net for d in decoders], f"{source}.net")

    def forward(self, summary: torch.Tensor, xf: torch.Tensor | None,
                context: torch.Tensor | None) -> torch.Tensor:
        groups, batch = summary.shape[:2]
        parts = [summary]
        if self.future_size:
            parts.append(xf.reshape(groups, batch, -1))  # [G, B, H, C_fut] -> [G, B, H*C_fut]
        if self.context_size:
            parts.append(context)
        raw = self.net(torch.cat(parts, -1))              # [G, B, H*Q]
        return self.head(raw.reshape(groups, batch, self.horizon, -1))  # -> [G, B, H, Q]


# ---------------------------------------------------------------- FFN

class PackedFFNEncoder(nn.Module):
    """G FFNEncoders: x [G, B, L, C] -> the MLP over each flattened window [G, B, hidden]."""

    def __init__(self, encoders: Sequence[FFNEncoder], source: str = "encoder"):
        super().__init__()
        self.input_size, self.lookback = encoders[0].input_size, encoders[0].lookback
        self.net = packed_mlp([e.net for e in encoders], f"{source}.net")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != self.lookback:
            raise ValueError(f"the ffn encoder was built for lookback {self.lookback}, "
                             f"got a window of {x.shape[2]} steps")
        return self.net(x.reshape(x.shape[0], x.shape[1], -1))  # [G, B, L*C] -> [G, B, hidden]


# ---------------------------------------------------------------- causal CNN

class PackedConvLayer(SparseLayer, _Packed):
    """G CausalConvLayers as one grouped Conv1d over G·C channels (group-major channels).

    Same steps as CausalConvLayer: pad (or crop) the oldest side, dilated strided conv, ReLU,
    dropout, plus the newest input under each kernel position (1x1-projected per group when the
    channel count changes).
    """

    def __init__(self, layers: Sequence[CausalConvLayer], source: str):
        super().__init__()
        conv = layers[0].conv
        (self.kernel_size,), (self.dilation,) = conv.kernel_size, conv.dilation
        (self.stride,) = conv.stride
        self.pad_mode, self.drop = layers[0].pad_mode, nn.Dropout(layers[0].drop.p)
        self.residual = layers[0].skip is not None
        self.stack("weight", f"{source}.conv.weight", [m.conv.weight for m in layers])
        self.stack("bias", f"{source}.conv.bias", [m.conv.bias for m in layers])
        projects = isinstance(layers[0].skip, nn.Conv1d)
        self.stack("skip_weight", f"{source}.skip.weight",
                   [m.skip.weight if projects else None for m in layers])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, G*C_in, T] -> [B, G*C_out, ceil(T / stride)]."""
        k, d, s = self.kernel_size, self.dilation, self.stride
        return causal_conv(h, self._conv(s, d), k, d, s, self.pad_mode, self.drop, self._skip())

    def _conv(self, stride: int, dilation: int) -> Callable[[torch.Tensor], torch.Tensor]:
        groups, c_out = self.weight.shape[:2]
        # [G, C_out, C_in, k] -> [G*C_out, C_in, k]: Conv1d's layout for groups=G
        weight = self.weight.reshape(groups * c_out, -1, self.kernel_size)
        bias = None if self.bias is None else self.bias.reshape(-1)  # [G, C_out] -> [G*C_out]
        return lambda padded: F.conv1d(padded, weight, bias, stride=stride, dilation=dilation,
                                       groups=groups)

    def _skip(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The residual: the newest input under each kernel position, 1x1-projected per group
        when the channel count changes."""
        if self.skip_weight is not None:
            groups, c_out = self.skip_weight.shape[:2]
            # [G, C_out, C_in, 1] -> [G*C_out, C_in, 1]
            proj = self.skip_weight.reshape(groups * c_out, -1, 1)
            return lambda newest: F.conv1d(newest, proj, groups=groups)
        return nn.Identity() if self.residual else None


class PackedCNNEncoder(nn.Module):
    """G CNNEncoders: x [G, B, L, C] -> the features at the newest step [G, B, hidden]."""

    def __init__(self, encoders: Sequence[CNNEncoder], source: str = "encoder"):
        super().__init__()
        self.input_size = encoders[0].input_size
        self.layers = nn.ModuleList(
            PackedConvLayer([e.layers[i] for e in encoders], f"{source}.layers.{i}")
            for i in range(len(encoders[0].layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups, batch, length, channels = x.shape
        # [G, B, L, C] -> [B, G, C, L] -> [B, G*C, L]: channel g*C + c is group g's channel c
        h = x.permute(1, 0, 3, 2).reshape(batch, groups * channels, length)
        newest = newest_features(h, self.layers).reshape(batch, groups, -1)  # -> [B, G, hidden]
        return newest.transpose(0, 1)                    # [B, G, hidden] -> [G, B, hidden]


# ---------------------------------------------------------------- GRU

class PackedGRULayer(_Packed):
    """Layer `layer` of G nn.GRUs; weights stacked as torch stores them, gates (r, z, n)."""

    def __init__(self, grus: Sequence[nn.GRU], layer: int, source: str):
        super().__init__()
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):  # [G, 3H, I|H] or [G, 3H]
            name = f"{kind}_l{layer}"
            self.stack(kind, f"{source}.{name}", [getattr(g, name, None) for g in grus])

    def forward(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq [G, B, L, I] -> (outputs [G, B, L, H], final state [G, B, H]); h_0 = 0."""
        groups, batch, length, _ = seq.shape
        # input projections of every step at once: [G, B, L, I] -> [G, B*L, I] -> [G, B*L, 3H]
        gates_x = _affine(seq.reshape(groups, batch * length, -1), self.weight_ih, self.bias_ih)
        gates_x = gates_x.reshape(groups, batch, length, -1)  # [G, B*L, 3H] -> [G, B, L, 3H]
        # one unbind, not L selects: each select's backward fills a zero tensor of gates_x's
        # whole size (quadratic in L: minutes per step on a CPU at L = 168)
        steps = gates_x.unbind(2)                            # L x [G, B, 3H]
        h = seq.new_zeros(groups, batch, self.weight_hh.shape[-1])
        outputs = []
        for t in range(length):
            x_r, x_z, x_n = steps[t].chunk(3, -1)
            h_r, h_z, h_n = _affine(h, self.weight_hh, self.bias_hh).chunk(3, -1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h = n + z * (h - n)                              # (1 - z) * n + z * h
            outputs.append(h)
        return torch.stack(outputs, 2), h                    # L x [G, B, H] -> [G, B, L, H]


class PackedGRUEncoder(nn.Module):
    """G unidirectional GRU encoders; the latent is h_n of every layer, concatenated."""

    def __init__(self, encoders: Sequence[RNNEncoder], source: str = "encoder"):
        super().__init__()
        gru = encoders[0].rnn
        self.input_size = encoders[0].input_size
        self.drop = nn.Dropout(gru.dropout)  # between layers, as nn.GRU applies it
        self.layers = nn.ModuleList(
            PackedGRULayer([e.rnn for e in encoders], i, f"{source}.rnn")
            for i in range(gru.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [G, B, L, I] -> [G, B, num_layers * hidden] (layer 0 first, as RNNEncoder)."""
        finals, seq = [], x
        for i, layer in enumerate(self.layers):
            if i:
                seq = self.drop(seq)
            seq, h = layer(seq)
            finals.append(h)
        return torch.cat(finals, -1)  # layers x [G, B, H] -> [G, B, layers*H]


# ---------------------------------------------------------------- the packed model

class PackedEmbedding(_Packed):
    """G nn.Embedding tables [G, N, E]; idx [G, B] indexes each group's own table."""

    def __init__(self, embeddings: Sequence[nn.Embedding], source: str = "embedding"):
        super().__init__()
        self.stack("weight", f"{source}.weight", [e.weight for e in embeddings])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)  # [G, 1]
        return self.weight[rows, idx]  # [G, N, E] at ([G, 1], [G, B]) -> [G, B, E]


class PackedModel(nn.Module):
    """G EncoderDecoders of one spec as one module; see the module docstring for what packs.

    Build it with `from_models(models)` (copies their weights) or `build(model_cfg, groups=G,
    **build_model_kwargs)` (G fresh models, initialised as G calls of build_model would be).
    `spec` is the single models' build_model spec; `extract(g)` rebuilds model g from it.
    """

    def __init__(self, models: Sequence[EncoderDecoder]):
        super().__init__()
        first = _check_models(models)
        self.groups, self.spec, self.static_size = len(models), first.spec, first.static_size
        self.specs = [m.spec for m in models]   # each member's own (its loss may differ)
        if isinstance(first.encoder, CNNEncoder):
            self.encoder = PackedCNNEncoder([m.encoder for m in models])
        elif isinstance(first.encoder, FFNEncoder):
            self.encoder = PackedFFNEncoder([m.encoder for m in models])
        else:
            self.encoder = PackedGRUEncoder([m.encoder for m in models])
        self.decoder = PackedDirectDecoder([m.decoder for m in models])
        self.embedding = None
        if first.embedding is not None:
            self.embedding = PackedEmbedding([m.embedding for m in models])
        self.sources = {f"{prefix}.{name}" if prefix else name: source
                        for prefix, block in self.named_modules() if isinstance(block, _Packed)
                        for name, source in block.sources.items()}
        missing = set(first.state_dict()) - set(self.sources.values())
        if missing:  # a block of the single model that this file does not know how to pack
            raise ValueError(f"cannot pack parameters {sorted(missing)}")

    @classmethod
    def from_models(cls, models: Sequence[EncoderDecoder]) -> PackedModel:
        """Pack G models built by build_model with the same spec; their weights are copied."""
        return cls(models)

    @classmethod
    def build(cls, model_cfg: ModelConfig, *, groups: int, **build_kwargs) -> PackedModel:
        """G fresh models of `model_cfg`, packed; build_kwargs are build_model's (lookback, …)."""
        check_packable(model_cfg)
        if groups < 1:
            raise ValueError(f"groups = {groups} must be >= 1")
        return cls([build_model(model_cfg, **build_kwargs) for _ in range(groups)])

    def forward(self, x: torch.Tensor, xf: torch.Tensor | None = None,
                static: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """x [G, B, L, 1+C_past], xf [G, B, H, C_fut], static [G, B, C_s], idx [G, B] ->
        [G, B, H, Q]. `target` is accepted for EncoderDecoder's call and ignored (the direct
        decoder has no teacher forcing)."""
        self.check_inputs(x, xf, static, idx)
        parts = [static] if self.static_size else []
        if self.embedding is not None:
            parts.append(self.embedding(idx))
        context = torch.cat(parts, -1) if parts else None  # [G, B, C_s + E]
        return self.decoder(self.encoder(x), xf, context)

    def check_inputs(self, x: torch.Tensor, xf: torch.Tensor | None,
                     static: torch.Tensor | None, idx: torch.Tensor | None) -> None:
        """Clear errors for inputs without the group dimension or with the wrong widths."""
        g, past = self.groups, self.encoder.input_size - 1
        if x.dim() != 4 or x.shape[0] != g or x.shape[-1] != 1 + past:
            raise ValueError(f"x must be [G, B, L, 1 + past_size] with G = {g}, past_size = "
                             f"{past}; got {tuple(x.shape)}")
        for name, t, dim, width in (("xf", xf, 4, self.decoder.future_size),
                                    ("static", static, 3, self.static_size)):
            if (0 if t is None else t.shape[-1]) != width or (
                    width and (t.dim() != dim or t.shape[0] != g)):
                raise ValueError(f"{name} must have {dim} dims, G = {g} first and {width} "
                                 f"features last; got {None if t is None else tuple(t.shape)}")
        if self.embedding is not None and (idx is None or idx.dim() != 2 or idx.shape[0] != g):
            raise ValueError(f"this model has a learned embedding: pass idx [G = {g}, B]")

    def extract(self, group: int) -> EncoderDecoder:
        """Group `group` as an ordinary EncoderDecoder: build_model(spec), its weights copied,
        on this model's device and dtype and in its train/eval mode."""
        if not 0 <= group < self.groups:
            raise IndexError(f"group {group} is out of range for {self.groups} groups")
        spec = dict(self.specs[group])
        model = build_model(model_config_from_dict(spec.pop("model")), **spec)
        weight = next(self.parameters())
        model.to(device=weight.device, dtype=weight.dtype)
        params = dict(self.named_parameters())
        model.load_state_dict({src: params[name][group].detach().clone()
                               for name, src in self.sources.items()})
        return model.train(self.training)


def _check_models(models: Sequence[EncoderDecoder]) -> EncoderDecoder:
    """The first model, after checking that all were built by build_model with one packable
    spec."""
    if not models:
        raise ValueError("PackedModel needs at least one model")
    first = models[0]
    if first.spec is None:
        raise ValueError("PackedModel needs models built by build_model (they carry a spec)")
    check_packable(model_config_from_dict(first.spec["model"]))
    for g, model in enumerate(models):
        if _architecture(model.spec) != _architecture(first.spec):
            raise ValueError(f"model {g} was built with a different spec than model 0: packed "
                             "models share one architecture and sizes")
    return first


def _architecture(spec: dict) -> dict:
    """A spec without what only training uses (the loss): members of an ensemble that learn
    different losses pack together."""
    model = {k: v for k, v in spec["model"].items() if k not in ("loss", "huber_delta")}
    return {**spec, "model": model}
