"""Forecasts from trained models: predict, the backtest, the final forecast, conformal
intervals."""
