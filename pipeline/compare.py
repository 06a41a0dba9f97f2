"""Model comparison and forecasts from the Model Registry (DESIGN.md §7).

`compare` ranks the finished runs of the config's experiment by a backtest metric, prints the
leaderboard (overall and per group), picks the champion per group (or one global champion) and
points the registry alias `champion` at it. `registry_forecast` forecasts with the champions,
without training: each champion brings the resolved config of the run that trained it (its
windows, scaling and model), the current config brings the data. Imports mlflow only through
`pipeline.tracking`.
"""
from __future__ import annotations

import numpy as np

from pipeline import names, registry, tracking
from pipeline.config import Config, from_dict
from pipeline.errors import PipelineError

ALIAS = "champion"


def _open(cfg: Config, by: str | None) -> tuple[str, str, str]:
    if not cfg.tracking.enabled:
        raise PipelineError("tracking.enabled is false: comparing runs and the Model Registry "
                            "need MLflow tracking")
    uri = tracking.tracking_uri(cfg)
    tracking.check_server(uri, required=True)
    return uri, cfg.tracking.experiment or cfg.name, by or (
        "group" if cfg.data.group_col else "global")


def compare(cfg: Config, metric: str = "mase", by: str | None = None,
            all_cutoffs: bool = False, register: bool = True, alias: str = ALIAS):
    """Print the leaderboard, register the champions; returns the champions (polars)."""
    import polars as pl
    uri, exp, by = _open(cfg, by)
    cutoff = None if all_cutoffs else "latest"
    runs = registry.run_board(exp, metric, uri, cutoff)
    board = registry.leaderboard(exp, metric, uri, cutoff)
    champs = registry.champion_per_group(board, by)
    if not len(champs):
        raise PipelineError(
            f"no finished run in experiment {exp!r} at {tracking.redact(uri)} has a "
            f"{'per-group' if by == 'group' else 'global'} backtest_{metric}; run "
            f"`python -m pipeline run --config ...` first (or pass --by "
            f"{'global' if by == 'group' else 'group'})")
    where = "every cutoff" if all_cutoffs else f"cutoff {board['cutoff'].max()}"
    print(f"leaderboard  {metric} (lower is better), experiment {exp!r}, {where}, "
          f"{len(runs)} run(s)")
    print(f"  overall  {'rank':>4}  {'model':<16} {'mode':<10} {'batch':<18} {'run':<10} "
          f"{metric:>9} {'seas.naive':>10}")
    for i, r in enumerate(runs.iter_rows(named=True), 1):
        print(f"           {i:>4}  {r['model']:<16} {r['train_mode']:<10} "
              f"{str(r['batch_id']):<18} {r['run_id'][:8]:<10} {r['value']:>9.4f} "
              f"{_num(r['seasonal_naive']):>10}")
    rows = board.filter(pl.col("group") == "global") if by == "global" else \
        board.filter(~pl.col("group").is_in(["global", "all"]))
    print(f"  {'per group' if by == 'group' else 'global'}  {'group':<14} {'champion':<16} "
          f"{'run':<10} {metric:>9}   runner-up")
    for g in champs.iter_rows(named=True):
        others = rows.filter((pl.col("group") == g["group"]) &
                             (pl.col("run_id") != g["run_id"]))
        runner = (f"{others['model'][0]} {others['run_id'][0][:8]} {others['value'][0]:.4f}"
                  if len(others) else "-")
        print(f"             {g['group']:<14} {g['model']:<16} {g['run_id'][:8]:<10} "
              f"{g['value']:>9.4f}   {runner}")
    if not register:
        return champs
    for g in champs.iter_rows(named=True):
        group = None if by == "global" else g["group"]
        name = registry.registered_name(exp, group)
        current = registry.champion_version(name, alias, uri)
        if current is not None and current.tags.get("run_id") == g["run_id"] and \
                current.tags.get("group") == (group or "global"):
            print(f"champion     {name}@{alias} = version {current.version} (unchanged)")
            continue
        version = registry.register_champion(
            g["run_id"], name, alias, uri, group=group, model_file=g["model_file"],
            tags={"model": g["model"], "metric": metric, "value": g["value"],
                  "cutoff": g["cutoff"], "batch_id": g["batch_id"],
                  "parent_run_id": g["parent_run_id"]})
        print(f"champion     {name}@{alias} = version {version} ({g['model']}, "
              f"{metric} {g['value']:.4f}, run {g['run_id'][:8]})")
    return champs


def _num(v) -> str:
    return f"{v:.4f}" if v is not None and np.isfinite(v) else "-"


def champion_config(cfg: Config, raw: dict, by: str) -> Config:
    """The champion's resolved config with this run's data, output, Ray and tracking."""
    mine = cfg.to_dict()
    raw = dict(raw)
    for section in ("data", "output", "ray", "tracking", "name", "evaluate"):
        raw[section] = mine[section]
    raw["train"] = {**raw.get("train", {}), "mode": "per_group" if by == "group" else "global",
                    "per_group": {"packed": False}}
    return from_dict(raw)


