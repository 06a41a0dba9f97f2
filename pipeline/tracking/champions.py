"""Model comparison and champions (DESIGN.md §7), on the tracked runs and the Model Registry.

`compare` ranks the finished runs of the config's experiment by a backtest metric, picks the
champion per group (or one global champion) and points the registry alias `champion` at it.
`load_champions` brings back the registered champions for today's jobs, each with the resolved
config of the run that trained it (its windows, scaling and model; the current config brings
the data). `promote` registers a challenger where its backtest beats the champion's on the
windows neither has trained on. Scoring and forecasting are the stages' (`pipeline.stages.steps`);
this module decides and registers. MLflow only through `pipeline.tracking`.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from pipeline import tracking
from pipeline.config import STATISTICAL, Config, from_dict
from pipeline.data.calendar import Freq, to_datetime64
from pipeline.errors import PipelineError
from pipeline.evaluation import metrics as E
from pipeline.evaluation.statistical import KIND, Statistical
from pipeline.forecasting.intervals import Calibration
from pipeline.names import model_file
from pipeline.tracking import models as tracked_models
from pipeline.tracking import read

ALIAS = "champion"


def resolve(cfg: Config, by: str | None) -> tuple[str, str, str]:
    """(tracking URI, experiment, by) for the Model Registry of `cfg`; the server checked."""
    if not cfg.tracking.enabled:
        raise PipelineError("tracking.enabled is false: comparing runs and the Model Registry "
                            "need MLflow tracking")
    uri = tracking.tracking_uri(cfg)
    tracking.check_server(uri, required=True)
    return uri, cfg.tracking.experiment or cfg.name, by or (
        "group" if cfg.data.group_col else "global")


@dataclass
class Comparison:
    """What `compare` saw and did: the parent runs, the per-(run, group) scores, the champion
    rows and, per champion, the registered version (None: unchanged)."""
    metric: str
    experiment: str
    where: str
    by: str
    runs: pl.DataFrame
    board: pl.DataFrame
    champions: pl.DataFrame
    registered: dict[str, tuple[str, str, bool]] = field(default_factory=dict)  # group ->
    # (name, version, changed)


def compare(cfg: Config, metric: str = "mase", by: str | None = None,
            all_cutoffs: bool = False, register: bool = True) -> Comparison:
    """Rank the runs, pick the champions, register them unless `register` is false."""
    tracking.quiet_logs()          # no "Downloading artifacts" bars while configs are read
    uri, exp, by = resolve(cfg, by)
    cutoff = None if all_cutoffs else "latest"
    board = read.leaderboard(exp, metric, uri, cutoff)
    champs = read.champion_per_group(board, by)
    if not len(champs):
        raise PipelineError(
            f"no finished run in experiment {exp!r} at {tracking.redact(uri)} has a "
            f"{'per-group' if by == 'group' else 'global'} backtest_{metric}; run "
            f"`python -m pipeline run --config ...` first (or pass --by "
            f"{'global' if by == 'group' else 'group'})")
    out = Comparison(metric, exp, "every cutoff" if all_cutoffs else
                     f"cutoff {board['cutoff'].max()}", by,
                     read.run_board(exp, metric, uri, cutoff), board, champs)
    for g in champs.iter_rows(named=True) if register else []:
        group = None if by == "global" else g["group"]
        name = read.registered_name(exp, group)
        current = read.champion_version(name, ALIAS, uri)
        if current is not None and current.tags.get("run_id") == g["run_id"] and \
                current.tags.get("group") == (group or "global") and \
                current.tags.get("model", g["model"]) == g["model"]:
            out.registered[g["group"]] = (name, str(current.version), False)
            continue
        tags = {"model": g["model"], "metric": metric, "value": g["value"],
                "cutoff": g["cutoff"], "batch_id": g["batch_id"],
                "parent_run_id": g["parent_run_id"]}
        client = tracking.client(uri)
        if g["model"] in STATISTICAL:
            spec = statistical_spec(g["model"], read.comparator_settings(
                g["parent_run_id"] or g["run_id"], uri))
            version = tracked_models.register_spec(client, g["run_id"], name, ALIAS, spec.spec,
                                                   group=group, tags=tags)
        else:
            version = tracked_models.register(client, g["run_id"], name, ALIAS, group=group,
                                              model_file=g["model_file"], tags=tags)
        out.registered[g["group"]] = (name, version, True)
    return out


def statistical_spec(model: str, settings: dict) -> Statistical:
    """The registered spec of comparator `model` from its run's settings (`season`,
    `history`, `horizon`: `RunLog.backtest` tags them on the parent run)."""
    return Statistical.from_spec({"kind": KIND, "model": model, **settings},
                                 f"the {model} comparator's run settings")


def champion_config(cfg: Config, raw: dict, by: str) -> Config:
    """The champion's resolved config with this run's data, output, Ray and tracking."""
    mine = cfg.to_dict()
    raw = dict(raw)
    for section in ("data", "output", "ray", "tracking", "name", "evaluate"):
        raw[section] = mine[section]
    raw["train"] = {**raw.get("train", {}), "mode": "per_group" if by == "group" else "global",
                    "per_group": {"packed": False}}
    return from_dict(raw)


@dataclass
class Champion:
    job: object               # the pipeline.training.plan.Job it serves
    model: object             # the EncoderDecoder, loaded from weights only, or a Statistical
    version: object           # its ModelVersion
    config: Config            # the config that trained it, with today's data settings
    calibration: object = None  # its run's conformal widths (`calibration.Calibration`), when
                                # it logged them and today's config asks for intervals

    @property
    def statistical(self) -> bool:
        return isinstance(self.model, Statistical)

    @property
    def name(self) -> str:
        """The model's name in backtest rows: the comparator's, or the trained model's."""
        return self.model.model if self.statistical else self.config.model.name


