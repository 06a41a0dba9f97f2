"""Packed per-group models: G models as one module predict, train and extract exactly as the G
separate models would (DESIGN.md §6)."""
from __future__ import annotations

import io

import pytest
import torch
from torch.testing import assert_close

from pipeline.config import DecoderConfig, EncoderConfig, ModelConfig
from pipeline.models import (
    EncoderDecoder,
    PackedModel,
    build_model,
    load_model,
    make_loss,
    save_model,
)
from pipeline.training.loop import clip_grad_norm_per_member, member_losses

G, B, L, H = 3, 6, 12, 4
QUANTILES = [0.9, 0.1, 0.5]  # unsorted on purpose, as in test_models
TOL = dict(atol=1e-5, rtol=1e-5)

ENCODERS = {  # every option the packed FFN, CNN and GRU reproduce
    "ffn": dict(type="ffn", hidden_size=6, num_layers=2),
    "ffn-1layer-nobias": dict(type="ffn", hidden_size=5, num_layers=1, bias=False),
    "cnn": dict(type="cnn", hidden_size=6, num_layers=2, kernel_size=2),
    "cnn-stride2-replicate": dict(type="cnn", hidden_size=6, num_layers=3, kernel_size=3,
                                  stride=2, padding_mode="replicate"),
    "cnn-stride3-crop": dict(type="cnn", hidden_size=5, num_layers=2, kernel_size=2,
                             dilations=[1, 1], stride=3),
    "cnn-plain-nobias": dict(type="cnn", hidden_size=6, num_layers=2, kernel_size=3,
                             residual=False, bias=False),
    "gru": dict(type="gru", hidden_size=6, num_layers=2),
    "gru-1layer-nobias": dict(type="gru", hidden_size=5, num_layers=1, bias=False),
}


def packable_config(enc: str, *, full: bool) -> ModelConfig:
    encoder = EncoderConfig(**ENCODERS[enc])
    decoder = DecoderConfig(type="direct", hidden_size=7, num_layers=2 if full else 1)
    if not full:
        return ModelConfig(encoder=encoder, decoder=decoder)
    return ModelConfig(encoder=encoder, decoder=decoder, loss="quantile", quantiles=QUANTILES,
                       embedding="series", embedding_dim=3)


def sizes(full: bool) -> dict:
    """full: 2 past, 3 future, 2 static features, an embedding of 5; bare: the target only."""
    extra = dict(past_size=2, future_size=3, static_size=2, num_embeddings=5) if full else \
        dict(past_size=0, future_size=0)
    return dict(lookback=L, horizon=H, **extra)


def group_models(enc: str, *, full: bool, seed: int = 0) -> list[EncoderDecoder]:
    torch.manual_seed(seed)
    return [build_model(packable_config(enc, full=full), **sizes(full)) for _ in range(G)]


def group_batch(full: bool, seed: int = 0) -> dict:
    """Inputs with the group dimension first: x [G, B, L, C], xf [G, B, H, C_fut], …"""
    g = torch.Generator().manual_seed(seed)
    if not full:
        return dict(x=torch.randn(G, B, L, 1, generator=g))
    return dict(x=torch.randn(G, B, L, 3, generator=g), xf=torch.randn(G, B, H, 3, generator=g),
                static=torch.randn(G, B, 2, generator=g),
                idx=torch.randint(0, 5, (G, B), generator=g))


def slice_group(batch: dict, g: int) -> dict:
    return {k: v[g] for k, v in batch.items()}


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("full", [False, True], ids=["bare", "full"])
@pytest.mark.parametrize("enc", list(ENCODERS))
def test_each_group_predicts_what_its_own_model_predicts(enc, full):
    models = group_models(enc, full=full)
    packed = PackedModel.from_models(models)
    batch = group_batch(full)
    out = packed(**batch)
    assert out.shape == (G, B, H, len(QUANTILES) if full else 1)
    for g, model in enumerate(models):
        assert_close(out[g], model(**slice_group(batch, g)), **TOL)


@pytest.mark.parametrize("enc", ["ffn", "cnn-stride2-replicate", "gru"])
def test_a_group_does_not_see_other_groups_inputs(enc):
    packed = PackedModel.from_models(group_models(enc, full=True))
    batch = group_batch(full=True)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["x"][1] += 10.0
    before, after = packed(**batch), packed(**changed)
    assert_close(after[[0, 2]], before[[0, 2]], atol=0, rtol=0)
    assert not torch.equal(after[1], before[1])


def test_quantiles_of_every_group_never_cross():
    torch.manual_seed(1)
    packed = PackedModel.build(packable_config("cnn", full=True), groups=G, **sizes(True))
    with torch.no_grad():
        for p in packed.parameters():
            p.normal_(0.0, 3.0)
        out = packed(**group_batch(full=True))
    lo, mid, hi = out[..., 1], out[..., 2], out[..., 0]  # QUANTILES = [0.9, 0.1, 0.5]
    assert (lo <= mid).all() and (mid <= hi).all()