def champions(cfg: Config, arrays, by: str | None = None):
    """The registered champions for the jobs of today's data: (by, uri, {champion's run id ->
    [(job, model, version)]}, [(job, registered name)] without a champion)."""
    from pipeline.jobs import plan_jobs
    uri, exp, by = _open(cfg, by)
    if by == "group" and arrays.groups is None:
        raise PipelineError("--by group needs data.group_col")
    jobs = plan_jobs(arrays, champion_config(cfg, cfg.to_dict(), by))
    by_source: dict[str, list] = {}
    missing = []
    for job in jobs:
        name, mv = registry.find_champion(exp, job.group, ALIAS, uri)
        if mv is None:
            missing.append((job, name))
            continue
        model = registry.load_champion(name, ALIAS, uri)
        by_source.setdefault(mv.tags.get("run_id") or mv.run_id, []).append((job, model, mv))
    return by, uri, by_source, missing


def _as_results(arrays, ccfg: Config, entries: list) -> list:
    """JobResults from loaded champions, after checking they fit today's inputs."""
    from pipeline.jobs import JobResult, loader_at, n_groups, state_bytes
    loader = loader_at(arrays, ccfg, arrays.lengths)
    results = []
    for job, model, mv in entries:
        spec = model.spec
        have = (loader.past_size, loader.future_size, loader.static_size)
        want = (spec["past_size"], spec["future_size"], spec["static_size"])
        if have != want:
            raise PipelineError(
                f"champion {mv.name} v{mv.version} for {job.name!r} expects (past, future, "
                f"static) input sizes {want}, the data gives {have}: data.past_covariates, "
                f"future_covariates, static_cols or calendar differ from its training run")
        kind = spec["model"].get("embedding", "none")
        rows = {"series": len(arrays), "group": n_groups(arrays)}.get(kind)
        if rows is not None and spec["num_embeddings"] != rows:
            raise PipelineError(
                f"champion {mv.name} v{mv.version} for {job.name!r} learned a {kind} embedding "
                f"for {spec['num_embeddings']} {kind} values, the data has {rows}: its "
                f"embedding rows no longer match; retrain (nightly) instead")
        results.append(JobResult(job.name, job.group, True, spec=spec,
                                 state=state_bytes(model)))
    return results


def registry_forecast(cfg: Config, arrays, by: str | None = None) -> tuple[dict, str]:
    """Forecast columns from the registered champions (no training) and a one-line summary.
    Groups without a champion get the seasonal-naive fallback, and are named."""
    from pipeline.backtest import concat_columns, final_forecast
    from pipeline.jobs import Job
    by, uri, by_source, missing = champions(cfg, arrays, by)
    if not by_source:
        raise PipelineError(
            f"no champion registered under {', '.join(n for _, n in missing[:3])}"
            f"{' …' if len(missing) > 3 else ''} at {tracking.redact(uri)}; run `python -m "
            f"pipeline compare --config ...` first")
    frames, used = [], []
    for run_id, entries in by_source.items():
        ccfg = champion_config(cfg, registry.run_config(run_id, uri), by)
        results = _as_results(arrays, ccfg, entries)
        used += [f"{mv.name} v{mv.version}" for _, _, mv in entries]
        within = np.zeros(len(arrays), bool)
        for job, _, _ in entries:
            within[job.series] = True
        frames.append(final_forecast(arrays, [e[0] for e in entries], results, ccfg,
                                     within=within))
    if missing:
        print(f"registry     no champion for {len(missing)} group(s) "
              f"({', '.join(j.name for j, _ in missing[:5])}): seasonal-naive fallback")
        rest = Job("rest", np.concatenate([j.series for j, _ in missing]))
        frames.append(final_forecast(arrays, [rest], [], cfg, within=rest.member(len(arrays))))
    return concat_columns(frames), f"champions {', '.join(used)}"


def champion_states(cfg: Config, arrays, jobs: list) -> dict[str, bytes]:
    """Warm start: job name -> the champion's weights, for the jobs whose champion has the
    architecture this config builds (same spec); the others train from scratch (named). A
    global job starts from the global champion, or, when champions are registered per group,
    from theirs if they are all one model (a global model promoted for every group)."""
    from pipeline.jobs import loader_at, n_groups, new_model, state_bytes
    by = "global" if cfg.train.mode == "global" else "group"
    _, _, by_source, missing = champions(cfg, arrays, by)
    if by == "global" and not by_source and arrays.groups is not None:
        _, _, per_group, _ = champions(cfg, arrays, "group")
        models = {(run, e[2].source) for run, entries in per_group.items() for e in entries}
        if len(models) == 1:
            (run, entries), = per_group.items()
            by_source, missing = {run: [(jobs[0], entries[0][1], entries[0][2])]}, []
    loader = loader_at(arrays, cfg, arrays.lengths)
    want = new_model(loader, cfg, len(arrays), n_groups(arrays)).spec
    out, fresh = {}, [j.name for j, _ in missing]
    for entries in by_source.values():
        for job, model, _ in entries:
            if model.spec != want:
                fresh.append(job.name)
                continue
            out[job.name] = state_bytes(model)
    names = {j.name for j in jobs}
    out = {k: v for k, v in out.items() if k in names}
    print(f"warm start   {len(out)} job(s) from the champion"
          + (f"; from scratch (no champion of this architecture): {', '.join(sorted(fresh)[:5])}"
             if fresh else ""))
    return out