@dataclass
class Champions:
    by: str
    uri: str
    found: list[Champion]
    missing: list[tuple[object, str]]   # (job, registered name) without a champion
    refused: list[str] = field(default_factory=list)   # names whose champion was refused

    def by_run(self) -> dict[str, list[Champion]]:
        """Champions grouped by the run that trained them (one config each)."""
        out: dict[str, list[Champion]] = {}
        for c in self.found:      # a run's comparator champions apart from its own model
            run = c.version.tags.get("run_id") or c.version.run_id
            out.setdefault(f"{run}/{c.name}" if c.statistical else run, []).append(c)
        return out


def load_champions(cfg: Config, jobs: list, by: str) -> Champions:
    """The registered champion of every job of today's data (`jobs`: one per group with
    by="group", one global job otherwise), each with its training run's config. What the
    registry gives back is checked against today's config (`_load`): a champion that
    disagrees is refused in one warning naming it and its job joins `missing` (its group gets
    the fallback; a flow promotes the challenger there)."""
    uri, exp, by = resolve(cfg, by)
    found, missing, refused, runs = [], [], [], {}
    for job in jobs:
        name, mv = read.find_champion(exp, job.group, ALIAS, uri)
        if mv is None:
            missing.append((job, name))
            continue
        try:
            found.append(_load(cfg, job, name, mv, uri, by, runs))
        except PipelineError as e:
            warnings.warn(f"champion {name} v{mv.version} refused: {e}; its series get the "
                          "fallback forecast", stacklevel=2)
            missing.append((job, name))
            refused.append(name)
    return Champions(by, uri, found, missing, refused)


def _load(cfg: Config, job, name: str, mv, uri: str, by: str, runs: dict) -> Champion:
    """One champion, its run's config and calibration (read once per run, in `runs`), each
    checked: the model's horizon is today's `windows.horizon`, the conformal widths are
    sane (`Calibration.from_json`), the weights' spec fits its weights (`load_champion`)."""
    horizon = cfg.windows.horizon
    run_id = mv.tags.get("run_id") or mv.run_id
    if run_id not in runs:
        config = champion_config(cfg, read.run_config(run_id, uri), by)
        text = read.run_calibration(run_id, uri) \
            if cfg.evaluate.intervals == "conformal" else None
        try:
            cal = Calibration.from_json(text, horizon) if text else None
        except ValueError as e:
            raise PipelineError(f"its run's {tracking.CALIBRATION_ARTIFACT}: {e}") from None
        runs[run_id] = (config, cal)
    config, cal = runs[run_id]
    model = read.load_champion(name, ALIAS, uri, horizon=horizon)
    got = model.horizon if isinstance(model, Statistical) else model.spec.get("horizon")
    if got != horizon or config.windows.horizon != horizon:
        raise PipelineError(f"it forecasts {got} steps (its run {config.windows.horizon}), "
                            f"this run's windows.horizon is {horizon}")
    return Champion(job, model, mv, config, cal)


