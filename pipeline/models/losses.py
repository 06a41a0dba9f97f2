"""Training losses on pred [B, H, Q], target [B, H] and mask [B, H] (1 = observed) or None.

Each averages only over the entries where mask == 1, so imputed or padded steps never count;
target values under mask == 0 are ignored, even NaN. `make_loss(model_cfg)` picks one by name.
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


class MAELoss(nn.Module):
    def forward(self, pred, target, mask=None):
        err = (_point(pred) - _observed(target, mask)).abs()
        return masked_mean(err, mask)


class MSELoss(nn.Module):
    def forward(self, pred, target, mask=None):
        err = (_point(pred) - _observed(target, mask)).square()
        return masked_mean(err, mask)


class HuberLoss(nn.Module):
    """Quadratic within `delta` of the target, linear beyond (torch's huber_loss)."""

    def __init__(self, delta: float = 1.0):
        super().__init__()
        self.delta = delta

    def forward(self, pred, target, mask=None):
        err = F.huber_loss(_point(pred), _observed(target, mask), reduction="none",
                           delta=self.delta)
        return masked_mean(err, mask)


class QuantileLoss(nn.Module):
    """Pinball loss max(q·e, (q-1)·e) with e = y - ŷ_q, averaged over the Q quantiles."""

    def __init__(self, quantiles: Sequence[float]):
        super().__init__()
        self.quantiles = list(quantiles)

    def forward(self, pred, target, mask=None):
        if pred.shape[-1] != len(self.quantiles):
            raise ValueError(f"pred has {pred.shape[-1]} outputs for {len(self.quantiles)} "
                             "quantiles")
        q = pred.new_tensor(self.quantiles)                # [Q], on pred's device and dtype
        e = _observed(target, mask).unsqueeze(-1) - pred   # [B, H] -> [B, H, 1]; e: [B, H, Q]
        err = torch.maximum(q * e, (q - 1) * e).mean(-1)   # [B, H, Q] -> [B, H]
        return masked_mean(err, mask)


def make_loss(model_cfg: ModelConfig) -> nn.Module:
    """The loss `model.loss` names (mae | mse | huber | quantile)."""
    if model_cfg.loss == "quantile":
        return QuantileLoss(model_cfg.quantiles)
    if model_cfg.loss == "huber":
        return HuberLoss(model_cfg.huber_delta)
    return {"mae": MAELoss, "mse": MSELoss}[model_cfg.loss]()
