"""Metrics, baselines and the statistical comparators."""