def scoring_config(cfg: Config, champ: Champion) -> Config:
    """The config a champion is re-scored with on this run's backtest windows: a trained
    model alone (no comparators), or a statistical one as the comparator with its settings."""
    c = champ.config
    ev = dataclasses.replace(c.evaluate, comparators=[champ.model.model],
                             comparator_history=champ.model.history,
                             season=champ.model.season) if champ.statistical else \
        dataclasses.replace(c.evaluate, comparators=[])
    windows = dataclasses.replace(c.windows, n_windows=cfg.windows.n_windows,
                                  step=cfg.windows.step)
    return dataclasses.replace(c, windows=windows, evaluate=ev)


def check_inputs(champ: Champion, sizes: tuple[int, int, int], rows: dict[str, int]) -> None:
    """Refuse a champion whose inputs no longer fit today's data: `sizes` = the loader's
    (past, future, static) widths, `rows` = the embedding rows per kind (series, group)."""
    spec, mv, name = champ.model.spec, champ.version, champ.job.name
    want = (spec["past_size"], spec["future_size"], spec["static_size"])
    if sizes != want:
        raise PipelineError(
            f"champion {mv.name} v{mv.version} for {name!r} expects (past, future, static) "
            f"input sizes {want}, the data gives {sizes}: data.past_covariates, "
            f"future_covariates, static_cols or calendar differ from its training run")
    kind = spec["model"].get("embedding", "none")
    if kind in rows and spec["num_embeddings"] != rows[kind]:
        raise PipelineError(
            f"champion {mv.name} v{mv.version} for {name!r} learned a {kind} embedding for "
            f"{spec['num_embeddings']} {kind} values, the data has {rows[kind]}: its embedding "
            "rows no longer match; retrain (nightly) instead")


def warm_states(champs: Champions, want_spec: dict, state_bytes) -> tuple[dict, list[str]]:
    """Warm start: {job name: the champion's weights} for the champions with the architecture
    this config builds (`want_spec`), and the job names that train from scratch."""
    out, fresh = {}, [job.name for job, _ in champs.missing]
    for c in champs.found:
        if c.model.spec == want_spec:
            out[c.job.name] = state_bytes(c.model)
        else:
            fresh.append(c.job.name)
    return out, sorted(fresh)


@dataclass
class Decision:
    group: str
    challenger: float | None
    champion: float | None
    champion_label: str
    promoted: bool
    note: str = ""
    version: str | None = None
    challenger_model: str = ""     # the run's model or the comparator that scored best


def promote(cfg: Config, log, champs: Champions, mine: dict, theirs: dict, freq: Freq,
            final: list | None = None, metric: str = "mase",
            statistical: dict | None = None) -> list[Decision]:
    """Challenger (this run: per-series metric columns `mine`) against the champions (their
    re-scored columns `theirs`, {champion's job name: columns}): register the challenger
    where its backtest `metric` is lower than the champion's by more than
    `promote.min_improvement` of it, or where there is no valid champion. The
    challenger of a group is the best of the run's model and its comparators
    (`evaluate.comparators`); a comparator is registered as its `Statistical` spec
    (`statistical`: {comparator name: Statistical}), the model as its weights. Both
    are scored on the backtest windows after the champion's own data cutoff (out of sample for
    both); when there are none (the same data again), on every window, noted. Groups whose
    final model failed to train are not promoted."""
    by, model = champs.by, cfg.model.name
    mine = _cutoff_times(mine, freq)
    candidates = [model, *cfg.evaluate.comparators]
    theirs = {k: _cutoff_times(v, freq) for k, v in theirs.items()}
    keys = sorted(set(mine["group"].astype(str))) if by == "group" else ["global"]
    ready = {("global" if by == "global" or r.group is None else str(r.group)) if r.ok else None
             for r in (final or [])}
    held = {(c.job.group if by == "group" else "global"): c for c in champs.found}
    out = []
    for g in keys:
        if final is not None and not ("global" in ready or g in ready):
            out.append(Decision(g, None, None, "", False, "no final model (its training "
                                "failed): not promoted"))
            continue
        champ = held.get(g)
        cols = theirs.get(champ.job.name) if champ else None
        since, note = None, ""
        if champ is not None:
            since = _label_time(champ.version.tags.get("cutoff"))
            if _score(mine, model, metric, g, by, since) is None or \
                    _score(cols, champ.name, metric, g, by, since) is None:
                since, note = None, "(every window is in the champion's training data)"
        value, winner = _best(mine, candidates, metric, g, by, since)
        if value is None or not np.isfinite(value):
            continue
        held_value = _score(cols, champ.name, metric, g, by, since) if champ else None
        d = _decide(g, value, winner, held_value, champ, note, cfg.promote.min_improvement)
        if d.promoted:
            d.version = _register(cfg, log, champs.uri, g, by, value, metric,
                                  (statistical or {}).get(winner))
        out.append(d)
    log.metrics({"promoted_groups": sum(d.promoted for d in out),
                 "champion_groups": len(champs.found)})
    return out