def promote(cfg: Config, arrays, bt, log, final: list | None = None, metric: str = "mase"
            ) -> list[str]:
    """Challenger (this run) against champion (the registered model, re-scored now): register
    the challenger where its backtest `metric` is strictly lower, or where there is no valid
    champion. Both are scored on the backtest windows after the champion's own data cutoff
    (out of sample for both); when there are none (the same data again), on every window, and
    the output says the champion trained on them. Groups whose final model failed to train are
    not promoted. Returns the promoted groups."""
    from pipeline.backtest import backtest, concat_columns
    if log is None or not log.parent_id:
        raise PipelineError("promoting a champion needs MLflow tracking (tracking.enabled)")
    model = cfg.model.name
    by, uri, by_source, _ = champions(cfg, arrays, None)
    mine = concat_columns(bt.metrics)
    keys = sorted(set(mine["group"].astype(str))) if by == "group" else ["global"]
    ready = {("global" if by == "global" or r.group is None else str(r.group)) if r.ok else None
             for r in (final or [])}
    everyone = "global" in ready           # a global final model serves every group
    theirs: dict[str, tuple] = {}          # key -> (metric columns, model name, version)
    for run_id, entries in by_source.items():
        ccfg = champion_config(cfg, registry.run_config(run_id, uri), by)
        ccfg.windows.n_windows, ccfg.windows.step = cfg.windows.n_windows, cfg.windows.step
        if ccfg.windows.horizon != cfg.windows.horizon:
            raise PipelineError(f"the champion of {entries[0][0].name!r} forecasts "
                                f"{ccfg.windows.horizon} steps, this config "
                                f"{cfg.windows.horizon}: they cannot be compared")
        cbt = backtest(arrays, [e[0] for e in entries], _as_results(arrays, ccfg, entries),
                       ccfg)
        cols = concat_columns(cbt.metrics)
        for job, _, mv in entries:
            theirs[job.group if by == "group" else "global"] = (cols, ccfg.model.name, mv)
    exp = cfg.tracking.experiment or cfg.name
    print(f"promote      challenger {model} against the champions, backtest {metric}")
    promoted = []
    for g in keys:
        if final is not None and not (everyone or g in ready):
            print(f"  {g:<14} no final model (its training failed): not promoted")
            continue
        since, note = None, ""
        champ = theirs.get(g)
        if champ is not None:
            since = _label_time(champ[2].tags.get("cutoff"))
            if _score(mine, model, metric, g, by, since) is None or \
                    _score(champ[0], champ[1], metric, g, by, since) is None:
                since, note = None, "  (every window is in the champion's training data)"
        value = _score(mine, model, metric, g, by, since)
        if value is None or not np.isfinite(value):
            continue
        theirs_value = _score(champ[0], champ[1], metric, g, by, since) if champ else None
        valid = theirs_value is not None and np.isfinite(theirs_value)
        better = not valid or value < theirs_value
        was = (f"{theirs_value:.4f} ({champ[2].tags.get('model', '?')} v{champ[2].version})"
               if valid else "none")
        print(f"  {g:<14} challenger {value:.4f}  champion {was:<28} "
              f"{'-> promoted' if better else 'kept'}{note}")
        if not better:
            continue
        job = log.key(_Group(g)) if by == "group" else "global"
        run_id = log.tr.child(model, job)
        model_file = f"models/{names.model_file(model, g)}" if job == "all" else None
        version = registry.register_champion(
            run_id, registry.registered_name(exp, g if by == "group" else None), ALIAS, uri,
            group=g if by == "group" else None, model_file=model_file,
            tags={"model": model, "metric": metric, "value": value, "cutoff":
                  log.tr.run_tags.get("cutoff"), "batch_id": log.tr.run_tags.get("batch_id"),
                  "parent_run_id": log.parent_id})
        promoted.append(g)
        print(f"               registered version {version}")
    log.tr.log_metrics(log.parent_id, {"promoted_groups": len(promoted),
                                       "champion_groups": len(theirs)})
    return promoted


def _label_time(label: str | None):
    """'20240630T230000' -> numpy datetime64[ns] (None when missing or malformed)."""
    try:
        t = f"{label[:4]}-{label[4:6]}-{label[6:8]}T{label[9:11]}:{label[11:13]}:{label[13:15]}"
        return np.datetime64(t, "ns")
    except (TypeError, ValueError, IndexError):
        return None


def _score(cols: dict, model: str, metric: str, key: str, by: str, since=None) -> float | None:
    """`metric` of `model` summarised (as Backtest.summary does) over the per-series rows of
    group `key` (every row when by="global") whose cutoff is at or after `since`."""
    from pipeline import evaluate as E
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


class _Group:
    """A stand-in with the attributes RunLog.key reads."""

    def __init__(self, group: str):
        self.group = group
