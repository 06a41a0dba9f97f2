"""Training losses on pred [B, H, Q], target [B, H] and mask [B, H] (1 = observed) or None.

Each averages only over the entries where mask == 1, so imputed or padded steps never count;
target values under mask == 0 are ignored, even NaN. `make_loss(model_cfg)` picks one by name.

Every `forward` also takes `loc`, `scale` and `weight` ([B] each, optional): the window's
scaling (the model sees z = (y − loc) / scale) and a per-window weight. MAE, MSE, Huber and
the quantile loss ignore them; MASE needs `weight`, sMAPE `loc` and `scale`. Under
torch.func.vmap keyword arguments are not batched: per-member tensors [G, B] must be passed
positionally, `vmap(loss)(pred, target, mask, loc, scale, weight)`; a [G, B] keyword is an
error naming its shape.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig


def masked_mean(err: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of err [B, H] over mask == 1 (all entries when mask is None; 0 when none is 1)."""
    if mask is None:
        return err.mean()
    keep = mask > 0
    return torch.where(keep, err, 0.0).sum() / keep.sum().clamp(min=1)


def _observed(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the unobserved targets so a NaN there cannot reach the gradient."""
    return target if mask is None else torch.where(mask > 0, target, 0.0)


def _point(pred: torch.Tensor) -> torch.Tensor:
    if pred.shape[-1] != 1:
        raise ValueError(f"a point loss needs pred [B, H, 1]; got {tuple(pred.shape)}")
    return pred[..., 0]  # [B, H, 1] -> [B, H]


def _per_window(loss: str, name: str, value: torch.Tensor | None, pred: torch.Tensor
                ) -> torch.Tensor:
    """`value` [B] checked against pred [B, H, Q]; an error naming the loss when missing."""
    if value is None:
        raise ValueError(f"{loss} needs {name} [B]; got None")
    if tuple(value.shape) != tuple(pred.shape[:1]):
        raise ValueError(f"{loss}: {name} must be [B] = [{pred.shape[0]}]; got "
                         f"{list(value.shape)} (under vmap, pass per-member tensors "
                         "positionally: keyword arguments are not batched)")
    return value.to(pred.dtype)


class MAELoss(nn.Module):
    def forward(self, pred, target, mask=None, loc=None, scale=None, weight=None):
        err = (_point(pred) - _observed(target, mask)).abs()
        return masked_mean(err, mask)


class MSELoss(nn.Module):
    def forward(self, pred, target, mask=None, loc=None, scale=None, weight=None):
        err = (_point(pred) - _observed(target, mask)).square()
        return masked_mean(err, mask)


class HuberLoss(nn.Module):
    """Quadratic within `delta` of the target, linear beyond (torch's huber_loss)."""

    def __init__(self, delta: float = 1.0):
        super().__init__()
        self.delta = delta

    def forward(self, pred, target, mask=None, loc=None, scale=None, weight=None):
        err = F.huber_loss(_point(pred), _observed(target, mask), reduction="none",
                           delta=self.delta)
        return masked_mean(err, mask)


class QuantileLoss(nn.Module):
    """Pinball loss max(q·e, (q-1)·e) with e = y - ŷ_q, averaged over the Q quantiles."""

    def __init__(self, quantiles: Sequence[float]):
        super().__init__()
        self.quantiles = list(quantiles)

    def forward(self, pred, target, mask=None, loc=None, scale=None, weight=None):
        if pred.shape[-1] != len(self.quantiles):
            raise ValueError(f"pred has {pred.shape[-1]} outputs for {len(self.quantiles)} "
                             "quantiles")
        q = pred.new_tensor(self.quantiles)                # [Q], on pred's device and dtype
        e = _observed(target, mask).unsqueeze(-1) - pred   # [B, H] -> [B, H, 1]; e: [B, H, Q]
        err = torch.maximum(q * e, (q - 1) * e).mean(-1)   # [B, H, Q] -> [B, H]
        return masked_mean(err, mask)


class MASELoss(nn.Module):
    """Mean over observed entries of weight_b · |ẑ − z| (scaled values).

    Contract: the caller passes weight_b = scale_b / m_b, with scale_b the window's scaling
    and m_b the series' in-sample seasonal MAE before the cutoff (`evaluate.mase_scale`).
    Since |ŷ − y| = scale_b · |ẑ − z|, the loss is then MASE in original units: the mean of
    |ŷ − y| / m_b over every observed entry of the batch (the mean of per-window MASE when
    every entry is observed). A window whose weight is not finite (m_b = 0 or NaN: a constant
    history, where MASE is undefined and `evaluate` reports NaN) counts as unobserved, so its
    value and gradient stay out of the mean. loc and scale are not used.
    """

    def forward(self, pred, target, mask=None, loc=None, scale=None, weight=None):
        w = _per_window("MASELoss", "weight", weight, pred)[:, None]   # [B] -> [B, 1]
        finite = torch.isfinite(w)
        err = (_point(pred) - _observed(target, mask)).abs()          # [B, H]
        err = torch.where(finite, w, 0.0) * err
        keep = finite.expand_as(err) if mask is None else finite & (mask > 0)  # [B, H]
        return masked_mean(err, keep)


class SMAPELoss(nn.Module):
    """sMAPE in original units, 0–200: mean over observed entries of
    200·|ŷ − y| / (|ŷ| + |y|), with y = z·scale + loc and ŷ = ẑ·scale + loc per window.

    A 0/0 term counts as 0. The denominator is kept at least sqrt(smallest normal float)
    (1.1e-19 in float32), so the gradient is finite everywhere, y = ŷ = 0 included; values
    only differ from the exact ratio when |ŷ| + |y| is below that. weight is not used.
    """

    def forward(self, pred, target, mask=None, loc=None, scale=None, weight=None):
        loc = _per_window("SMAPELoss", "loc", loc, pred)[:, None]        # [B] -> [B, 1]
        scale = _per_window("SMAPELoss", "scale", scale, pred)[:, None]  # [B] -> [B, 1]
        y = _observed(target, mask) * scale + loc
        y_hat = _point(pred) * scale + loc
        tiny = torch.finfo(pred.dtype).tiny ** 0.5
        den = (y_hat.abs() + y.abs()).clamp(min=tiny)
        return masked_mean(200.0 * (y_hat - y).abs() / den, mask)


def make_loss(model_cfg: ModelConfig) -> nn.Module:
    """The loss `model.loss` names (mae | mse | huber | quantile | mase | smape)."""
    if model_cfg.loss == "quantile":
        return QuantileLoss(model_cfg.quantiles)
    if model_cfg.loss == "huber":
        return HuberLoss(model_cfg.huber_delta)
    losses = {"mae": MAELoss, "mse": MSELoss, "mase": MASELoss, "smape": SMAPELoss}
    if model_cfg.loss not in losses:
        raise ValueError(f"model.loss = {model_cfg.loss!r} is not one of "
                         f"{sorted([*losses, 'huber', 'quantile'])}")
    return losses[model_cfg.loss]()


class PointOf(nn.Module):
    """`loss` on one output of a quantile model (pred[..., index]): its median, for a point
    metric."""

    def __init__(self, loss: nn.Module, index: int):
        super().__init__()
        self.loss, self.index = loss, index

    def forward(self, pred, target, mask=None, loc=None, scale=None, weight=None):
        return self.loss(pred[..., self.index:self.index + 1], target, mask, loc, scale, weight)


def make_val_loss(model_cfg: ModelConfig, val_metric: str) -> nn.Module | None:
    """The validation score of `train.val_metric`: None for "loss" (validate on the training
    loss), else MASE or sMAPE in original units, on the quantile closest to 0.5 of a quantile
    model."""
    if val_metric == "loss":
        return None
    metric = {"mase": MASELoss, "smape": SMAPELoss}[val_metric]()
    if model_cfg.loss != "quantile":
        return metric
    qs = list(model_cfg.quantiles)
    return PointOf(metric, min(range(len(qs)), key=lambda i: abs(qs[i] - 0.5)))


def member_losses(loss_fn: nn.Module | Sequence[nn.Module], pred: torch.Tensor,
                  target: torch.Tensor, mask: torch.Tensor | None, members: int,
                  loc: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """[G] each member's mean loss. G = 1: loss_fn on [B, ...]; G > 1: one loss_fn on every
    member's slice of [G, B, ...] at once, under torch.func.vmap (every loss of `make_loss` is
    vmap-friendly; the per-member tensors go positionally, keywords are not batched), or, given
    one loss function per member, each on its own slice."""
    args = (pred, target, mask, loc, scale, weight)
    if not isinstance(loss_fn, nn.Module):
        fns = list(loss_fn)
        if len(fns) != members:
            raise ValueError(f"{len(fns)} loss functions for {members} members")
        if members > 1:
            return torch.stack([fn(*[None if a is None else a[g] for a in args])
                                for g, fn in enumerate(fns)])
        loss_fn = fns[0]
    if members == 1:
        return loss_fn(*args).reshape(1)
    in_dims = tuple(None if a is None else 0 for a in args)
    return torch.func.vmap(loss_fn, in_dims=in_dims)(*args)
