"""Distributed batch forecasting: Parquet → series arrays → windows → train → evaluate → Parquet."""

__version__ = "0.1.0"
