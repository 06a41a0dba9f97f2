"""Training losses: MASE and sMAPE against hand-computed values and `pipeline.evaluation.metrics`,
masks, finite gradients, torch.func.vmap over pack members, and the older losses unchanged; the
losses a ModelConfig makes (observed entries only, the pinball's weights, packed members'
losses)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.config import EncoderConfig, ModelConfig
from pipeline.evaluation import metrics as E
from pipeline.models import build_model
from pipeline.models.losses import (
    HuberLoss,
    MAELoss,
    MASELoss,
    MSELoss,
    QuantileLoss,
    SMAPELoss,
    make_loss,
)

NAN = math.nan


def cfg(loss: str, quantiles=(), delta: float = 1.0) -> SimpleNamespace:
    """A stand-in for ModelConfig (whose allowed `loss` values the config module owns)."""
    return SimpleNamespace(loss=loss, quantiles=list(quantiles), huber_delta=delta)


def approx(value: torch.Tensor, expected: float) -> None:
    assert value.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


# ------------------------------------------------------------------------------- MASE

# scaled forecasts and targets: 2 windows × 3 steps, the last step of each unobserved (NaN)
Z_HAT = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]).unsqueeze(-1)   # [B, H] -> [B, H, 1]
Z = torch.tensor([[0.0, 2.0, NAN], [1.0, -1.0, NAN]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_mase_is_the_weighted_mean_absolute_error_over_observed_entries():
    weight = torch.tensor([0.5, 2.0])
    # |ẑ − z| = [1, 0] and [1, 1]; weighted [0.5, 0] and [2, 2]; 4 observed entries
    approx(MASELoss()(Z_HAT, Z, MASK, weight=weight), (0.5 + 0 + 2 + 2) / 4)
    full = torch.tensor([[0.0, 2.0, 5.0], [1.0, -1.0, 0.0]])
    approx(MASELoss()(Z_HAT, full, weight=weight), (0.5 + 0 + 1 + 2 + 2 + 0) / 6)


def test_mase_with_weight_scale_over_seasonal_mae_is_mase_in_original_units():
    rng = np.random.default_rng(3)
    B, H, m = 5, 4, 3
    hist = [rng.normal(10, 3, size=20 + i) for i in range(B)]
    loc, scale = rng.normal(10, 1, B), rng.uniform(0.5, 4, B)
    y, y_hat = rng.normal(10, 3, (B, H)), rng.normal(10, 3, (B, H))
    z, z_hat = (y - loc[:, None]) / scale[:, None], (y_hat - loc[:, None]) / scale[:, None]
    weight = scale / E.mase_scale(hist, m)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = MASELoss()(t(z_hat)[..., None], t(z), weight=t(weight))
    assert got.item() == pytest.approx(E.mase(y, y_hat, E.mase_scale(hist, m)).mean(), rel=1e-12)


def test_mase_leaves_out_windows_whose_weight_is_not_finite():
    pred = Z_HAT.clone().requires_grad_()
    weight = torch.tensor([0.5, math.inf])              # m_b = 0: a constant history
    loss = MASELoss()(pred, Z, MASK, weight=weight)
    approx(loss, (0.5 + 0) / 2)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and (pred.grad[1] == 0).all()
    approx(MASELoss()(Z_HAT, Z, MASK, weight=torch.tensor([NAN, NAN])), 0.0)


def test_mase_needs_a_weight_per_window():
    with pytest.raises(ValueError, match=r"MASELoss needs weight \[B\]"):
        MASELoss()(Z_HAT, Z, MASK)
    with pytest.raises(ValueError, match=r"weight must be \[B\] = \[2\]; got \[3\]"):
        MASELoss()(Z_HAT, Z, MASK, weight=torch.ones(3))


# ------------------------------------------------------------------------------- sMAPE

LOC, SCALE = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])
# y = z·scale + loc: ŷ = [1, 3, 0] / [1, 0, ·], y = [1, 1, 0] / [-1, 0, NaN (masked)]
S_HAT = torch.tensor([[0.0, 1.0, -0.5], [1.0, 0.0, 2.0]]).unsqueeze(-1)   # [B, H] -> [B, H, 1]
S_Z = torch.tensor([[0.0, 0.0, -0.5], [-1.0, 0.0, NAN]])
S_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_smape_in_original_units_counts_zero_over_zero_as_zero():
    # terms 0, 200·2/4, 0/0 -> 0 and 200·2/2, 0/0 -> 0 over 5 observed entries
    approx(SMAPELoss()(S_HAT, S_Z, S_MASK, loc=LOC, scale=SCALE), (0 + 100 + 0 + 200 + 0) / 5)
    y = (S_Z * SCALE[:, None] + LOC[:, None]).numpy()
    y_hat = (S_HAT[..., 0] * SCALE[:, None] + LOC[:, None]).numpy()
    per_series = E.smape(y, y_hat, S_MASK.numpy())             # the evaluation's sMAPE
    approx(SMAPELoss()(S_HAT, S_Z, S_MASK, loc=LOC, scale=SCALE),
           float((per_series * [3, 2]).sum() / 5))


def test_smape_gradient_is_finite_where_forecast_and_actual_are_zero():
    pred = S_HAT.clone().requires_grad_()
    target = S_Z.clone()
    target[1, 2] = NAN
    SMAPELoss()(pred, target, S_MASK, loc=LOC, scale=SCALE).backward()
    g = pred.grad[..., 0]
    assert torch.isfinite(g).all()
    assert g[0, 2] == 0 and g[1, 1] == 0 and g[1, 2] == 0     # y = ŷ = 0, and the masked step
    # ŷ = 3, y = 1: d/dŷ 200(ŷ − y)/(ŷ + y) = 200·2y/(ŷ + y)² = 25; dŷ/dẑ = scale = 2; 5 entries
    assert g[0, 1].item() == pytest.approx(25 * 2 / 5, rel=1e-6)


def test_smape_gradient_stays_finite_for_tiny_values():
    pred = torch.tensor([[[1e-30], [0.0], [-1e-38]]], requires_grad=True)
    target = torch.tensor([[0.0, 1e-30, 0.0]])
    one, zero = torch.ones(1), torch.zeros(1)
    loss = SMAPELoss()(pred, target, loc=zero, scale=one)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_smape_needs_loc_and_scale():
    with pytest.raises(ValueError, match=r"SMAPELoss needs loc \[B\]"):
        SMAPELoss()(S_HAT, S_Z, S_MASK, scale=SCALE)
    with pytest.raises(ValueError, match=r"SMAPELoss needs scale \[B\]"):
        SMAPELoss()(S_HAT, S_Z, S_MASK, loc=LOC)


def test_new_losses_match_autograd_gradcheck_away_from_kinks():
    g = torch.Generator().manual_seed(0)
    pred = (torch.rand(3, 4, 1, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    target = -torch.rand(3, 4, generator=g, dtype=torch.float64) - 0.5   # ŷ − y > 0 everywhere
    mask = torch.tensor([[1.0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float64)
    kw = {"loc": torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
          "scale": torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64),
          "weight": torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)}
    for loss in (MASELoss(), SMAPELoss()):
        assert torch.autograd.gradcheck(lambda p, f=loss: f(p, target, mask, **kw), (pred,))


# ------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("name", ["mae", "mse", "huber", "quantile", "mase", "smape"])
def test_nan_targets_under_mask_zero_reach_neither_value_nor_gradient(name):
    loss_fn = make_loss(cfg(name, quantiles=[0.1, 0.5, 0.9] if name == "quantile" else ()))
    g = torch.Generator().manual_seed(1)
    q = 3 if name == "quantile" else 1
    pred = torch.randn(4, 5, q, generator=g)
    target = torch.randn(4, 5, generator=g)
    mask = (torch.rand(4, 5, generator=g) > 0.4).float()
    kw = {"loc": torch.randn(4, generator=g), "scale": torch.rand(4, generator=g) + 0.5,
          "weight": torch.rand(4, generator=g) + 0.1}
    values, grads = [], []
    for fill in (NAN, 1e6):
        p = pred.clone().requires_grad_()
        loss = loss_fn(p, torch.where(mask > 0, target, fill), mask, **kw)
        loss.backward()
        values.append(loss.detach())
        grads.append(p.grad)
    assert torch.isfinite(values[0]) and torch.isfinite(grads[0]).all()
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])
    assert (grads[0][mask == 0] == 0).all()


# ------------------------------------------------------------------------------- vmap

@pytest.mark.parametrize("name", ["mae", "mse", "huber", "quantile", "mase", "smape"])
def test_vmap_over_members_equals_a_loop(name):
    quantiles = [0.1, 0.5, 0.9] if name == "quantile" else ()
    loss_fn = make_loss(cfg(name, quantiles))
    G, B, H = 3, 4, 5
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(G, B, H, len(quantiles) or 1, generator=g)
    target = torch.randn(G, B, H, generator=g)
    mask = (torch.rand(G, B, H, generator=g) > 0.3).float()
    target[mask == 0] = NAN
    loc, scale = torch.randn(G, B, generator=g), torch.rand(G, B, generator=g) + 0.5
    weight = torch.rand(G, B, generator=g) + 0.1
    # per-member [G, B] tensors: positionally, so vmap batches them
    each = torch.stack([loss_fn(pred[i], target[i], mask[i], loc=loc[i], scale=scale[i],
                                weight=weight[i]) for i in range(G)])
    torch.testing.assert_close(torch.func.vmap(loss_fn)(pred, target, mask, loc, scale, weight),
                               each)
    # keyword tensors [B] are not batched: shared by every member
    shared = torch.stack([loss_fn(pred[i], target[i], mask[i], loc=loc[0], scale=scale[0],
                                  weight=weight[0]) for i in range(G)])
    got = torch.func.vmap(loss_fn)(pred, target, mask, loc=loc[0], scale=scale[0],
                                   weight=weight[0])
    torch.testing.assert_close(got, shared)


@pytest.mark.parametrize("name", ["mase", "smape"])
def test_per_member_keyword_tensors_under_vmap_are_an_error(name):
    loss_fn = make_loss(cfg(name))
    pred, target = torch.zeros(3, 4, 5, 1), torch.zeros(3, 4, 5)
    with pytest.raises(ValueError, match=r"must be \[B\] = \[4\]; got \[3, 4\].*positionally"):
        torch.func.vmap(loss_fn)(pred, target, loc=torch.zeros(3, 4), scale=torch.ones(3, 4),
                                 weight=torch.ones(3, 4))


# ------------------------------------------------------------------------- older losses

def test_older_losses_are_unchanged_and_ignore_loc_scale_weight():
    pred = torch.zeros(2, 3, 1)
    target = torch.tensor([[1.0, -2.0, NAN], [4.0, 1e6, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    kw = {"loc": torch.tensor([5.0, -1.0]), "scale": torch.tensor([3.0, 0.1]),
          "weight": torch.tensor([NAN, 7.0])}
    expected = {"mae": 7 / 4, "mse": 21 / 4, "huber": (0.5 + 1.5 + 3.5 + 0) / 4}
    for name, value in expected.items():
        loss_fn = make_loss(cfg(name))
        approx(loss_fn(pred, target, mask), value)
        approx(loss_fn(pred, target, mask, **kw), value)
    pinball = make_loss(cfg("quantile", [0.1, 0.9]))
    under = torch.full((1, 2, 2), -1.0)                   # y − ŷ = 1: cost q
    approx(pinball(under, torch.zeros(1, 2)), (0.1 + 0.9) / 2)
    approx(pinball(under, torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), **{
        k: v[:1] for k, v in kw.items()}), 0.5)


def test_make_loss_knows_every_loss_by_name():
    kinds = {"mae": MAELoss, "mse": MSELoss, "huber": HuberLoss, "quantile": QuantileLoss,
             "mase": MASELoss, "smape": SMAPELoss}
    for name, kind in kinds.items():
        assert type(make_loss(cfg(name, [0.5]))) is kind
    assert make_loss(cfg("huber", delta=0.25)).delta == 0.25
    with pytest.raises(ValueError, match=r"model.loss = 'msae' is not one of"):
        make_loss(cfg("msae"))


# -------------------------------------------- through ModelConfig: masks, pinball, packs

def test_losses_average_only_observed_entries():
    pred = torch.zeros(2, 3, 1)
    target = torch.tensor([[1.0, -2.0, float("nan")], [4.0, 1e6, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    expected = {"mae": 7 / 4, "mse": 21 / 4, "huber": (0.5 + 1.5 + 3.5 + 0) / 4}
    for name, value in expected.items():
        got = make_loss(ModelConfig(loss=name))(pred.requires_grad_(), target, mask)
        assert got.item() == pytest.approx(value)
        got.backward()
        assert torch.isfinite(pred.grad).all()
        pred.grad = None


def test_pinball_loss_weights_under_and_over_forecasts():
    loss = make_loss(ModelConfig(loss="quantile", quantiles=[0.1, 0.9]))
    target = torch.zeros(1, 2)
    under = torch.full((1, 2, 2), -1.0)   # y - yhat = 1: cost q
    over = torch.full((1, 2, 2), 1.0)     # y - yhat = -1: cost 1 - q
    assert loss(under, target).item() == pytest.approx((0.1 + 0.9) / 2)
    assert loss(over, target).item() == pytest.approx((0.9 + 0.1) / 2)
    assert loss(under, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5)
    one = make_loss(ModelConfig(loss="quantile", quantiles=[0.1]))
    assert one(under[..., :1], target).item() == pytest.approx(0.1)
    assert one(over[..., :1], target).item() == pytest.approx(0.9)


def test_point_loss_refuses_quantile_outputs():
    with pytest.raises(ValueError, match=r"\[B, H, 1\]"):
        make_loss(ModelConfig(loss="mae"))(torch.zeros(2, 3, 3), torch.zeros(2, 3))


B, L, H = 8, 12, 4  # batch, lookback, horizon


def test_a_spec_leaves_the_ensemble_out_and_packs_members_of_other_losses():
    """The ensemble section is the job's, not one model's: a member's spec is the plain
    model's (files and warm starts unchanged). Members that differ only in their loss pack
    together, and each comes back out with its own spec."""
    from pipeline.config.model import EnsembleConfig
    from pipeline.models import PackedModel
    from pipeline.training.loop import member_losses
    enc = EncoderConfig(type="cnn", hidden_size=4, num_layers=2)
    sizes = dict(lookback=L, horizon=H, past_size=0, future_size=0)
    plain = build_model(ModelConfig(encoder=enc), **sizes)
    member = build_model(ModelConfig(encoder=enc, ensemble=EnsembleConfig(members=3)), **sizes)
    assert member.spec == plain.spec and "ensemble" not in member.spec["model"]
    other = build_model(ModelConfig(encoder=enc, loss="smape"), **sizes)
    packed = PackedModel.from_models([plain, other])
    assert [packed.extract(g).spec["model"]["loss"] for g in (0, 1)] == ["mae", "smape"]
    with pytest.raises(ValueError, match="different spec"):
        PackedModel.from_models([plain, build_model(ModelConfig(encoder=enc), lookback=2 * L,
                                                    horizon=H, past_size=0, future_size=0)])
    pred, target = torch.randn(2, B, H, 1), torch.randn(2, B, H)
    loc, scale = torch.randn(2, B), torch.rand(2, B) + 0.5
    fns = [make_loss(ModelConfig(loss="mae")), make_loss(ModelConfig(loss="smape"))]
    got = member_losses(fns, pred, target, None, 2, loc, scale, None)  # one loss each
    assert torch.equal(got, torch.stack([fns[0](pred[0], target[0]),
                                         fns[1](pred[1], target[1], None, loc[1], scale[1])]))
    same = member_losses(fns[1], pred, target, None, 2, loc, scale, None)   # one vmap
    torch.testing.assert_close(same, torch.stack([fns[1](pred[g], target[g], None, loc[g],
                                                         scale[g]) for g in (0, 1)]))
