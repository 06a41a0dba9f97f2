"""Encoders: the history window x [B, L, 1 + C_past] -> a `Latent` (DESIGN.md §5).

Three blocks, registered by name in `ENCODERS`:
- `ffn`: an MLP over the flattened window;
- `rnn` / `lstm` / `gru`: one class with a `cell` argument;
- `cnn`: a stack of causal dilated 1-D convolutions, padded on the left only.

Every encoder returns a `Latent`: a summary vector [B, D] that any decoder can read, plus the
recurrent state where there is one, so an RNN decoder can start from it. Every encoder also
exposes `latent_size` (D) and `state_spec` (the state's shape, or None).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import EncoderConfig, receptive_field

RNNState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class StateSpec(NamedTuple):
    """Shape of an RNN's final state: h is [num_layers * directions, B, hidden_size]."""

    cell: str                # rnn | lstm | gru (an LSTM state is the pair (h, c))
    num_layers: int
    directions: int
    hidden_size: int


class Latent(NamedTuple):
    """What an encoder hands to a decoder."""

    summary: torch.Tensor             # [B, latent_size]
    state: RNNState | None = None     # the RNN's final state (h or (h, c)); None for ffn / cnn


ENCODERS: dict[str, type[nn.Module]] = {}


def register_encoder(*names: str):
    """Class decorator: make an encoder buildable by `build_model` under each of `names`.

    The class needs `from_config(cfg, *, input_size, lookback)`, `latent_size` and `state_spec`.
    """
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        for name in names:
            ENCODERS[name] = cls
        return cls
    return add


