"""Reading the tracked runs back (DESIGN.md §7): leaderboards, champions and the Model Registry,
the batch records of the flows, the config a run was trained with. Every read goes to the
server fresh, never to a cached run id. Writing is `runs.py` and `models.py`.
"""
from __future__ import annotations

import json
import re
import tempfile
import warnings
from pathlib import Path

import mlflow
import polars as pl
import yaml
from mlflow.exceptions import MlflowException

from pipeline.config import STATISTICAL
from pipeline.errors import PipelineError
from pipeline.evaluation.statistical import KIND, Statistical
from pipeline.models import SpecError, load_model
from pipeline.names import safe_key
from pipeline.tracking.connect import client as _client
from pipeline.tracking.connect import connect
from pipeline.tracking.models import KIND_TAG, MODEL_URI_TAG, SPEC, WEIGHTS
from pipeline.tracking.runs import (
    CALIBRATION_ARTIFACT,
    CONFIG_ARTIFACT,
    GROUP_TABLE_TAG,
    ROLE,
    SUPERSEDED_TAG,
)
from pipeline.tracking.runs import finite as _finite

# ------------------------------------------------------------------------------ batches

def batch_runs(uri: str, experiment: str, flow: str, config: str, batch_id: str,
               status: str, tag: str = "flow") -> list[str]:
    """Parent runs of `experiment` tagged with this flow (`tag` "command": this CLI command),
    config name and batch, in `status` (RUNNING, FINISHED, …), superseded ones left out.
    Configs sharing an experiment (a GRU and a CNN compared side by side) are separate
    batches."""
    if tag not in ("flow", "command"):
        raise ValueError(f"batch_runs: tag {tag!r} is neither 'flow' nor 'command'")
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], max_results=1000,
        filter_string=(f"tags.`{ROLE}` = 'parent' and tags.{tag} = '{flow}' and "
                       f"tags.config = '{config}' and tags.batch_id = '{batch_id}' and "
                       f"attributes.status = '{status}'"))
    return [r.info.run_id for r in runs if SUPERSEDED_TAG not in r.data.tags]


