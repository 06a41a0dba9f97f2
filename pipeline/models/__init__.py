"""The model zoo: encoders and decoders registered by name, composed by `build_model`.

    model = build_model(cfg.model, lookback=168, horizon=24, past_size=3, future_size=2)
    y_hat = model(x, xf, static, idx)          # [B, H, Q]
    save_model(model, "model.pt"); model = load_model("model.pt")
    ensemble = Ensemble([model_0, model_1, …], combine="median")   # saved and loaded alike

See docs/models.md for the blocks and their config keys.
"""
from pipeline.models.decoders import (
    DECODERS,
    DirectDecoder,
    NonCrossingQuantiles,
    RNNDecoder,
    register_decoder,
)
from pipeline.models.encoders import (
    ENCODERS,
    CNNEncoder,
    FFNEncoder,
    Latent,
    RNNEncoder,
    StateSpec,
    causal_left_padding,
    conv_output_length,
    register_encoder,
)
from pipeline.models.ensemble import Ensemble, load_model, model_from_spec, save_model
from pipeline.models.losses import (
    HuberLoss,
    MAELoss,
    MASELoss,
    MSELoss,
    QuantileLoss,
    SMAPELoss,
    make_loss,
    make_val_loss,
)
from pipeline.models.packed import PackedModel, check_packable
from pipeline.models.seq2seq import EncoderDecoder, SpecError, build_model

__all__ = [
    "DECODERS", "ENCODERS", "CNNEncoder", "DirectDecoder", "EncoderDecoder", "FFNEncoder",
    "HuberLoss", "Latent", "MAELoss", "MSELoss", "NonCrossingQuantiles", "QuantileLoss",
    "RNNDecoder", "RNNEncoder", "StateSpec", "build_model", "causal_left_padding",
    "conv_output_length", "load_model", "make_loss", "make_val_loss", "register_decoder",
    "register_encoder", "save_model", "PackedModel", "check_packable", "Ensemble", "MASELoss",
    "SMAPELoss", "SpecError", "model_from_spec",
]