def mlp(in_size: int, hidden_size: int, num_layers: int, *, out_size: int | None = None,
        dropout: float = 0.0, bias: bool = True) -> nn.Sequential:
    """`num_layers` hidden blocks Linear -> ReLU (-> Dropout), then a Linear to `out_size`."""
    layers: list[nn.Module] = []
    size = in_size
    for _ in range(num_layers):
        layers += [nn.Linear(size, hidden_size, bias=bias), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        size = hidden_size
    if out_size is not None:
        layers.append(nn.Linear(size, out_size))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- FFN

@register_encoder("ffn")
class FFNEncoder(nn.Module):
    """MLP over the flattened window: the whole lookback (target and covariates) at once."""

    state_spec = None

    def __init__(self, input_size: int, lookback: int, *, hidden_size: int = 64,
                 num_layers: int = 2, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.input_size, self.lookback = input_size, lookback
        self.latent_size = hidden_size if num_layers else input_size * lookback
        self.net = mlp(input_size * lookback, hidden_size, num_layers, dropout=dropout, bias=bias)

    @classmethod
    def from_config(cls, cfg: EncoderConfig, *, input_size: int, lookback: int) -> FFNEncoder:
        return cls(input_size, lookback, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                   dropout=cfg.dropout, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> Latent:
        if x.shape[1] != self.lookback:
            raise ValueError(f"the ffn encoder was built for lookback {self.lookback}, "
                             f"got a window of {x.shape[1]} steps")
        flat = x.reshape(x.shape[0], -1)  # [B, L, C] -> [B, L*C]
        return Latent(self.net(flat))


# ---------------------------------------------------------------- RNN / LSTM / GRU

RNN_CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def make_rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1, *,
             dropout: float = 0.0, bias: bool = True, bidirectional: bool = False,
             nonlinearity: str = "tanh") -> nn.RNNBase:
    """torch.nn.RNN / LSTM / GRU, batch_first; dropout only applies between stacked layers."""
    kwargs = dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                  bias=bias, batch_first=True, bidirectional=bidirectional,
                  dropout=dropout if num_layers > 1 else 0.0)
    if cell == "rnn":
        kwargs["nonlinearity"] = nonlinearity
    return RNN_CELLS[cell](**kwargs)


@register_encoder("rnn", "lstm", "gru")
class RNNEncoder(nn.Module):
    """Recurrent encoder; the latent is the final hidden state of every layer (and direction).

    `summary` is h_n of all layers flattened; `state` is h_n itself, or (h_n, c_n) for an LSTM.
    """

    def __init__(self, cell: str, input_size: int, *, hidden_size: int = 64, num_layers: int = 1,
                 dropout: float = 0.0, bidirectional: bool = False, nonlinearity: str = "tanh",
                 bias: bool = True):
        super().__init__()
        self.input_size = input_size
        self.rnn = make_rnn(cell, input_size, hidden_size, num_layers, dropout=dropout, bias=bias,
                            bidirectional=bidirectional, nonlinearity=nonlinearity)
        directions = 2 if bidirectional else 1
        self.state_spec = StateSpec(cell, num_layers, directions, hidden_size)
        self.latent_size = num_layers * directions * hidden_size

    @classmethod
    def from_config(cls, cfg: EncoderConfig, *, input_size: int, lookback: int) -> RNNEncoder:
        return cls(cfg.type, input_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                   dropout=cfg.dropout, bidirectional=cfg.bidirectional,
                   nonlinearity=cfg.nonlinearity, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> Latent:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state         # [layers*dirs, B, hidden]
        summary = h.transpose(0, 1).reshape(x.shape[0], -1)  # [layers*dirs, B, hid] -> [B, l*d*hid]
        return Latent(summary, state)


# ---------------------------------------------------------------- causal CNN

def conv_output_length(length: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                       pad_left: int = 0, pad_right: int = 0) -> int:
    """The chapter's formula: O = floor((L + p_l + p_r - d(k-1) - 1) / s) + 1."""
    return (length + pad_left + pad_right - dilation * (kernel_size - 1) - 1) // stride + 1


def causal_left_padding(length: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Left padding that ends the last kernel position exactly on the last input step.

    With stride 1 that is d(k-1): the first output sees only the past. With stride s the outputs
    sit on steps L-1, L-1-s, …, down to (L-1) mod s, so the latest observation is never skipped;
    the padding is d(k-1) - (L-1) mod s. A negative value means: crop that many oldest steps,
    which no output sees. The output length is then ceil(L / s).
    """
    return dilation * (kernel_size - 1) - (length - 1) % stride


class SparseLayer:
    """What `newest_features` asks of a causal conv layer (the single's and the packed one's):
    `sparse`, the layer on a progression of steps, and whether it may (`sparse_ok`). The layer
    gives `_conv(stride, dilation)`, `_skip()`, kernel_size, stride, pad_mode and drop."""

    def sparse(self, h: torch.Tensor, dilation: int, stride: int, n_out: int) -> torch.Tensor:
        return sparse_conv(h, self._conv(stride, dilation), self.kernel_size, dilation, stride,
                           n_out, self.drop, self._skip())

    @property
    def sparse_ok(self) -> bool:
        return sparse_ok(self.stride, self.pad_mode, self.drop)


class CausalConvLayer(SparseLayer, nn.Module):
    """F.pad on the left, dilated Conv1d, ReLU, dropout, and an optional residual connection.

    Output j sits on the input step under the kernel's newest tap, so no output sees a step
    after its own. The residual adds that newest input (1x1-projected when channels differ).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int, *,
                 stride: int = 1, padding_mode: str = "zeros", residual: bool = True,
                 dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                              dilation=dilation, bias=bias)
        self.pad_mode = {"zeros": "constant", "replicate": "replicate"}[padding_mode]
        self.drop = nn.Dropout(dropout)
        self.skip: nn.Module | None = None
        if residual:
            same = in_channels == out_channels
            self.skip = nn.Identity() if same else nn.Conv1d(in_channels, out_channels, 1,
                                                               bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        (k,), (d,), (s,) = self.conv.kernel_size, self.conv.dilation, self.conv.stride
        return causal_conv(h, self.conv, k, d, s, self.pad_mode, self.drop, self.skip)

    def _conv(self, stride: int, dilation: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda padded: F.conv1d(padded, self.conv.weight, self.conv.bias, stride=stride,
                                       dilation=dilation)

    def _skip(self) -> nn.Module | None:
        return self.skip

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    @property
    def dilation(self) -> int:
        return self.conv.dilation[0]

    @property
    def stride(self) -> int:
        return self.conv.stride[0]


def causal_conv(h: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor], k: int, d: int,
                s: int, pad_mode: str, drop: nn.Module,
                skip: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """A causal layer's steps on h [B, C, T] -> [B, C_out, ceil(T / s)]: pad the oldest side
    (or crop it), `conv` (kernel k, dilation d, stride s), ReLU, dropout, plus `skip` of the
    newest input under each kernel position. The single and the packed CNN both run this."""
    pad = causal_left_padding(h.shape[-1], k, s, d)
    # [B, C, T] -> [B, C, T + pad]: pad the oldest side, or crop it when pad < 0
    padded = F.pad(h, (pad, 0), mode=pad_mode) if pad >= 0 else h[..., -pad:]
    out = drop(torch.relu(conv(padded)))
    if skip is not None:
        out = out + skip(padded[..., d * (k - 1)::s])   # newest tap of each kernel position
    return out


def sparse_ok(stride: int, pad_mode: str, drop: nn.Module) -> bool:
    """Whether a layer may be evaluated on a progression of steps: stride 1, zero padding (the
    steps before the window are zeros at every layer) and no dropout drawing random numbers."""
    return stride == 1 and pad_mode == "constant" and (drop.p == 0 or not drop.training)


def sparse_plan(length: int, kernels: Sequence[int], dilations: Sequence[int]
                ) -> list[tuple[int, int, int]]:
    """(dilation, stride, outputs) per layer, in units of the layer's input progression, for
    the stack's output at the newest step alone.

    That output reads layer j's outputs only at steps newest − Σ_{i>j} t_i·d_i (t_i < k_i),
    all on the progression of step g_j = gcd(d_{j+1}, …) and within the reach
    Σ_{i>j} (k_i − 1)·d_i; layer j computes just those (dilations 1, 2, 4, …: g_j = 2·d_j,
    so each layer evaluates half the steps of the one below, about L·(1 + 1/2 + …)/L_layers
    of the full stack's work). Steps before the window stay zeros, as in the full stack."""
    plan, step = [], 1                       # `step`: the input progression's, in window steps
    for j, d in enumerate(dilations):
        above = dilations[j + 1:]
        if not above:                        # the last layer: the newest step alone
            plan.append((d // step, 1, 1))
            break
        out_step = math.gcd(*above)
        reach = sum((k - 1) * a for k, a in zip(kernels[j + 1:], above, strict=True))
        n_out = min(reach, length - 1) // out_step + 1
        plan.append((d // step, out_step // step, n_out))
        step = out_step
    return plan


def sparse_conv(h: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor], k: int,
                dilation: int, stride: int, n_out: int, drop: nn.Module,
                skip: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """causal_conv on h [B, C, n], a progression of steps (newest last): n_out outputs at
    `stride` entries apart (newest last), taps `dilation` entries apart; entries before h's
    oldest are zeros. -> [B, C_out, n_out]."""
    need = (n_out - 1) * stride + (k - 1) * dilation + 1
    n = h.shape[-1]
    # [B, C, n] -> [B, C, need]: zeros before the oldest entry, or crop what no output reads
    padded = F.pad(h, (need - n, 0)) if need > n else h[..., n - need:]
    out = drop(torch.relu(conv(padded)))
    if skip is not None:
        out = out + skip(padded[..., dilation * (k - 1)::stride])  # each output's newest tap
    return out


def newest_features(h: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor:
    """A causal conv stack's output at the newest step, h [B, C, L] -> [B, C_out].

    Computes only the steps that output reads (`sparse_plan`) when every layer allows it
    (`sparse_ok`), else the whole stack; the same values either way up to float rounding."""
    if not all(layer.sparse_ok for layer in layers):
        for layer in layers:
            h = layer(h)
        return h[..., -1]
    plan = sparse_plan(h.shape[-1], [layer.kernel_size for layer in layers],
                       [layer.dilation for layer in layers])
    for layer, (dilation, stride, n_out) in zip(layers, plan, strict=True):
        h = layer.sparse(h, dilation, stride, n_out)
    return h[..., -1]


@register_encoder("cnn")
class CNNEncoder(nn.Module):
    """Causal dilated CNN; the latent is the feature vector at the newest time step."""

    state_spec = None

    def __init__(self, input_size: int, *, hidden_size: int = 64, kernel_size: int = 3,
                 dilations: Sequence[int] = (1, 2), stride: int = 1, padding_mode: str = "zeros",
                 residual: bool = True, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.input_size = input_size
        self.latent_size = hidden_size
        self.layers = nn.ModuleList(
            CausalConvLayer(input_size if i == 0 else hidden_size, hidden_size, kernel_size, d,
                            stride=stride, padding_mode=padding_mode, residual=residual,
                            dropout=dropout, bias=bias)
            for i, d in enumerate(dilations))

    @classmethod
    def from_config(cls, cfg: EncoderConfig, *, input_size: int, lookback: int) -> CNNEncoder:
        return cls(input_size, hidden_size=cfg.hidden_size, kernel_size=cfg.kernel_size,
                   dilations=cfg.layer_dilations, stride=cfg.stride,
                   padding_mode=cfg.padding_mode, residual=cfg.residual, dropout=cfg.dropout,
                   bias=cfg.bias)

    @property
    def receptive_field(self) -> int:
        """Input steps one output sees, from the built layers (`config.receptive_field`)."""
        convs = [layer.conv for layer in self.layers]
        return receptive_field([c.kernel_size[0] for c in convs], [c.dilation[0] for c in convs],
                               [c.stride[0] for c in convs])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, hidden, ceil(L / S)] with S the total stride; the last is step L-1."""
        h = x.transpose(1, 2)  # [B, L, C] -> [B, C, L]
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor) -> Latent:
        # [B, L, C] -> [B, C, L] -> the features at the newest step [B, hidden]
        return Latent(newest_features(x.transpose(1, 2), self.layers))
