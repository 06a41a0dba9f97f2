"""The model zoo: every encoder x decoder pair against the tensor contract, and the seed
chapter's facts about RNNs and causal convolutions (DESIGN.md §5)."""
from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.config import (
    DecoderConfig,
    EncoderConfig,
    ModelConfig,
)
from pipeline.models import (
    DECODERS,
    ENCODERS,
    CNNEncoder,
    NonCrossingQuantiles,
    RNNEncoder,
    build_model,
    causal_left_padding,
    conv_output_length,
    load_model,
    make_loss,
    save_model,
)

ENCODER_TYPES = ["ffn", "rnn", "lstm", "gru", "cnn"]
DECODER_TYPES = ["direct", "rnn", "lstm", "gru"]
PAIRS = list(itertools.product(ENCODER_TYPES, DECODER_TYPES))
B, L, H = 8, 12, 4
QUANTILES = [0.9, 0.1, 0.5]  # deliberately unsorted: outputs follow the given order


def tiny_config(enc: str, dec: str, *, full: bool, **decoder_kw) -> ModelConfig:
    encoder = EncoderConfig(type=enc, hidden_size=8, num_layers=2, kernel_size=2)
    decoder = DecoderConfig(type=dec, hidden_size=8, **decoder_kw)
    if not full:
        return ModelConfig(encoder=encoder, decoder=decoder)
    return ModelConfig(encoder=encoder, decoder=decoder, loss="quantile", quantiles=QUANTILES,
                       embedding="series", embedding_dim=3)


def tiny_model(enc: str, dec: str, *, full: bool, **decoder_kw):
    """full: 2 past, 3 future, 2 static features, embedding, 3 quantiles; bare: target only."""
    cfg = tiny_config(enc, dec, full=full, **decoder_kw)
    sizes = dict(past_size=2, future_size=3, static_size=2, num_embeddings=5) if full else \
        dict(past_size=0, future_size=0)
    return build_model(cfg, lookback=L, horizon=H, **sizes), cfg


def tiny_batch(full: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if not full:
        return dict(x=torch.randn(B, L, 1, generator=g))
    return dict(x=torch.randn(B, L, 3, generator=g), xf=torch.randn(B, H, 3, generator=g),
                static=torch.randn(B, 2, generator=g), idx=torch.randint(0, 5, (B,), generator=g))


def sine_batch(full: bool) -> tuple[dict, torch.Tensor]:
    """Sine waves with random phase and frequency: the future follows from the past."""
    g = torch.Generator().manual_seed(1)
    phase = torch.rand(B, 1, generator=g) * 2 * math.pi
    freq = 0.3 + 0.4 * torch.rand(B, 1, generator=g)
    wave = torch.sin(phase + freq * torch.arange(L + H))  # [B, L + H]
    batch = tiny_batch(full)
    batch["x"] = torch.cat([wave[:, :L, None], batch["x"][..., 1:]], -1)
    return batch, wave[:, L:]


# ---------------------------------------------------------------- contract, every pair

def test_registries_hold_every_configurable_block():
    assert sorted(ENCODERS) == sorted(ENCODER_TYPES)
    assert sorted(DECODERS) == sorted(DECODER_TYPES)


@pytest.mark.parametrize("full", [False, True], ids=["bare", "full"])
@pytest.mark.parametrize("enc,dec", PAIRS)
def test_output_shape_is_batch_horizon_quantiles(enc, dec, full):
    model, _ = tiny_model(enc, dec, full=full)
    out = model(**tiny_batch(full))
    assert out.shape == (B, H, len(QUANTILES) if full else 1)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_gradients_reach_every_parameter(enc, dec):
    model, cfg = tiny_model(enc, dec, full=True, teacher_forcing=0.5)
    batch, target = sine_batch(full=True)
    make_loss(cfg)(model(**batch, target=target), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_save_load_round_trip_is_bit_exact(enc, dec):
    model, _ = tiny_model(enc, dec, full=True)
    model.eval()
    buf = io.BytesIO()
    save_model(model, buf)
    buf.seek(0)
    loaded = load_model(buf)
    assert loaded.spec == model.spec
    batch = tiny_batch(full=True, seed=3)
    with torch.no_grad():
        assert torch.equal(model(**batch), loaded(**batch))


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_forward_is_deterministic_under_a_seed(enc, dec):
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        model, _ = tiny_model(enc, dec, full=True, teacher_forcing=0.5, dropout=0.2)
        batch, target = sine_batch(full=True)
        outs.append(model.train()(**batch, target=target))  # dropout and teacher forcing draw
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("enc,dec", PAIRS)
def test_loss_falls_when_overfitting_one_batch(enc, dec):
    torch.manual_seed(0)
    model, _ = tiny_model(enc, dec, full=False)
    loss_fn = make_loss(ModelConfig(loss="mse"))
    batch, target = sine_batch(full=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(model(**batch), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}"


# ---------------------------------------------------------------- quantiles

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.1, 1.0, 10.0]),
       dec=st.sampled_from(["direct", "gru"]))
