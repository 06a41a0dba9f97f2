"""Forecasts coherent across a hierarchy (issue #30): the hierarchy spec and its checks
(`spec`), the aggregated series and sparse summing matrix (`aggregate`), and reconciliation of
base forecasts and their quantiles with hierarchicalforecast's methods (`reconcile`).

Imports neither Ray nor MLflow; hierarchicalforecast is imported only when reconciling."""
from pipeline.hierarchy.aggregate import Aggregation, aggregate, summing
from pipeline.hierarchy.spec import Hierarchy, check, parse

__all__ = ["Aggregation", "Hierarchy", "aggregate", "check", "parse", "summing"]