# ---------------------------------------------------------------- build and extract

@pytest.mark.parametrize("enc", ["ffn", "cnn", "gru"])
def test_extract_gives_the_ordinary_model_back(enc):
    models = group_models(enc, full=True)
    packed = PackedModel.from_models(models).eval()
    batch = group_batch(full=True, seed=2)
    for g, model in enumerate(models):
        single = packed.extract(g)
        assert type(single) is EncoderDecoder and single.spec == model.spec
        assert not single.training
        for key, value in model.state_dict().items():
            assert torch.equal(single.state_dict()[key], value), key
        buf = io.BytesIO()
        save_model(single, buf)
        buf.seek(0)
        with torch.no_grad():
            assert_close(load_model(buf)(**slice_group(batch, g)), packed(**batch)[g], **TOL)


def test_extract_keeps_dtype_and_refuses_a_missing_group():
    packed = PackedModel.from_models(group_models("gru", full=False)).double()
    single = packed.extract(2)
    assert all(p.dtype == torch.float64 for p in single.parameters())
    with pytest.raises(IndexError, match="out of range"):
        packed.extract(G)


def test_build_equals_packing_models_built_one_after_another():
    torch.manual_seed(5)
    built = PackedModel.build(packable_config("cnn", full=True), groups=G, **sizes(True))
    packed = PackedModel.from_models(group_models("cnn", full=True, seed=5))
    assert built.state_dict().keys() == packed.state_dict().keys()
    for key, value in built.state_dict().items():
        assert torch.equal(value, packed.state_dict()[key]), key
        assert value.shape[0] == G, key                  # every parameter: [G, *single shape]
    weight = built.encoder.layers[0].weight
    assert not torch.equal(weight[0], weight[1])         # groups start from different draws


# ---------------------------------------------------------------- loss and clipping

@pytest.mark.parametrize("loss", ["mae", "mse", "huber", "quantile"])
def test_packed_loss_is_the_sum_of_each_groups_mean_loss(loss):
    cfg = ModelConfig(loss=loss, quantiles=QUANTILES if loss == "quantile" else [])
    loss_fn = make_loss(cfg)
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(G, B, H, len(cfg.quantiles) or 1, generator=g)
    target = torch.randn(G, B, H, generator=g)
    mask = (torch.rand(G, B, H, generator=g) > 0.3).float()
    target[mask == 0] = float("nan")                     # never reaches the loss
    each = torch.stack([loss_fn(pred[i], target[i], mask[i]) for i in range(G)])
    assert_close(member_losses(loss_fn, pred, target, mask, G), each)
    clean = target.nan_to_num()
    assert_close(member_losses(loss_fn, pred, clean, None, G).sum(),
                 sum(loss_fn(pred[i], clean[i]) for i in range(G)))
    assert_close(member_losses(loss_fn, pred[0], target[0], mask[0], 1), each[:1])


def group_grads(packed: PackedModel, g: int) -> dict[str, torch.Tensor]:
    """Group g's slice of every gradient, under the single model's parameter names."""
    params = dict(packed.named_parameters())
    return {src: params[name].grad[g] for name, src in packed.sources.items()}


@pytest.mark.parametrize("enc", ["ffn", "cnn", "gru"])
def test_per_group_clipping_equals_clipping_each_model_alone(enc):
    models = group_models(enc, full=True)
    packed = PackedModel.from_models(models)
    loss_fn = make_loss(packable_config(enc, full=True))
    batch = group_batch(full=True)
    target = torch.randn(G, B, H)
    member_losses(loss_fn, packed(**batch), target, None, G).sum().backward()
    unclipped = clip_grad_norm_per_member(packed, max_norm=float("inf"))  # only measures
    max_norm = (unclipped.min() + unclipped.max()).item() / 2  # clips some groups, not all
    norms = clip_grad_norm_per_member(packed, max_norm)
    assert_close(norms, unclipped)
    for g, model in enumerate(models):
        loss_fn(model(**slice_group(batch, g)), target[g]).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert_close(norms[g], norm, **TOL)
        grads = group_grads(packed, g)
        for name, p in model.named_parameters():
            assert_close(grads[name], p.grad, **TOL)


# ---------------------------------------------------------------- packed training