def test_quantiles_never_cross_on_random_weights_and_inputs(seed, scale, dec):
    torch.manual_seed(seed)
    model, _ = tiny_model("cnn", dec, full=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
        batch = {k: v * scale if v.is_floating_point() else v for k, v in tiny_batch(True).items()}
        out = model(**batch)
    lo, mid, hi = out[..., 1], out[..., 2], out[..., 0]  # QUANTILES = [0.9, 0.1, 0.5]
    assert (lo <= mid).all() and (mid <= hi).all()


@settings(max_examples=60, deadline=None)
@given(levels=st.lists(st.floats(0.01, 0.99), min_size=2, max_size=6, unique=True),
       seed=st.integers(0, 2**31 - 1))
def test_non_crossing_head_orders_outputs_by_quantile_level(levels, seed):
    head = NonCrossingQuantiles(levels)
    raw = torch.randn(5, 7, len(levels), generator=torch.Generator().manual_seed(seed)) * 20
    out = head(raw)
    by_level = out[..., sorted(range(len(levels)), key=levels.__getitem__)]
    assert (by_level.diff(dim=-1) >= 0).all()
    assert levels[head.point_index] == min(levels, key=lambda q: abs(q - 0.5))


# ---------------------------------------------------------------- RNN facts

def test_gru_final_hidden_state_is_last_step_of_its_output():
    torch.manual_seed(0)
    gru = nn.GRU(input_size=1, hidden_size=32, num_layers=5, batch_first=True)
    output, hidden = gru(torch.randn(6, 15, 1))
    assert output.shape == (6, 15, 32) and hidden.shape == (5, 6, 32)
    assert torch.equal(hidden[-1], output[:, -1])


def test_gru_encoder_latent_is_the_final_hidden_state_of_all_layers():
    torch.manual_seed(0)
    enc = RNNEncoder("gru", 3, hidden_size=8, num_layers=2, bidirectional=True)
    x = torch.randn(4, 10, 3)
    output, _ = enc.rnn(x)                                  # [B, L, 2 * hidden]
    latent = enc(x)
    assert latent.state.shape == (2 * 2, 4, 8)              # [layers * directions, B, hidden]
    last_fwd, last_bwd = latent.state[-2], latent.state[-1]
    assert torch.equal(last_fwd, output[:, -1, :8])         # forward ends at the newest step
    assert torch.equal(last_bwd, output[:, 0, 8:])          # backward ends at the oldest
    assert torch.equal(latent.summary[:, -16:], torch.cat([last_fwd, last_bwd], -1))


def test_lstm_encoder_carries_hidden_and_cell_state():
    enc = RNNEncoder("lstm", 1, hidden_size=8, num_layers=3)
    latent = enc(torch.randn(2, 5, 1))
    h, c = latent.state
    assert h.shape == c.shape == (3, 2, 8) and latent.summary.shape == (2, 24)


@pytest.mark.parametrize("enc_layers,projects", [(1, False), (2, True)])
def test_rnn_decoder_starts_from_encoder_state_when_its_shape_fits(enc_layers, projects):
    cfg = ModelConfig(encoder=EncoderConfig(type="gru", hidden_size=8, num_layers=enc_layers),
                      decoder=DecoderConfig(type="gru", hidden_size=8, num_layers=1))
    model = build_model(cfg, lookback=L, horizon=H, past_size=0, future_size=0)
    assert (model.decoder.init is not None) == projects


def test_teacher_forcing_feeds_the_target_in_training_only():
    model, _ = tiny_model("gru", "gru", full=False, teacher_forcing=1.0)
    x, target = torch.randn(B, L, 1), torch.randn(B, H)
    other = target.clone()
    other[:, 0] += 1.0
    first, second = model.train()(x, target=target), model(x, target=other)
    assert torch.equal(first[:, 0], second[:, 0]) and not torch.equal(first[:, 1], second[:, 1])
    model.eval()
    assert torch.equal(model(x, target=target), model(x, target=other))


def test_wrong_input_widths_are_named():
    model, _ = tiny_model("gru", "direct", full=True)
    batch = tiny_batch(full=True)
    with pytest.raises(ValueError, match="past_size = 2"):
        model(**{**batch, "x": batch["x"][..., :2]})
    with pytest.raises(ValueError, match="future_size"):
        model(**{**batch, "xf": None})
    with pytest.raises(ValueError, match="embedding"):
        model(**{**batch, "idx": None})


def test_embedding_needs_num_embeddings():
    with pytest.raises(ValueError, match="num_embeddings"):
        build_model(tiny_config("gru", "direct", full=True), lookback=L, horizon=H,
                    past_size=2, future_size=3, static_size=2)


# ---------------------------------------------------------------- convolution facts

def test_conv_kernel_of_n_weights_one_over_n_is_a_rolling_mean():
    x = torch.randn(1, 1, 30, dtype=torch.float64)
    for n in (2, 3, 7):
        conv = nn.Conv1d(1, 1, n, bias=False).double()
        nn.init.constant_(conv.weight, 1 / n)
        expected = np.convolve(x[0, 0].numpy(), np.ones(n) / n, mode="valid")
        np.testing.assert_allclose(conv(x)[0, 0].detach().numpy(), expected, rtol=1e-12)
        trailing = conv(F.pad(x, (n - 1, 0)))[0, 0, n - 1:]  # causal: mean of x[t-n+1 .. t]
        np.testing.assert_allclose(trailing.detach().numpy(), expected, rtol=1e-12)


def test_conv_output_length_formula_matches_pytorch():
    weight = torch.randn(1, 1, 5)
    for length, k, s, d, p_l, p_r in itertools.product(range(1, 13), range(1, 5), range(1, 4),
                                                       range(1, 4), range(4), range(3)):
        if length + p_l + p_r < d * (k - 1) + 1:
            continue  # the kernel does not fit: PyTorch refuses
        x = F.pad(torch.randn(1, 1, length), (p_l, p_r))
        out = F.conv1d(x, weight[..., :k], stride=s, dilation=d)
        assert out.shape[-1] == conv_output_length(length, k, s, d, p_l, p_r)


@pytest.mark.parametrize("length,k,s,d", itertools.product([7, 12], [2, 3], [1, 2, 3], [1, 2]))
def test_same_length_and_causal_padding_formulas(length, k, s, d):
    same = d * (k - 1) + (length - 1) * (s - 1)  # chapter: p_l + p_r for O = L
    assert conv_output_length(length, k, s, d, pad_left=same) == length
    pad = causal_left_padding(length, k, s, d)
    assert conv_output_length(length, k, s, d, pad_left=pad) == math.ceil(length / s)
    assert (length - 1 + pad - d * (k - 1)) % s == 0  # the last kernel ends on step L-1


def cnn(padding_mode="zeros", **kw) -> CNNEncoder:
    cfg = EncoderConfig(type="cnn", padding_mode=padding_mode, **{"hidden_size": 6, **kw})
    return CNNEncoder.from_config(cfg, input_size=2, lookback=0)


def output_steps(length: int, n_out: int, total_stride: int) -> list[int]:
    """The input step each CNN output sits on: the last is L-1, then every total_stride back."""
    return [length - 1 - total_stride * (n_out - 1 - j) for j in range(n_out)]


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("stride", [1, 2])
def test_cnn_feature_at_t_ignores_inputs_after_t(padding_mode, stride):
    torch.manual_seed(0)
    enc = cnn(padding_mode, num_layers=3, kernel_size=3, stride=stride)
    x = torch.randn(4, 20, 2)
    base = enc.features(x)
    assert base.shape[-1] == math.ceil(20 / stride ** 3)
    steps = output_steps(20, base.shape[-1], stride ** 3)
    for t in (0, 5, 11, 18):
        changed = x.clone()
        changed[:, t + 1:] = torch.randn_like(changed[:, t + 1:])
        feats = enc.features(changed)
        upto = [j for j, step in enumerate(steps) if step <= t]
        assert torch.equal(feats[..., upto], base[..., upto])
        assert not torch.equal(feats, base)


def test_cnn_features_ignore_padding_once_receptive_field_is_inside_window():
    """Zeros or replicate padding of the first steps: features at steps t >= rf - 1 (whose
    receptive field lies inside the window) are identical; earlier ones differ."""
    torch.manual_seed(0)
    zeros = cnn("zeros", num_layers=3, kernel_size=3)
    replicate = cnn("replicate", num_layers=3, kernel_size=3)
    replicate.load_state_dict(zeros.state_dict())
    rf = zeros.receptive_field                                   # 1 + 2 * (1 + 2 + 4) = 15
    x = torch.randn(4, 24, 2) + 3.0                              # x[0] far from zero
    a, b = zeros.features(x), replicate.features(x)
    assert torch.equal(a[..., rf - 1:], b[..., rf - 1:])
    assert not torch.equal(a[..., 0], b[..., 0])


@pytest.mark.parametrize("dec", ["direct", "gru"])
def test_forecast_does_not_depend_on_padding_when_receptive_field_fits(dec):
    cfgs = [ModelConfig(encoder=EncoderConfig(type="cnn", hidden_size=6, num_layers=2,
                                              kernel_size=3, padding_mode=mode),
                        decoder=DecoderConfig(type=dec, hidden_size=6)) for mode in
            ("zeros", "replicate")]
    assert cfgs[0].encoder.receptive_field() <= L
    models = [build_model(c, lookback=L, horizon=H, past_size=0, future_size=0) for c in cfgs]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(B, L, 1) + 3.0
    assert torch.equal(models[0](x), models[1](x))


@pytest.mark.parametrize("kernel_size,dilations,stride", [
    (3, None, 1), (2, [1, 2, 4, 8], 1), (3, [1, 3], 2), (4, None, 2), (5, [2, 1, 3], 1),
    (2, [1, 1], 3)])  # the last: stride 3 > d(k-1) + 1, the oldest step is cropped, not padded
def test_cnn_receptive_field_matches_gradient_measurement(kernel_size, dilations, stride):
    kw = dict(kernel_size=kernel_size, dilations=dilations, stride=stride,
              num_layers=len(dilations) if dilations else 2)
    cfg = EncoderConfig(type="cnn", **kw)
    torch.manual_seed(0)
    enc = cnn(**kw)
    length = cfg.receptive_field() + 10
    x = torch.randn(16, length, 2, requires_grad=True)
    enc.features(x)[..., -1].sum().backward()                 # the newest feature
    seen = x.grad.abs().sum(dim=(0, 2)).nonzero().flatten()
    measured = length - seen.min().item()
    assert measured == enc.receptive_field == cfg.receptive_field()
