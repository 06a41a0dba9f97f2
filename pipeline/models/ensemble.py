"""Ensembles: `model.ensemble.members` models of one architecture, trained packed, forecasting
together; and the model file (`save_model` / `load_model`) for single models and ensembles.

    members = ensemble_members(cfg)      # Member(index, lookback, loss, seed) each
    cfg_i = member_config(cfg, members[i])
    ens = Ensemble([model_0, …, model_M-1], combine="median")
    save_model(ens, "model.pt"); ens = load_model("model.pt")

Member i reads `lookbacks[i % n_l]` horizons, learns loss `losses[(i // n_l) % n_loss]` and is
initialised and sampled with seed train.seed + i, so member 0 is the plain model. Members with
one lookback train as one `PackedModel` (`pipeline.training.jobs.run_pack`). An ensemble forecasts
with each member on its own windows (its lookback, ending at the same origin) in original units and
combines them per series, step and quantile: the median or the mean over the members that can
forecast the series (`pipeline.forecasting.predict.predict_job`).

The file is read with `torch.load(weights_only=True)`: format 1 is one model
`{"format": 1, "spec", "state_dict"}`, format 2 an ensemble
`{"format": 2, "ensemble": [{"spec", "state_dict"}, …], "combine"}`.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.config.model import layers_to_cover
from pipeline.models.seq2seq import EncoderDecoder, from_spec


@dataclass(frozen=True)
class Member:
    index: int
    lookback: int       # steps
    loss: str
    seed: int


def ensemble_members(cfg: Config) -> list[Member]:
    """Every member of the config's model (one, member 0, without an ensemble)."""
    ens = cfg.model.ensemble
    horizon = cfg.windows.horizon
    lookbacks = [n * horizon for n in ens.lookbacks] if ens.lookbacks else [cfg.windows.lookback]
    losses = ens.losses or [cfg.model.loss]
    return [Member(i, lookbacks[i % len(lookbacks)],
                   losses[(i // len(lookbacks)) % len(losses)], cfg.train.seed + i)
            for i in range(ens.members)]


def lookback_packs(members: Sequence[Member]) -> list[list[Member]]:
    """The members trained together: one pack per lookback, in the order lookbacks appear."""
    packs: dict[int, list[Member]] = {}
    for m in members:
        packs.setdefault(m.lookback, []).append(m)
    return list(packs.values())


def member_config(cfg: Config, member: Member) -> Config:
    """The config member `member` trains with alone (`cfg` itself for the plain model). A
    causal CNN of base dilations keeps only the layers its shorter lookback needs (its
    receptive field still covers the member's lookback)."""
    out = cfg
    if member.lookback != cfg.windows.lookback:
        model, enc = cfg.model, cfg.model.encoder
        if enc.type == "cnn" and enc.dilations is None and enc.stride == 1:
            layers = layers_to_cover(member.lookback, enc.kernel_size, enc.dilation_base)
            if layers < enc.num_layers:
                model = dataclasses.replace(model, encoder=dataclasses.replace(
                    enc, num_layers=layers))
        out = dataclasses.replace(out, model=model, windows=dataclasses.replace(
            out.windows, lookback=member.lookback, lookback_horizons=None))
    if member.loss != cfg.model.loss:
        out = dataclasses.replace(out, model=dataclasses.replace(out.model, loss=member.loss))
    if member.seed != cfg.train.seed:
        out = dataclasses.replace(out, train=dataclasses.replace(out.train, seed=member.seed))
    return out


def combine(stack: np.ndarray, how: str, covered: np.ndarray | None = None) -> np.ndarray:
    """[M, N, ...] members' forecasts -> [N, ...]: their median or mean. `covered` ([M, N]
    bool): the members that forecast each row; the others are left out. A covering member's
    non-finite forecast makes the row's non-finite (a failed member is never hidden)."""
    if how not in ("median", "mean"):
        raise ValueError(f"combine = {how!r} is not one of 'median', 'mean'")
    if covered is None or covered.all():
        return np.median(stack, 0) if how == "median" else np.mean(stack, 0)
    cov = covered.reshape(covered.shape + (1,) * (stack.ndim - 2))   # [M, N] -> [M, N, 1, …]
    masked = np.where(cov, stack, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # rows no member covers stay NaN
        out = np.nanmedian(masked, 0) if how == "median" else np.nanmean(masked, 0)
    bad = (cov & ~np.isfinite(stack)).any(0)
    return np.where(bad, np.nan, out).astype(stack.dtype)


class Ensemble(nn.Module):
    """Members (EncoderDecoders built by build_model, each with its lookback in its spec) and
    how their forecasts combine. Forecast with `pipeline.forecasting.predict.predict_job`, which
    gives each member its own windows and scaling. `forward` is for batches of the longest lookback
    under per-series scaling (what the MLflow flavor is called with): each member reads the newest
    steps of its lookback and the outputs are combined in the model's units."""

    def __init__(self, members: Sequence[EncoderDecoder], combine: str = "median"):
        super().__init__()
        if not members or any(m.spec is None for m in members):
            raise ValueError("an Ensemble needs members built by build_model (with a spec)")
        self.members = nn.ModuleList(members)
        self.lookbacks = [int(m.spec["lookback"]) for m in members]
        self.combine = combine

    @property
    def spec(self) -> dict:
        """Member 0's spec with the longest lookback (the inputs `forward` reads), plus every
        member's spec under "ensemble" and "combine"."""
        return {**self.members[0].spec, "lookback": max(self.lookbacks),
                "ensemble": [m.spec for m in self.members], "combine": self.combine}

    def forward(self, x: torch.Tensor, xf: torch.Tensor | None = None,
                static: torch.Tensor | None = None, idx: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, L_max, 1 + C_past] ... -> [B, H, Q], the members combined."""
        outs = [m(x[:, -lb:], xf, static, idx).float()
                for m, lb in zip(self.members, self.lookbacks, strict=True)]
        stack = torch.stack(outs).detach().cpu().numpy()   # M x [B, H, Q] -> [M, B, H, Q]
        return torch.from_numpy(combine(stack, self.combine)).to(x.device)


def model_from_spec(spec: dict, state_dict: dict | None = None) -> nn.Module:
    """An EncoderDecoder or an Ensemble (spec with "ensemble") rebuilt from its spec, with
    `state_dict` loaded when given; in eval mode."""
    if "ensemble" in spec:
        model = Ensemble([from_spec(s) for s in spec["ensemble"]], spec["combine"])
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return model.eval()
    return from_spec(spec, state_dict).eval()


def save_model(model: nn.Module, path: str | Path | BinaryIO) -> None:
    """torch.save of the model's spec and weights (format 1) or every member's (format 2):
    the file alone rebuilds it."""
    if isinstance(model, Ensemble):
        torch.save({"format": 2, "combine": model.combine,
                    "ensemble": [{"spec": m.spec, "state_dict": m.state_dict()}
                                 for m in model.members]}, path)
        return
    if getattr(model, "spec", None) is None:
        raise ValueError("model has no spec: build it with build_model to make it saveable")
    torch.save({"format": 1, "spec": model.spec, "state_dict": model.state_dict()}, path)


def load_model(path: str | Path | BinaryIO, map_location: str | torch.device = "cpu"
               ) -> nn.Module:
    """Rebuild a saved model or ensemble bit-exactly (weights-only load); in eval mode."""
    saved = torch.load(path, map_location=map_location, weights_only=True)
    fmt = saved.get("format", 1)
    if fmt == 2:
        members = [from_spec(e["spec"], e["state_dict"]) for e in saved["ensemble"]]
        return Ensemble(members, saved["combine"]).eval()
    if fmt != 1:
        raise ValueError(f"unknown model file format {fmt!r} (this version reads 1 and 2)")
    return from_spec(saved["spec"], saved["state_dict"]).eval()