def train_separately(models, batches, loss_fn, clip, lr) -> None:
    for g, model in enumerate(models):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for batch, target, mask in batches:
            opt.zero_grad()
            loss_fn(model(**slice_group(batch, g)), target[g], mask[g]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()


def train_packed(packed, batches, loss_fn, clip, lr) -> torch.Tensor:
    """Adam on the pack; returns the pre-clipping norms of every step [steps, G]."""
    opt = torch.optim.Adam(packed.parameters(), lr=lr)
    norms = []
    for batch, target, mask in batches:
        opt.zero_grad()
        member_losses(loss_fn, packed(**batch), target, mask, G).sum().backward()
        norms.append(clip_grad_norm_per_member(packed, clip))
        opt.step()
    return torch.stack(norms)


@pytest.mark.parametrize("enc", ["ffn", "cnn", "gru"])
def test_packed_training_equals_separate_training(enc):
    models = group_models(enc, full=True, seed=3)
    packed = PackedModel.from_models(models)             # copies: the models train on their own
    loss_fn = make_loss(packable_config(enc, full=True))
    g = torch.Generator().manual_seed(3)
    batches = [(group_batch(full=True, seed=100 + step), torch.randn(G, B, H, generator=g),
                (torch.rand(G, B, H, generator=g) > 0.2).float()) for step in range(20)]
    clip, lr = 0.2, 1e-2                                 # pinball gradient norms: about 0.1-0.3
    train_separately(models, batches, loss_fn, clip, lr)
    norms = train_packed(packed, batches, loss_fn, clip, lr)
    assert (norms > clip).any() and (norms < clip).any()  # clipping bound, and not always
    probe = group_batch(full=True, seed=999)
    for i, model in enumerate(models):
        extracted = packed.extract(i)
        for key, value in model.state_dict().items():
            assert_close(extracted.state_dict()[key], value, **TOL,
                         msg=lambda m, k=key: f"{k}: {m}")
        assert_close(extracted(**slice_group(probe, i)), model(**slice_group(probe, i)), **TOL)
        assert_close(packed(**probe)[i], model(**slice_group(probe, i)), **TOL)


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("enc,dec,extra", [
    ("rnn", "direct", {}), ("lstm", "direct", {}),
    ("gru", "direct", {"bidirectional": True}), ("cnn", "gru", {}), ("gru", "lstm", {}),
    ("cnn", "rnn", {})])
def test_unsupported_architectures_are_refused_by_name(enc, dec, extra):
    cfg = ModelConfig(encoder=EncoderConfig(type=enc, hidden_size=4, **extra),
                      decoder=DecoderConfig(type=dec, hidden_size=4))
    match = "bidirectional" if extra else ("encoder ffn | cnn | gru" if enc not in ("cnn", "gru")
                                           else "decoder direct")
    with pytest.raises(ValueError, match=match):
        PackedModel.build(cfg, groups=2, **sizes(False))
    models = [build_model(cfg, **sizes(False)) for _ in range(2)]
    with pytest.raises(ValueError, match=match):
        PackedModel.from_models(models)


def test_models_that_differ_or_lack_a_spec_are_refused():
    small = build_model(packable_config("cnn", full=False), **sizes(False))
    longer = build_model(packable_config("cnn", full=False), **{**sizes(False), "horizon": H + 1})
    with pytest.raises(ValueError, match="different spec"):
        PackedModel.from_models([small, longer])
    no_spec = build_model(packable_config("cnn", full=False), **sizes(False))
    no_spec.spec = None
    with pytest.raises(ValueError, match="spec"):
        PackedModel.from_models([no_spec])
    with pytest.raises(ValueError, match="at least one"):
        PackedModel.from_models([])


def test_inputs_without_the_group_dimension_are_named():
    packed = PackedModel.from_models(group_models("gru", full=True))
    batch = group_batch(full=True)
    with pytest.raises(ValueError, match=r"x must be \[G, B, L"):
        packed(**{**batch, "x": batch["x"][0]})
    with pytest.raises(ValueError, match="xf must have 4 dims"):
        packed(**{**batch, "xf": None})
    with pytest.raises(ValueError, match="static"):
        packed(**{**batch, "static": batch["static"][:2]})
    with pytest.raises(ValueError, match="embedding"):
        packed(**{**batch, "idx": batch["idx"][0]})


@pytest.mark.parametrize("enc", ["ffn", "cnn", "gru"])
def test_encoder_dropout_acts_in_training_only(enc):
    cfg = packable_config(enc, full=False)
    cfg.encoder.dropout = 0.5                            # between GRU layers, after each conv
    torch.manual_seed(0)
    models = [build_model(cfg, **sizes(False)) for _ in range(G)]
    packed = PackedModel.from_models(models)
    x = group_batch(full=False)["x"]
    trained = packed.train()(x)
    evaluated = packed.eval()(x)
    assert not torch.equal(trained, evaluated)
    for g, model in enumerate(models):
        assert_close(evaluated[g], model.eval()(x[g]), **TOL)
