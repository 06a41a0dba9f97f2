"""Decoders: a `Latent` (+ known-future features, context) -> forecast [B, H, Q] (DESIGN.md §5).

Two blocks, registered by name in `DECODERS`:
- `direct`: an MLP that emits all H·Q outputs at once (direct multi-horizon);
- `rnn` / `lstm` / `gru`: one autoregressive class with a `cell` argument.

Both share one call: `decoder(latent, y_last=…, xf=…, context=…, target=…)` where `y_last` [B] is
the last observed (scaled) target, `xf` [B, H, C_fut] the known future, `context` [B, C_ctx] the
static features and embedding, and `target` [B, H] the true future (teacher forcing only).
Quantile outputs pass through `NonCrossingQuantiles`, so they never cross.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import DecoderConfig
from pipeline.models.encoders import Latent, RNNState, StateSpec, make_rnn, mlp

DECODERS: dict[str, type[nn.Module]] = {}


def register_decoder(*names: str):
    """Class decorator: make a decoder buildable by `build_model` under each of `names`.

    The class needs `from_config(cfg, *, latent_size, state_spec, horizon, future_size,
    context_size, quantiles)`.
    """
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        for name in names:
            DECODERS[name] = cls
        return cls
    return add


class NonCrossingQuantiles(nn.Module):
    """Raw outputs [..., Q] -> quantiles that are non-decreasing in the quantile level.

    Channel 0 is the lowest level; each next level adds a softplus (>= 0) increment (cumulative
    sum); the channels are then put back in the order the quantiles were given. No parameters;
    with one output (a point forecast) it is the identity.
    """

    def __init__(self, quantiles: Sequence[float] = ()):
        super().__init__()
        levels = list(quantiles) or [0.5]
        self.num_outputs = len(levels)
        ranked = sorted(range(len(levels)), key=levels.__getitem__)   # rank -> given position
        unrank = [ranked.index(i) for i in range(len(levels))]        # given position -> rank
        self.reorder = unrank != sorted(unrank)                       # quantiles given unsorted
        self.register_buffer("unrank", torch.tensor(unrank), persistent=False)  # follows .to()
        self.point_index = min(range(len(levels)), key=lambda i: abs(levels[i] - 0.5))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        if self.num_outputs == 1:
            return raw
        steps = F.softplus(raw[..., 1:]).cumsum(-1)                  # [..., Q-1], >= 0
        ranked = torch.cat([raw[..., :1], raw[..., :1] + steps], -1)  # [..., Q], by level
        return ranked.index_select(-1, self.unrank) if self.reorder else ranked


# ---------------------------------------------------------------- direct (FFN)

@register_decoder("direct")
class DirectDecoder(nn.Module):
    """MLP from [latent summary, flattened xf, context] to all H steps and Q quantiles at once."""

    def __init__(self, latent_size: int, horizon: int, *, future_size: int = 0,
                 context_size: int = 0, hidden_size: int = 64, num_layers: int = 1,
                 dropout: float = 0.0, quantiles: Sequence[float] = ()):
        super().__init__()
        self.horizon, self.future_size, self.context_size = horizon, future_size, context_size
        self.head = NonCrossingQuantiles(quantiles)
        in_size = latent_size + horizon * future_size + context_size
        self.net = mlp(in_size, hidden_size, num_layers, out_size=horizon * self.head.num_outputs,
                       dropout=dropout)

    @classmethod
    def from_config(cls, cfg: DecoderConfig, *, latent_size: int, state_spec: StateSpec | None,
                    horizon: int, future_size: int, context_size: int,
                    quantiles: Sequence[float]) -> DirectDecoder:
        return cls(latent_size, horizon, future_size=future_size, context_size=context_size,
                   hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout,
                   quantiles=quantiles)

    def forward(self, latent: Latent, *, y_last: torch.Tensor | None = None,
                xf: torch.Tensor | None = None, context: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        batch = latent.summary.shape[0]
        parts = [latent.summary]
        if self.future_size:
            parts.append(xf.reshape(batch, -1))  # [B, H, C_fut] -> [B, H*C_fut]
        if self.context_size:
            parts.append(context)
        raw = self.net(torch.cat(parts, -1))
        return self.head(raw.reshape(batch, self.horizon, -1))  # [B, H*Q] -> [B, H, Q]


# ---------------------------------------------------------------- autoregressive RNN

def state_fits(spec: StateSpec | None, cell: str, num_layers: int, hidden_size: int) -> bool:
    """Whether an encoder's final state can start this decoder RNN as it is."""
    return (spec is not None and spec.directions == 1 and spec.num_layers == num_layers
            and spec.hidden_size == hidden_size and (spec.cell == "lstm") == (cell == "lstm"))


