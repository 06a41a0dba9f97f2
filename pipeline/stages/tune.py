"""The `tune` command's stage: search `tune.space` on Ray Tune (`pipeline.execution.ray_tune`), log
every trial as a child run of this run, write the best config as YAML `run` accepts.

    python -m pipeline tune --config configs/demo.yaml --trials 8 --time-budget 30

Trials train before the oldest backtest cutoff and are scored on their validation windows only
(`pipeline.tuning.trial`); the backtest that follows (the CLI runs it on the tuned config, as
`backtest` would) is the first look at the backtest windows. With `tune.per_group`, one search
per group: one tuned config per group (`<stem>.tuned.<group>.yaml`), no backtest of its own.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

import yaml

from pipeline import config as C
from pipeline import paths
from pipeline.data.io import write_bytes_atomic
from pipeline.data.prepare import Prepared
from pipeline.errors import PipelineError
from pipeline.names import safe_key
from pipeline.stages import record as R
from pipeline.stages.batch import Batch
from pipeline.stages.record import stage
from pipeline.tuning.space import check_space, tuned_yaml


@dataclass
class Tuned:
    """A search's outcome: each search's result, the best record and tuned config per search
    (key: the group, or None), where the configs went."""
    results: list
    raw: dict = field(default_factory=dict)         # the config as written (its tune: space)
    best: dict = field(default_factory=dict)        # group or None -> TrialRecord
    files: dict = field(default_factory=dict)       # group or None -> YAML path
    seconds: float = 0.0

    texts: dict = field(default_factory=dict)       # group or None -> the YAML written

    @property
    def records(self) -> list:
        return [r for res in self.results for r in res.records]

    def counts(self) -> dict[str, int]:
        """Trials by status: finished, stopped, failed."""
        return {s: sum(r.status == s for r in self.records)
                for s in ("finished", "stopped", "failed")}


def tuned_path(config_path: str | None, out: str | None, group: str | None = None) -> str:
    """`out`, else `<config stem>.tuned.yaml` beside the config (per group:
    `.tuned.<group>.yaml`; per group `out` is a folder)."""
    suffix = f".tuned.{safe_key(group)}.yaml" if group is not None else ".tuned.yaml"
    if out and group is None:
        return out
    if out:
        return os.path.join(out, f"tuned.{safe_key(group)}.yaml")
    stem = os.path.splitext(config_path or "config.yaml")[0]
    return stem + suffix


def with_budget(cfg: C.Config, trials: int | None, minutes: float | None) -> C.Config:
    """`--trials` / `--time-budget` over the config's `tune:` section."""
    values = {k: v for k, v in (("trials", trials), ("time_budget_minutes", minutes))
              if v is not None}
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, **values)) if values \
        else cfg


@stage("tune", R.tuned)
def tune(b: Batch, data: Prepared, trials: int | None = None, minutes: float | None = None,
         out: str | None = None) -> Tuned:
    """Run the search(es) and write the tuned config(s); see the module docstring."""
    cfg = with_budget(b.cfg, trials, minutes)
    if not cfg.ray.enabled:
        raise PipelineError("tune runs its trials on Ray Tune: set ray.enabled: true")
    raw = C.read_raw(b.config_path, b.overrides)
    domains = check_space(raw, cfg)
    from pipeline.execution.ray_tune import search, search_groups  # Ray Tune: the tune command only
    runs = b.log.trial_runs() if b.log is not None else None
    name, storage = f"{safe_key(cfg.name)}-{b.batch_id}", paths.tune_dir(cfg)
    print(f"tune: {len(domains)} key(s) ({', '.join(domains)}), {cfg.tune.trials} trial(s) "
          f"by {cfg.tune.search}, scheduler {cfg.tune.scheduler}, scored on validation "
          f"{cfg.tune.metric} before the oldest backtest cutoff")
    t0 = time.perf_counter()
    if cfg.tune.per_group:
        groups = sorted(set(data.arrays.groups.astype(str).tolist()))
        results = search_groups(data.arrays, raw, cfg, domains, storage, name, groups, runs)
    else:
        results = [search(data.arrays, raw, cfg, domains, storage, name, runs)]
    tuned = Tuned(results, raw, seconds=time.perf_counter() - t0)
    for res in results:
        best = res.best()
        if best is None:
            first = next((r.error for r in res.records if r.error), "no trial finished")
            raise PipelineError(f"tune: no trial of {res.group or 'the search'} has a score "
                                f"({first})")
        tuned.best[res.group] = best
        tuned.files[res.group], tuned.texts[res.group] = _write(b, cfg, raw, res, best, out)
    return tuned


def _write(b: Batch, cfg: C.Config, raw: dict, res, best, out: str | None
           ) -> tuple[str, str]:
    path = tuned_path(b.config_path, out, res.group)
    n = len(res.records)
    header = (f"tuned by `python -m pipeline tune` ({time.strftime('%Y-%m-%d %H:%M')}), "
              f"batch {b.batch_id}: best of {n} trial(s)"
              f"{f' for group {res.group}' if res.group is not None else ''}, trial "
              f"{best.trial_id}, validation {cfg.tune.metric} {best.score:.4f}"
              f"{f'; tune run {b.log.parent_id}' if b.log is not None and b.log.parent_id else ''}")
    text = tuned_yaml(raw, best.point, cfg.tune.metric, header)
    C.from_dict(yaml.safe_load(text))       # what `run` will load: refused here, not there
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_bytes_atomic(text.encode(), path)
    return path, text
