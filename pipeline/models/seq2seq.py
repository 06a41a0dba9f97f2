"""EncoderDecoder: encoder + decoder + optional id embedding; build, save and load by spec.

Tensor contract (the data loader produces exactly this):
    x       [B, L, 1 + C_past]  channel 0 the scaled past target, then past-known features
    xf      [B, H, C_fut]       known-future features over the horizon, or None when C_fut = 0
    static  [B, C_s]            static features, or None when C_s = 0
    idx     [B] long            embedding index (series or group) when model.embedding != none
    target  [B, H]              scaled true future; only used for teacher forcing in training
    ->      [B, H, Q]           Q = len(model.quantiles) or 1

`build_model` records its arguments in `model.spec` (the model section without its ensemble,
which is a property of the job, not of one model); `pipeline.models.save_model` stores spec +
state_dict and `load_model` rebuilds the same model from the file alone
(`pipeline.models.ensemble`, which also saves and loads ensembles).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from pipeline.config import DecoderConfig, EncoderConfig, ModelConfig
from pipeline.config.model import EnsembleConfig
from pipeline.models.decoders import DECODERS
from pipeline.models.encoders import ENCODERS


class EncoderDecoder(nn.Module):
    """h(x) -> latent -> g(latent, xf, context) -> [B, H, Q]; context = [static, embedding(idx)]."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, *, static_size: int = 0,
                 num_embeddings: int = 0, embedding_dim: int = 0, spec: dict | None = None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.static_size = static_size
        self.embedding = nn.Embedding(num_embeddings, embedding_dim) if num_embeddings else None
        self.spec = spec  # build_model's arguments; what save_model stores beside the weights

    def forward(self, x: torch.Tensor, xf: torch.Tensor | None = None,
                static: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(x, xf, static, idx)
        latent = self.encoder(x)
        return self.decoder(latent, y_last=x[:, -1, 0], xf=xf, context=self.context(static, idx),
                            target=target)

    def context(self, static: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor | None:
        """[static, embedding(idx)] -> [B, C_s + E], or None when the model uses neither."""
        parts = []
        if self.static_size:
            parts.append(static)
        if self.embedding is not None:
            parts.append(self.embedding(idx))  # [B] -> [B, E]
        return torch.cat(parts, -1) if parts else None

    def check_inputs(self, x: torch.Tensor, xf: torch.Tensor | None,
                     static: torch.Tensor | None, idx: torch.Tensor | None) -> None:
        """Clear errors for inputs that do not match the sizes the model was built with."""
        def width(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.shape[-1]
        past = x.shape[-1] - 1 if x.dim() == 3 else None
        if past != self.encoder.input_size - 1:
            raise ValueError(f"x must be [B, L, 1 + past_size] with past_size = "
                             f"{self.encoder.input_size - 1}; got {tuple(x.shape)}")
        if width(xf) != self.decoder.future_size:
            raise ValueError(f"xf must be [B, H, {self.decoder.future_size}] (future_size); got "
                             f"{None if xf is None else tuple(xf.shape)}")
        if width(static) != self.static_size:
            raise ValueError(f"static must have {self.static_size} features (static_size); got "
                             f"{None if static is None else tuple(static.shape)}")
        if self.embedding is not None and idx is None:
            raise ValueError("this model has a learned embedding: pass idx [B]")


def build_model(model_cfg: ModelConfig, *, lookback: int, horizon: int, past_size: int,
                future_size: int, static_size: int = 0, num_embeddings: int = 0) -> EncoderDecoder:
    """Build the encoder x decoder pair `model_cfg` names.

    past_size = C_past (x has 1 + past_size channels), future_size = C_fut, static_size = C_s;
    num_embeddings (series or groups) is needed when model_cfg.embedding != "none".
    """
    if model_cfg.embedding != "none" and num_embeddings <= 0:
        raise ValueError(f"model.embedding = {model_cfg.embedding!r} needs num_embeddings > 0")
    embedding_dim = model_cfg.embedding_dim if model_cfg.embedding != "none" else 0
    encoder = _lookup(ENCODERS, "encoder", model_cfg.encoder.type).from_config(
        model_cfg.encoder, input_size=1 + past_size, lookback=lookback)
    decoder = _lookup(DECODERS, "decoder", model_cfg.decoder.type).from_config(
        model_cfg.decoder, latent_size=encoder.latent_size, state_spec=encoder.state_spec,
        horizon=horizon, future_size=future_size, context_size=static_size + embedding_dim,
        quantiles=model_cfg.quantiles)
    model_dict = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k != "ensemble"}
    spec = dict(model=model_dict, lookback=lookback, horizon=horizon,
                past_size=past_size, future_size=future_size, static_size=static_size,
                num_embeddings=num_embeddings)
    return EncoderDecoder(encoder, decoder, static_size=static_size,
                          num_embeddings=num_embeddings if embedding_dim else 0,
                          embedding_dim=embedding_dim, spec=spec)


def _lookup(registry: dict[str, type[nn.Module]], kind: str, name: str) -> type[nn.Module]:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(registry))}")
    return registry[name]


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Inverse of dataclasses.asdict for a ModelConfig (as stored in a spec, where the ensemble
    section is left out)."""
    extra = {"ensemble": EnsembleConfig(**raw["ensemble"])} if "ensemble" in raw else {}
    return ModelConfig(**{**raw, "encoder": EncoderConfig(**raw["encoder"]),
                          "decoder": DecoderConfig(**raw["decoder"]), **extra})


def from_spec(spec: dict, state_dict: dict | None = None) -> EncoderDecoder:
    """The model `build_model(**spec)` builds, with `state_dict` loaded when given: then the
    spec is checked first (`check_spec`), before anything is allocated."""
    spec = dict(spec)
    cfg = model_config_from_dict(spec.pop("model"))
    if state_dict is not None:
        check_spec(cfg, spec, state_dict)
    model = build_model(cfg, **spec)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


# a model file's sizes, checked before its model is built: [0, high] per key
SIZE_BOUNDS = {"hidden_size": 65_536, "num_layers": 1_000, "kernel_size": 10_000,
               "embedding_dim": 65_536, "lookback": 10_000_000, "horizon": 100_000,
               "past_size": 100_000, "future_size": 100_000, "static_size": 100_000,
               "num_embeddings": 10_000_000}


def _sizes(d: dict, where: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _sizes(v, f"{where}{k}.")
        elif k in SIZE_BOUNDS:
            out.append((f"{where}{k}", v))
    return out


class SpecError(ValueError):
    """A model file whose spec is out of bounds or not its weights'."""


def check_spec(cfg: ModelConfig, spec: dict, state_dict: dict) -> None:
    """Refuse (SpecError) a spec with a size out of `SIZE_BOUNDS`, or whose model is not the
    one `state_dict` holds: it is built on the meta device (shapes, no memory) and its
    parameter and buffer shapes compared, so a small file asking for a huge model allocates
    nothing."""
    for key, value in _sizes({"model": dataclasses.asdict(cfg), **spec}):
        high = SIZE_BOUNDS[key.rsplit(".", 1)[-1]]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise SpecError(f"spec {key} = {value!r} is out of bounds [0, {high:,}]")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(cfg, **spec).state_dict().items()}
    held = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    if shapes != held:
        wrong = sorted(set(shapes.items()) ^ set(held.items()))[:2]
        raise SpecError(f"spec and weights disagree ({len(shapes)} tensors wanted, "
                         f"{len(held)} held; e.g. {wrong})")