def child_runs(uri: str, parent_id: str) -> list[str]:
    """The job runs nested under parent run `parent_id`."""
    client = _client(uri)
    run = client.get_run(parent_id)
    kids = client.search_runs([run.info.experiment_id], max_results=10000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return [k.info.run_id for k in kids]


# ------------------------------------------------------------------------------ comparison

BOARD_SCHEMA = {"run_id": "String", "parent_run_id": "String", "batch_id": "String",
                "cutoff": "String", "model": "String", "group": "String", "metric": "String",
                "value": "Float64", "model_file": "String", "has_model": "Boolean"}


def _group_rows(client, run, metric: str) -> list[dict]:
    """Rows of a job run's per-group table (`metrics/per_group.parquet`)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run.info.run_id, run.data.tags[GROUP_TABLE_TAG], tmp)
        df = pl.read_parquet(local)
    col = f"backtest_{metric}"
    files = df["model_file"] if "model_file" in df.columns else [None] * len(df)
    rows = [] if col not in df.columns else [
        {"group": str(g), "value": float(v), "model_file": f or None}
        for g, v, f in zip(df["group"], df[col], files, strict=True) if _finite(v)]
    for name in STATISTICAL:       # the comparators scored in the same backtest
        if f"{name}_{metric}" in df.columns:
            rows += [{"group": str(g), "value": float(v), "model_file": None, "model": name,
                      "has_model": True}
                     for g, v in zip(df["group"], df[f"{name}_{metric}"], strict=True)
                     if _finite(v)]
    return rows


def leaderboard(experiment: str, metric: str = "mase", uri: str | None = None,
                cutoff: str | None = "latest"):
    """Finished job runs of `experiment` scored by their backtest `metric` (lower is better):
    a polars DataFrame with one row per (run, group) — group "global" for a model over every
    series, a group value for a per-group model or for a global model's score on that group's
    series (from the run's per-group table) — best first. `cutoff="latest"` keeps the runs of
    the latest data cutoff in the experiment (scores of different backtest periods do not
    compare); None keeps every cutoff. Always read fresh, never from a cached run id."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    rows: list[dict] = []
    token = None
    while exp is not None:
        page = client.search_runs(
            [exp.experiment_id], max_results=1000, page_token=token,
            filter_string=f"tags.`{ROLE}` = 'job' and attributes.status = 'FINISHED'")
        for r in page:
            tags = r.data.tags
            if SUPERSEDED_TAG in tags:
                continue
            logged = MODEL_URI_TAG in tags
            base = {"run_id": r.info.run_id, "parent_run_id": tags.get("mlflow.parentRunId"),
                    "batch_id": tags.get("batch_id"), "cutoff": tags.get("cutoff"),
                    "model": tags.get("model", ""), "metric": metric, "model_file": None,
                    "has_model": logged}
            group = tags.get("group", "global")
            value = r.data.metrics.get(f"backtest_{metric}")
            if group != "all" and _finite(value):
                rows.append({**base, "group": group, "value": float(value)})
            if group != "all":     # the comparators: statistical models, nothing to log
                rows += [{**base, "group": group, "model": name, "has_model": True,
                          "value": float(r.data.metrics[f"{name}_{metric}"])}
                         for name in STATISTICAL
                         if _finite(r.data.metrics.get(f"{name}_{metric}"))]
            if GROUP_TABLE_TAG in tags:
                try:
                    table = _group_rows(client, r, metric)
                except (MlflowException, OSError) as e:   # one bad run does not stop compare
                    warnings.warn(f"run {r.info.run_id}: per-group table unreadable "
                                  f"({type(e).__name__}); left out", stacklevel=2)
                    table = []
                rows += [{**base, "has_model": logged or bool(row["model_file"]), **row}
                         for row in table]
        token = page.token
        if not token:
            break
    board = pl.DataFrame(rows, schema={k: getattr(pl, v) for k, v in BOARD_SCHEMA.items()})
    board = _at_cutoff(board, cutoff)
    return board.sort(["value", "run_id", "group"])


def _at_cutoff(board, cutoff: str | None):
    """The rows of one data cutoff: "latest" (the newest in `board`), a label, or None (all)."""
    if cutoff == "latest" and len(board):
        cutoff = board["cutoff"].drop_nulls().max()
    if cutoff is not None and len(board):
        board = board.filter(pl.col("cutoff") == cutoff)
    return board


def run_board(experiment: str, metric: str = "mase", uri: str | None = None,
              cutoff: str | None = "latest"):
    """Finished pipeline (parent) runs of `experiment` with their overall backtest `metric`
    and the seasonal-naive baseline's, best first (same cutoff rule as `leaderboard`)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    rows = []
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], max_results=5000,
        filter_string=f"tags.`{ROLE}` = 'parent' and attributes.status = 'FINISHED'")
    for r in runs:
        value = r.data.metrics.get(f"backtest_{metric}")
        if _finite(value) and SUPERSEDED_TAG not in r.data.tags:
            t = r.data.tags
            rows.append({"run_id": r.info.run_id, "batch_id": t.get("batch_id"),
                         "cutoff": t.get("cutoff"), "model": t.get("model", ""),
                         "train_mode": t.get("train_mode", ""), "value": float(value),
                         "seasonal_naive": r.data.metrics.get(f"seasonal_naive_{metric}")})
    schema = {"run_id": pl.String, "batch_id": pl.String, "cutoff": pl.String,
              "model": pl.String, "train_mode": pl.String, "value": pl.Float64,
              "seasonal_naive": pl.Float64}
    board = pl.DataFrame(rows, schema=schema)
    board = _at_cutoff(board, cutoff)
    return board.sort(["value", "run_id"])


def champion_per_group(board, by: str = "group"):
    """The best (lowest value) row per group among the rows whose model was logged (a job
    whose final training failed has a score but no model), groups sorted. by="group": the
    per-group rows (any model whose score on that group is known, a global model's included);
    by="global": the best of the models trained over every series (group "global")."""
    board = board.filter(pl.col("has_model"))
    rows = board.filter(pl.col("group") == "global") if by == "global" else \
        board.filter(~pl.col("group").is_in(["global", "all"]))
    return rows.sort(["value", "run_id"]).group_by("group", maintain_order=True).first() \
        .sort("group")


def _safe_name(text: str) -> str:
    """Characters outside [A-Za-z0-9_.-] become `_` (registry names, tag keys)."""
    return re.sub(r"[^\w.\-]", "_", text)


def registered_name(experiment: str, group: str | None = None) -> str:
    """Model Registry name of a champion: `<experiment>` for the global one,
    `<experiment>.<group>` per group."""
    base = _safe_name(experiment)
    return base if group in (None, "global") else f"{base}.{safe_key(group)}"


def find_champion(experiment: str, group: str | None, alias: str = "champion",
                  uri: str | None = None):
    """(registered name, ModelVersion or None) of a group's champion. A group value that is no
    safe name was registered, before `safe_key`, as `<experiment>.<value with _>`, a name that
    could be another group's: such a version is taken only if its `group` tag is this group."""
    name = registered_name(experiment, group)
    mv = champion_version(name, alias, uri)
    legacy = _safe_name(f"{experiment}.{group}") if group not in (None, "global") else name
    if mv is None and legacy != name:
        old = champion_version(legacy, alias, uri)
        if old is not None and old.tags.get("group") == group:
            return legacy, old
    return name, mv


def champion_version(name: str, alias: str = "champion", uri: str | None = None):
    """The ModelVersion `name@alias`, or None when there is no such model or alias. Any other
    error (server down, 5xx) is raised: it must not read as "no champion" and promote an
    untested challenger."""
    client = _client(uri)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        # MLflow's basic-auth server (docker/compose.yaml) answers 403, not 404, for an alias
        # of a model that does not exist; its search lists every model the user may read
        if e.error_code == "PERMISSION_DENIED" and not _registered(client, name):
            return None
        raise


def _registered(client, name: str) -> bool:
    """Whether a registered model `name` exists (that this user may see)."""
    quoted = name.replace("\\", "\\\\").replace("'", "\\'")
    found = client.search_registered_models(filter_string=f"name = '{quoted}'")
    return any(m.name == name for m in found)


def load_champion(name: str, alias: str = "champion", uri: str | None = None,
                  horizon: int | None = None):
    """The model registered as `name@alias`, rebuilt from the weights file of its logged model
    (spec + state dict, read with weights_only=True): nothing from the registry is unpickled,
    so a version whose artifact is a pickle cannot run code here; it is refused by name, as is
    a spec whose sizes are out of bounds or not its weights' (checked before the model is
    built: `models.seq2seq.check_spec`). A statistical model (version tag kind=statistical)
    comes back as its `Statistical` spec, checked (`horizon`: the run's)."""
    client = _client(uri)
    mv = client.get_model_version_by_alias(name, alias)
    where = mv.source
    if where.startswith("models:/"):      # a logged model: its artifacts' location
        where = client.get_logged_model(where.removeprefix("models:/")).artifact_location
    if mv.tags.get(KIND_TAG) == KIND:
        return _load_spec(name, alias, mv, where, uri, horizon)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/{WEIGHTS}",
                                                       dst_path=tmp, tracking_uri=connect(uri))
        except (MlflowException, OSError) as e:
            raise PipelineError(f"{name}@{alias} (version {mv.version}) has no {WEIGHTS} to "
                                f"load ({type(e).__name__}); only models this pipeline logged "
                                "are loaded") from None
        try:
            return load_model(path)
        except SpecError as e:
            raise PipelineError(f"{name}@{alias} (version {mv.version}): {WEIGHTS} refused, "
                                f"{e}") from None
        except Exception as e:  # noqa: BLE001 - whatever the file holds, it is refused
            raise PipelineError(f"{name}@{alias} (version {mv.version}): {WEIGHTS} is not a "
                                f"weights-only model file ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None


def _load_spec(name: str, alias: str, mv, where: str, uri: str | None,
               horizon: int | None = None) -> Statistical:
    """The `Statistical` of a version holding SPEC (JSON, nothing executed)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/{SPEC}",
                                                       dst_path=tmp, tracking_uri=connect(uri))
            spec = json.loads(Path(path).read_text())
        except (MlflowException, OSError, ValueError) as e:
            raise PipelineError(f"{name}@{alias} (version {mv.version}) has no readable "
                                f"{SPEC} ({type(e).__name__})") from None
    return Statistical.from_spec(spec, f"{name}@{alias} (version {mv.version}) {SPEC}", horizon)


COMPARATOR_TAGS = ("season", "history", "horizon")   # tagged "comparator_<key>" on a parent


def comparator_settings(run_id: str, uri: str | None = None) -> dict:
    """{season, history, horizon} the comparators of run `run_id` (a parent or job run) were
    scored with, from the parent run's tags (missing ones are None)."""
    client = _client(uri)
    tags = client.get_run(run_id).data.tags
    if "mlflow.parentRunId" in tags:
        tags = client.get_run(tags["mlflow.parentRunId"]).data.tags
    values = {k: tags.get(f"comparator_{k}") for k in COMPARATOR_TAGS}
    return {k: int(v) if v is not None and v.isdigit() else v for k, v in values.items()}


def run_config(run_id: str, uri: str | None = None) -> dict:
    """The resolved config (config.yaml artifact of the parent run) a job run was trained
    with, as a dict."""
    return yaml.safe_load(_parent_artifact(run_id, CONFIG_ARTIFACT, uri))


def run_calibration(run_id: str, uri: str | None = None) -> str | None:
    """The conformal widths (JSON, `calibration.Calibration.to_json`) the run's backtest
    logged with `evaluate.intervals: conformal`; None when it logged none."""
    try:
        return _parent_artifact(run_id, CALIBRATION_ARTIFACT, uri)
    except (MlflowException, OSError):
        return None


def _parent_artifact(run_id: str, name: str, uri: str | None) -> str:
    """The text of artifact `name` of the run's parent (the run itself when it has none)."""
    client = _client(uri)
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId", run_id)
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(parent, name, tmp)).read_text()
