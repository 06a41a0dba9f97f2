"""The hierarchy a run reconciles over, and its checks against the long table.

A hierarchy is a list of levels from the top down, each a list of static columns of the data
contract: `[[], [region], [region, store]]` is the grand total, one series per region and one
per (region, store). The bottom level is the input series themselves (`unique_id`); it is not
written in the spec. Each level starts with the columns of the level above it and adds at
least one, so every node has exactly one parent one level up.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from pipeline.config.hierarchy import KEY, hierarchy_levels
from pipeline.errors import DataError


@dataclass(frozen=True)
class Hierarchy:
    """Levels from the top down; `()` is the grand total. The bottom (the series) is implied."""
    levels: tuple[tuple[str, ...], ...]

    @property
    def columns(self) -> tuple[str, ...]:
        """Every level column, in the order the levels introduce them."""
        return self.levels[-1] if self.levels else ()

    def name(self, level: tuple[str, ...]) -> str:
        """A level's name in `tags`: `total` for `()`, else its columns joined by `/`."""
        return "/".join(level) if level else "total"


def parse(raw: object) -> Hierarchy:
    """A raw spec (a list of lists of column names) → Hierarchy, or ConfigError naming the
    bad level (counted from 1, top first; `config.hierarchy.hierarchy_levels`)."""
    return Hierarchy(hierarchy_levels(raw))


def check(frame: pl.DataFrame, hierarchy: Hierarchy, id_col: str = "unique_id") -> None:
    """The long table fits the hierarchy, or DataError: every level column present and not
    the id column, never null, constant over time within a series, and a level's new columns
    naming each child once (a store value under two regions is an error naming a series of
    each and both parents: ids would still be unique, but a repeated child value is almost
    always a data mistake, and the spec says the store identifies the store)."""
    cols = list(hierarchy.columns)
    for c in cols:
        if c == id_col:
            raise DataError(f"{KEY} names the id column {c!r}: the bottom level is the series "
                            "themselves, leave it out")
        if c not in frame.columns:
            raise DataError(f"{KEY} names column {c!r}, which the input does not have")
    if not cols:
        return
    _check_nulls(frame, cols, id_col)
    _check_constant(frame, cols, id_col)
    statics = frame.select(id_col, *cols).unique(id_col).sort(id_col)
    for above, level in zip(hierarchy.levels, hierarchy.levels[1:], strict=False):
        _check_one_parent(statics, above, level, id_col)


def _check_nulls(frame: pl.DataFrame, cols: Sequence[str], id_col: str) -> None:
    nulls = frame.select(id_col, *cols).filter(pl.any_horizontal(pl.col(cols).is_null()))
    if nulls.height:
        row = nulls.sort(id_col).row(0, named=True)
        col = next(c for c in cols if row[c] is None)
        raise DataError(f"column {col!r} of {KEY} is null for series {row[id_col]!r}; "
                        "every series needs a value in each level column")


def _check_constant(frame: pl.DataFrame, cols: Sequence[str], id_col: str) -> None:
    counts = frame.group_by(id_col).agg(pl.col(cols).n_unique())
    bad = counts.filter(pl.any_horizontal(pl.col(cols) > 1)).sort(id_col)
    if bad.height:
        row = bad.row(0, named=True)
        col = next(c for c in cols if row[c] > 1)
        values = (frame.filter(pl.col(id_col) == row[id_col])[col].unique(maintain_order=True)
                  .head(2).to_list())
        raise DataError(f"column {col!r} of {KEY} changes over time within series "
                        f"{row[id_col]!r} ({values[0]!r}, then {values[1]!r}); a level "
                        "column must be constant per series")


def _check_one_parent(statics: pl.DataFrame, above: tuple[str, ...], level: tuple[str, ...],
                      id_col: str) -> None:
    """The columns `level` adds to `above` determine `above`'s key: no child under two
    parents. `statics`: one row per series, sorted by id."""
    new = [c for c in level if c not in above]
    if not above:
        return
    parents = (statics.group_by(new).agg(pl.struct(list(above)).unique(maintain_order=True)
                                         .alias("_parents"), pl.col(id_col).first())
               .filter(pl.col("_parents").list.len() > 1).sort(id_col))
    if not parents.height:
        return
    row = parents.row(0, named=True)
    child = ", ".join(f"{c}={row[c]!r}" for c in new)
    two = [", ".join(f"{c}={p[c]!r}" for c in above) for p in row["_parents"][:2]]
    other = statics.filter(pl.all_horizontal(
        [pl.col(c) == row[c] for c in new] +
        [pl.col(c) == row["_parents"][1][c] for c in above]))[id_col][0]
    raise DataError(f"{KEY}: {child} is under two parents, {two[0]} (series "
                    f"{row[id_col]!r}) and {two[1]} (series {other!r}); each child of "
                    f"level {list(level)!r} must belong to one parent")