def _decide(group: str, value: float, winner: str, held: float | None, champ, note: str,
            margin: float) -> Decision:
    """Promote where there is no valid champion score, or where the challenger's `value` is
    below the champion's `held` by more than `margin` of it (noted when it is better by less)."""
    valid = held is not None and np.isfinite(held)
    label = f"{champ.version.tags.get('model', '?')} v{champ.version.version}" if valid else \
        "none"
    better = not valid or value < held * (1 - margin)
    if valid and not better and value < held:
        note = f"{note} better by less than promote.min_improvement {margin:g}".strip()
    return Decision(group, value, held if valid else None, label, better, note,
                    challenger_model=winner)


def _best(mine: dict, candidates: list[str], metric: str, key: str, by: str, since
          ) -> tuple[float | None, str]:
    """(value, model) of the candidate with the lowest finite `metric` (the first on ties);
    (None, first candidate) when none has one."""
    scored = [(v, i, m) for i, m in enumerate(candidates)
              if (v := _score(mine, m, metric, key, by, since)) is not None and np.isfinite(v)]
    return (min(scored)[0], min(scored)[2]) if scored else (None, candidates[0])


def _register(cfg: Config, log, uri: str, group: str, by: str, value: float,
              metric: str, spec: Statistical | None = None) -> str:
    model, key = cfg.model.name, log.key_of(group) if by == "group" else "global"
    exp = cfg.tracking.experiment or cfg.name
    name = read.registered_name(exp, group if by == "group" else None)
    if spec is not None:                 # a comparator won: its name and settings
        return tracked_models.register_spec(
            tracking.client(uri), log.parent_id, name, ALIAS, spec.spec,
            group=group if by == "group" else None,
            tags={"model": spec.model, "metric": metric, "value": value, **log.batch_tags,
                  "parent_run_id": log.parent_id})
    return tracked_models.register(
        tracking.client(uri), log.job_run(key), name, ALIAS, group=group if by == "group" else None,
        model_file=f"models/{model_file(model, group)}" if key == "all" else None,
        tags={"model": model, "metric": metric, "value": value, **log.batch_tags,
              "parent_run_id": log.parent_id})


def _cutoff_times(cols: dict, freq: Freq) -> dict:
    """Per-series metric columns with `cutoff` (grid ordinals) as datetime64, as labels are."""
    return {**cols, "cutoff": to_datetime64(cols["cutoff"], freq)} if cols else cols


def _label_time(label: str | None):
    """'20240630T230000' -> numpy datetime64[ns] (None when missing or malformed)."""
    try:
        t = f"{label[:4]}-{label[4:6]}-{label[6:8]}T{label[9:11]}:{label[11:13]}:{label[13:15]}"
        return np.datetime64(t, "ns")
    except (TypeError, ValueError, IndexError):
        return None


def _score(cols: dict | None, model: str, metric: str, key: str, by: str,
           since=None) -> float | None:
    """`metric` of `model` summarised (as Backtest.summary does) over the per-series rows of
    group `key` (every row when by="global") whose cutoff is at or after `since`."""
    if not cols:
        return None
    sel = cols["model"].astype(str) == model
    if by == "group":
        sel &= cols["group"].astype(str) == key
    if since is not None:
        sel &= cols["cutoff"] >= since
    if not sel.any():
        return None
    names = [k for k in cols if k not in ("unique_id", "cutoff", "model", "group")]
    return E.summarize({k: cols[k][sel] for k in names}).get(metric)