@register_decoder("rnn", "lstm", "gru")
class RNNDecoder(nn.Module):
    """Autoregressive decoder, one step at a time over the horizon.

    Step t reads [previous value, xf[:, t], context]. The previous value is the last observation
    at t = 0, then the model's own point forecast (the quantile nearest 0.5); in training, with
    probability `teacher_forcing` per sample and step, the true value from `target` instead.
    The state starts from the encoder's final state when its shape fits (`state_fits`), else
    from a linear projection of the latent summary.
    """

    def __init__(self, cell: str, latent_size: int, horizon: int, *,
                 state_spec: StateSpec | None = None, future_size: int = 0, context_size: int = 0,
                 hidden_size: int = 64, num_layers: int = 1, dropout: float = 0.0,
                 teacher_forcing: float = 0.0, quantiles: Sequence[float] = ()):
        super().__init__()
        self.cell, self.horizon, self.teacher_forcing = cell, horizon, teacher_forcing
        self.future_size, self.context_size = future_size, context_size
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.head = NonCrossingQuantiles(quantiles)
        self.rnn = make_rnn(cell, 1 + future_size + context_size, hidden_size, num_layers,
                            dropout=dropout)
        self.out = nn.Linear(hidden_size, self.head.num_outputs)
        self.init: nn.Linear | None = None
        if not state_fits(state_spec, cell, num_layers, hidden_size):
            n_states = 2 if cell == "lstm" else 1
            self.init = nn.Linear(latent_size, n_states * num_layers * hidden_size)

    @classmethod
    def from_config(cls, cfg: DecoderConfig, *, latent_size: int, state_spec: StateSpec | None,
                    horizon: int, future_size: int, context_size: int,
                    quantiles: Sequence[float]) -> RNNDecoder:
        return cls(cfg.type, latent_size, horizon, state_spec=state_spec, future_size=future_size,
                   context_size=context_size, hidden_size=cfg.hidden_size,
                   num_layers=cfg.num_layers, dropout=cfg.dropout,
                   teacher_forcing=cfg.teacher_forcing, quantiles=quantiles)

    def initial_state(self, latent: Latent) -> RNNState:
        if self.init is None:
            return latent.state
        batch = latent.summary.shape[0]
        flat = self.init(latent.summary)                         # [B, S*layers*hidden]
        states = flat.reshape(batch, -1, self.num_layers, self.hidden_size)  # -> [B, S, l, hid]
        states = states.permute(1, 2, 0, 3).contiguous()  # [B, S, l, hid] -> [S, l, B, hid]
        h = torch.tanh(states[0])
        return (h, states[1]) if self.cell == "lstm" else h

    def step_input(self, y: torch.Tensor, xf: torch.Tensor | None,
                   context: torch.Tensor | None, t: int) -> torch.Tensor:
        parts = [y]                                              # [B, 1]
        if self.future_size:
            parts.append(xf[:, t])                               # [B, C_fut]
        if self.context_size:
            parts.append(context)                                # [B, C_ctx]
        return torch.cat(parts, -1).unsqueeze(1)  # [B, 1 + C_fut + C_ctx] -> [B, 1, …]

    def feedback(self, q: torch.Tensor, target: torch.Tensor | None, t: int) -> torch.Tensor:
        """The value fed to step t + 1: [B, Q] -> [B, 1]."""
        i = self.head.point_index
        y = q[:, i:i + 1]
        if self.training and target is not None and self.teacher_forcing > 0:
            use_true = torch.rand_like(y) < self.teacher_forcing
            y = torch.where(use_true, target[:, t:t + 1], y)
        return y

    def forward(self, latent: Latent, *, y_last: torch.Tensor, xf: torch.Tensor | None = None,
                context: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        state = self.initial_state(latent)
        y = y_last.unsqueeze(-1)  # [B] -> [B, 1]
        outs = []
        for t in range(self.horizon):
            h, state = self.rnn(self.step_input(y, xf, context, t), state)  # h: [B, 1, hidden]
            q = self.head(self.out(h[:, 0]))                                 # [B, Q]
            outs.append(q)
            y = self.feedback(q, target, t)
        return torch.stack(outs, 1)  # H x [B, Q] -> [B, H, Q]
