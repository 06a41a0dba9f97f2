"""The forecast stages (after `pipeline.stages.steps`' backtest): H steps past every series' end
from the run's models (`forecast`) or from the registered champions (`registry_forecast`), then
`write_forecast`.

A forecast is made and written chunk by chunk of `evaluate.chunk_series` series: each chunk's
long columns are converted to Arrow, streamed into the partition's one file and dropped, so
memory holds one chunk, and the partition is put in place once whole (a failing chunk leaves
the old one). What stays in memory is the counts and the rows of the series drawn for the plots
and the report (`Forecast.cols`); `Forecast.rows()` reads the whole forecast back.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline import paths
from pipeline.config import Config
from pipeline.data.io import filesystem_for
from pipeline.data.loader import loader_at
from pipeline.data.prepare import Prepared
from pipeline.errors import PipelineError
from pipeline.forecasting.backtest import (
    FALLBACK,
    ZeroHistory,
    chunk_jobs,
    concat_columns,
    drawn_series,
    fallback_name,
    season_of,
)
from pipeline.forecasting.final import final_forecast, network_forecast, refit_forecast
from pipeline.forecasting.intervals import interval_columns, with_intervals
from pipeline.forecasting.predict import quantile_column
from pipeline.forecasting.select import default_model, published, series_keys
from pipeline.outputs import partitions as output
from pipeline.outputs.plots import plot_sample, quantiles_of, value_label
from pipeline.secrets import redact
from pipeline.stages import record as R
from pipeline.stages.batch import Batch
from pipeline.stages.reconciled import coherent, write_levels
from pipeline.stages.record import stage
from pipeline.tracking import champions as compare
from pipeline.training.jobs import n_groups
from pipeline.training.plan import Job, plan_jobs

KEYS = ["unique_id", "ds", "cutoff", "step", "y_hat", "model", "group"]


@dataclass
class Forecast:
    """A forecast to write: `make(lo, hi)` gives the long columns of series lo <= s < hi (one
    row per series and step, with their intervals) and the jobs that failed there; `columns`
    every quantile column a chunk may hold (so every chunk is written with the same columns).
    Once written (`write_forecast`): where it went, its counts, and `cols`, the rows of the
    series drawn for the plots and the report."""
    make: Callable[[int, int], tuple[dict, list[str]]]
    columns: list[str] = field(default_factory=list)
    note: str = ""                          # e.g. the champions it came from
    fallback: str = FALLBACK
    cols: dict = field(default_factory=dict)
    path: str = ""
    n_series: int = 0
    n_fallback: int = 0
    plots: list[str] = field(default_factory=list)
    delta: bool = False                     # written to a Delta table (output.format delta)
    missing: list[str] = field(default_factory=list)    # groups without a champion
    failed: list[str] = field(default_factory=list)     # jobs whose forecasts were not finite
    levels: dict = field(default_factory=dict)  # data.hierarchy: the aggregates' long rows,
    coherence: object = None                    # reconciled (`stages.reconciled.Coherence`)
    level_paths: list[str] = field(default_factory=list)  # where they and their scores went

    def rows(self) -> dict[str, np.ndarray]:
        """Every row written, read back from the Parquet partition (`ds` and `cutoff` as the
        output holds them): for callers that need the whole forecast."""
        if self.delta:
            raise PipelineError(f"the forecast went to a Delta table ({self.path}); read it "
                                "with deltalake")
        fs, path = filesystem_for(self.path)
        table = pq.read_table(path, filesystem=fs)
        return {k: table[k].to_numpy(zero_copy_only=False) for k in table.column_names}


@stage("forecast")
def forecast(b: Batch, data: Prepared, jobs: list[Job], trained, calibration=None,
             selection: dict | None = None) -> Forecast:
    """H steps past every series' end with its job's model (`trained`: a `stages.Trained`);
    the fallback where there is none; with `calibration` (the backtest's conformal widths,
    `Scored.calibration`) the intervals around it; with `selection` (`Scored.selection`,
    `evaluate.select: auto`) each group's published candidate where it is not the network's
    (or the combination's) forecast. Made chunk by chunk when written."""
    arrays, cfg, models, cal = data.arrays, b.cfg, trained.models(), calibration
    # the scaling at the series' ends, fitted once for all chunks
    loader = loader_at(arrays, cfg, arrays.lengths) if models else None
    swap = _Selected(b, arrays, selection) if selection else None

    def make(lo: int, hi: int) -> tuple[dict, list[str]]:
        bad: list[str] = []
        alone: list | None = [] if swap is not None else None   # the network's, combined
        cols = final_forecast(arrays, chunk_jobs(jobs, lo, hi), models, cfg,
                              within=_range(len(arrays), lo, hi), failed=bad,
                              runner=b.runner, loader=loader, alone=alone)
        if swap is not None:
            cols = swap(cols, alone)
        return _intervals(cols, cal, cfg), bad
    return Forecast(make, _columns([cfg], [cal]), note=_published(selection or {}),
                    fallback=fallback_name(cfg))


def _published(selection: dict) -> str:
    """'published by backtest MASE: gru_direct (4 groups)' or, where they differ, each model
    with its groups ('' without a selection)."""
    by: dict[str, list[str]] = {}
    for g, c in sorted(selection.items()):
        by.setdefault(c.model, []).append(g or "all")
    parts = [f"{m} ({len(gs)} groups)" if len(gs) > 3 else f"{m} ({', '.join(gs)})"
             for m, gs in by.items()]
    return f"published by backtest MASE: {', '.join(parts)}" if parts else ""


class _Selected:
    """Replaces the default candidate's rows of the series whose group (and level, under a
    hierarchy) published another one: the network alone (when the default is the
    combination: its predictions that went into the combination, `final_forecast`'s
    `alone`, not a second forward pass) or a comparator refitted on each series' history
    (`refit_forecast`, as a statistical champion is)."""

    def __init__(self, b: Batch, arrays, selection: dict) -> None:
        self.b, self.arrays, self.selection, self.cfg = b, arrays, selection, b.cfg
        self.index = {str(i): k for k, i in enumerate(arrays.ids.tolist())}
        self.keys = series_keys(arrays)      # each series' group (and level)

    def __call__(self, cols: dict, alone: list) -> dict:
        """`cols`: a chunk's default forecast; `alone`: the network's predictions
        `final_forecast` combined into it."""
        cfg, h, base = self.cfg, self.cfg.windows.horizon, default_model(self.cfg)
        if not cols:
            return cols
        models, ids = cols["model"][::h].astype(str), cols["unique_id"][::h]
        wants = np.array([published(self.selection, self.keys[self.index[str(i)]], cfg)
                          for i in ids], object)
        swap = (models == base) & (wants != base)
        if not swap.any():
            return cols
        frames = [{k: v[~np.repeat(swap, h)] for k, v in cols.items()}]
        for model in sorted(set(wants[swap])):
            series = np.array(sorted(self.index[str(i)] for i in ids[swap & (wants == model)]))
            frames.append(self._made(model, series, alone))
        return concat_columns(frames)

    def _made(self, model: str, series: np.ndarray, alone: list) -> dict:
        cfg, arrays = self.cfg, self.arrays
        if model == cfg.model.name:          # the network alone, where the default combines
            return network_forecast(arrays, alone, cfg, np.isin(np.arange(len(arrays)), series))
        m = season_of(cfg, arrays)
        cols, rest = refit_forecast(arrays, series, model, m, cfg.evaluate.history_cap(m),
                                    cfg.windows.horizon, self.b.runner)
        if len(rest):                        # nothing to refit on: the fallback
            cols = concat_columns([cols, final_forecast(
                arrays, [], {}, cfg, within=np.isin(np.arange(len(arrays)), rest))])
        return cols


@stage("forecast", R.forecast_made)
def registry_forecast(b: Batch, data: Prepared, by: str | None = None, calibration=None
                      ) -> Forecast:
    """Forecasts from the registered champions, no training: each with the windows, scaling
    and model of the run that trained it, and with `evaluate.intervals: conformal` the widths
    that run calibrated (`calibration`, this batch's backtest's, where it logged none).
    Groups without a champion get the fallback."""
    cfg, arrays, mine = b.cfg, data.arrays, calibration
    by = compare.resolve(cfg, by)[2]
    if by == "group" and arrays.groups is None:
        raise PipelineError("--by group needs data.group_col")
    champs = compare.load_champions(cfg, champion_jobs(cfg, arrays, by), by)
    if not champs.found and not champs.refused:     # refused ones: the fallback serves
        names = [n for _, n in champs.missing]
        raise PipelineError(
            f"no champion registered under {', '.join(names[:3])}"
            f"{' …' if len(names) > 3 else ''} at {redact(champs.uri)}; "
            "run `python -m pipeline compare --config ...` first")
    served = []
    for entries in champs.by_run().values():
        loader = None if entries[0].statistical else \
            loader_at(arrays, entries[0].config, arrays.lengths)    # one fit per run
        served.append((entries, None if loader is None else
                       checked_models(arrays, entries, loader),
                       loader, entries[0].calibration or mine))
    rest = None
    if champs.missing:
        rest = Job("rest", np.concatenate([j.series for j, _ in champs.missing]))
    used = [f"{c.version.name} v{c.version.version}" for c in champs.found]
    columns = _columns([cfg] + [e[0].config for e, *_ in served], [mine] + [s[3] for s in served])
    return Forecast(_champions_maker(b, arrays, served, rest, mine), columns,
                    note=f"champions {', '.join(used)}" if used else
                    f"every champion refused ({', '.join(champs.refused[:3])})",
                    fallback=fallback_name(cfg),
                    missing=[j.name for j, _ in champs.missing])


def _champions_maker(b: Batch, arrays, served: list, rest: Job | None, mine) -> Callable:
    """`Forecast.make` of the champions `served` ((entries, models or None for a statistical
    champion, loader, calibration) per run) and of the series without one (`rest`)."""
    cfg, n = b.cfg, len(arrays)

    def make(lo: int, hi: int) -> tuple[dict, list[str]]:
        frames, bad = [], []
        for entries, models, loader, cal in served:
            jobs = chunk_jobs([c.job for c in entries], lo, hi)
            if not any(len(j.series) for j in jobs):
                continue
            if models is None:
                frames += [_intervals(f, cal, cfg) for f in _refit(
                    b, arrays, entries, np.concatenate([j.series for j in jobs]))]
                continue
            within = np.zeros(n, bool)
            for j in jobs:
                within[j.series] = True
            frames.append(_intervals(final_forecast(
                arrays, jobs, models, entries[0].config, within=within, failed=bad,
                runner=b.runner, loader=loader), cal, cfg))
        if rest is not None:
            (part,) = chunk_jobs([rest], lo, hi)
            if len(part.series):
                frames.append(_intervals(final_forecast(arrays, [part], {}, cfg,
                                                        within=part.member(n),
                                                        runner=b.runner), mine, cfg))
        return concat_columns(frames), bad
    return make


def _intervals(cols: dict, cal, cfg: Config) -> dict:
    """The long columns with the conformal interval columns of `cal` (none without one)."""
    return with_intervals(cols, cal, cfg.windows.horizon) if cal is not None and cols else cols


def _columns(configs: list[Config], cals: list) -> list[str]:
    """The quantile columns of the models trained with `configs` and of the intervals of
    the calibrations `cals` (None: none), in the order the output writes them."""
    names = {quantile_column(q) for c in configs for q in c.model.quantiles}
    for cal in filter(None, cals):
        names |= set(interval_columns(cal.levels))
    return sorted(names, key=lambda k: float(k[2:]))


def _refit(b: Batch, arrays, entries: list[compare.Champion], series: np.ndarray
           ) -> list[dict]:
    """A statistical champion refitted on the recent history of its `series`; the series it
    cannot serve (no finite value) get the fallback."""
    spec, cfg = entries[0].model, entries[0].config
    cols, rest = refit_forecast(arrays, np.sort(series), spec.model, spec.season, spec.history,
                                spec.horizon, b.runner)
    frames = [cols] if cols else []
    if len(rest):
        within = np.zeros(len(arrays), bool)
        within[rest] = True
        frames.append(final_forecast(arrays, [], {}, cfg, within=within, runner=b.runner))
    return frames


def champion_jobs(cfg: Config, arrays, by: str) -> list[Job]:
    """Today's jobs as champions serve them: one per group (by="group") or one global."""
    return plan_jobs(arrays, compare.champion_config(cfg, cfg.to_dict(), by))


def checked_models(arrays, entries: list[compare.Champion], loader=None) -> dict:
    """{job name: champion model}, each checked to fit today's inputs (`loader`: the
    champions' `loader_at` at the series' ends, when the caller has it)."""
    if loader is None:
        loader = loader_at(arrays, entries[0].config, arrays.lengths)
    sizes = (loader.past_size, loader.future_size, loader.static_size)
    rows = {"series": len(arrays), "group": n_groups(arrays)}
    for c in entries:
        compare.check_inputs(c, sizes, rows)
    return {c.job.name: c.model for c in entries}


@stage("forecast", R.forecast_written)
def write_forecast(b: Batch, data: Prepared, fc: Forecast, scored=None) -> Forecast:
    """Make and write the forecast partition chunk by chunk (put in place once whole), then
    the plots. `scored`: the `stages.Scored` backtest, whose drawn rows the plots show beside
    the forecast."""
    cfg, arrays = b.cfg, data.arrays
    end = arrays.data_end()
    if data.levels is not None:         # data.hierarchy: every level reconciled, the
        fc = coherent(b, data, fc, scored)    # aggregates written to their own partitions
        fc.level_paths = write_levels(b, data, fc)
    chunks = _Chunks(b, data, fc)
    fc.path = output.write_stream(cfg, "forecasts", end, iter(chunks))
    fc.delta = cfg.output.format == "delta"
    fc.cols = concat_columns(chunks.drawn)
    drawn = scored.predictions if scored else None
    if cfg.evaluate.plots and not paths.is_remote(cfg.output.path):
        fc.plots = plot_sample(paths.partition(cfg, "plots", end), arrays, fc.cols,
                               drawn, cfg.evaluate.plots, cfg.windows.horizon,
                               quantiles_of(fc.cols, drawn),
                               ylabel=value_label(cfg))
    fc.failed = chunks.failed
    return fc


class _Chunks:
    """The forecast's chunks as Arrow tables of one schema; counts the series and the
    fallbacks into the Forecast and keeps the drawn series' rows."""

    def __init__(self, b: Batch, data: Prepared, fc: Forecast) -> None:
        self.b, self.arrays, self.fc = b, data.arrays, fc
        self.keys = KEYS[:5] + fc.columns + KEYS[5:]
        self.keep = set(self.arrays.ids[drawn_series(self.arrays, b.cfg.evaluate.plots)]
                        .astype(str))
        self.drawn: list[dict] = []
        self.failed: list[str] = []
        self.zero = None          # output.clip_at_zero: the ids whose history is all 0
        if b.cfg.output.clip_at_zero is True:
            arrays = self.arrays
            every = np.arange(len(arrays))
            self.zero = set(arrays.ids[ZeroHistory(arrays).all_zero(every, arrays.lengths)]
                            .astype(str).tolist())

    def __iter__(self):
        n, cfg, made = len(self.arrays), self.b.cfg, 0
        size, h = cfg.evaluate.chunk_series or max(n, 1), cfg.windows.horizon
        self.fc.n_series = self.fc.n_fallback = 0
        for lo in range(0, n, size):
            cols, bad = self.fc.make(lo, min(lo + size, n))
            self.failed += [j for j in bad if j not in self.failed]
            if not cols or not len(cols["unique_id"]):
                continue
            if self.zero is not None:
                cols = _clipped(cols, self.zero, h)
            ids, models = cols["unique_id"][::h], cols["model"][::h]    # one row per series
            self.fc.n_series += len(ids)
            self.fc.n_fallback += int(np.char.startswith(models.astype(str), "fallback:").sum())
            rows = np.repeat(np.fromiter((i in self.keep for i in ids), bool, len(ids)), h)
            self.drawn.append({k: v[rows] for k, v in cols.items()})
            made += 1
            yield output.frames_table([cols], self.b.run_id, self.arrays.freq, self.keys)
        if not made:
            yield output.frames_table([], self.b.run_id, self.arrays.freq)


def _clipped(cols: dict, zero: set, h: int) -> dict:
    """The published forecast under `output.clip_at_zero`: point, quantile and interval
    columns at least 0, and 0 for the series in `zero` (history all 0)."""
    ids = cols["unique_id"][::h]
    rows = np.repeat(np.fromiter((str(i) in zero for i in ids), bool, len(ids)), h)
    out = dict(cols)
    for k in ["y_hat", *(c for c in cols if c.startswith("q_"))]:
        v = np.maximum(cols[k], 0)
        v[rows] = 0
        out[k] = v
    return out


def _range(n: int, lo: int, hi: int) -> np.ndarray:
    out = np.zeros(n, bool)
    out[lo:hi] = True
    return out
