"""Reading the tracked runs back (DESIGN.md §7): leaderboards, champions and the Model Registry,
and the batch records of the flows. The tracking layer's second module (with pipeline.tracking,
the only ones that import mlflow); every read goes to the server fresh, never to a cached run id.
"""
from __future__ import annotations

import contextlib
import io
import re
import tempfile
import warnings
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.names import safe_key
from pipeline.tracking import (
    CONFIG_ARTIFACT,
    GROUP_TABLE_TAG,
    MODEL_NAME,
    MODEL_URI_TAG,
    ROLE,
    SUPERSEDED_TAG,
    _client,
    _finite,
    _quiet,
    example_inputs,
    log_torch_model,
    using,
)

# ------------------------------------------------------------------------------ batches

def batch_runs(uri: str, experiment: str, flow: str, config: str, batch_id: str,
               status: str) -> list[str]:
    """Parent runs of `experiment` tagged with this flow, config name and batch, in `status`
    (RUNNING, FINISHED, …), superseded ones left out. Configs sharing an experiment (a GRU and
    a CNN compared side by side) are separate batches."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id], max_results=1000,
        filter_string=(f"tags.`{ROLE}` = 'parent' and tags.flow = '{flow}' and "
                       f"tags.config = '{config}' and tags.batch_id = '{batch_id}' and "
                       f"attributes.status = '{status}'"))
    return [r.info.run_id for r in runs if SUPERSEDED_TAG not in r.data.tags]


def supersede(uri: str, parent_id: str) -> None:
    """Tag a parent run and its job runs as superseded (left out of comparisons)."""
    client = _client(uri)
    run = client.get_run(parent_id)
    kids = client.search_runs([run.info.experiment_id], max_results=10000,
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    for rid in [parent_id] + [k.info.run_id for k in kids]:
        client.set_tag(rid, SUPERSEDED_TAG, "true")


# ------------------------------------------------------------------------------ comparison

BOARD_SCHEMA = {"run_id": "String", "parent_run_id": "String", "batch_id": "String",
                "cutoff": "String", "model": "String", "group": "String", "metric": "String",
                "value": "Float64", "model_file": "String", "has_model": "Boolean"}


def _group_rows(client, run, metric: str) -> list[dict]:
    """Rows of a job run's per-group table (`metrics/per_group.parquet`)."""
    import polars as pl
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run.info.run_id, run.data.tags[GROUP_TABLE_TAG], tmp)
        df = pl.read_parquet(local)
    col = f"backtest_{metric}"
    if col not in df.columns:
        return []
    files = df["model_file"] if "model_file" in df.columns else [None] * len(df)
    return [{"group": str(g), "value": float(v), "model_file": f or None}
            for g, v, f in zip(df["group"], df[col], files, strict=True) if _finite(v)]


def leaderboard(experiment: str, metric: str = "mase", uri: str | None = None,
                cutoff: str | None = "latest"):
    """Finished job runs of `experiment` scored by their backtest `metric` (lower is better):
    a polars DataFrame with one row per (run, group) — group "global" for a model over every
    series, a group value for a per-group model or for a global model's score on that group's
    series (from the run's per-group table) — best first. `cutoff="latest"` keeps the runs of
    the latest data cutoff in the experiment (scores of different backtest periods do not
    compare); None keeps every cutoff. Always read fresh, never from a cached run id."""
    import polars as pl
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
            if GROUP_TABLE_TAG in tags:
                try:
                    table = _group_rows(client, r, metric)
                except (MlflowException, OSError) as e:   # one bad run does not stop compare
                    warnings.warn(f"run {r.info.run_id}: per-group table unreadable "
                                  f"({type(e).__name__}); left out", stacklevel=2)
                    table = []
                rows += [{**base, **row, "has_model": logged or bool(row["model_file"])}
                         for row in table]
        token = page.token
        if not token:
            break
    board = pl.DataFrame(rows, schema={k: getattr(pl, v) for k, v in BOARD_SCHEMA.items()})
    board = _at_cutoff(board, cutoff)
    return board.sort(["value", "run_id", "group"])


def _at_cutoff(board, cutoff: str | None):
    """The rows of one data cutoff: "latest" (the newest in `board`), a label, or None (all)."""
    import polars as pl
    if cutoff == "latest" and len(board):
        cutoff = board["cutoff"].drop_nulls().max()
    if cutoff is not None and len(board):
        board = board.filter(pl.col("cutoff") == cutoff)
    return board


def run_board(experiment: str, metric: str = "mase", uri: str | None = None,
              cutoff: str | None = "latest"):
    """Finished pipeline (parent) runs of `experiment` with their overall backtest `metric`
    and the seasonal-naive baseline's, best first (same cutoff rule as `leaderboard`)."""
    import polars as pl
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
    import polars as pl
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


def _tag_key(group: str) -> str:
    return f"{MODEL_URI_TAG}.{safe_key(group)}"


def model_source(run_id: str, group: str | None = None, model_file: str | None = None,
                 uri: str | None = None) -> str:
    """The logged model of a leaderboard row. A per-group model kept only as a file artifact
    (`tracking.child_runs: per_model`) is logged with the PyTorch flavor on first use (and the
    URI remembered in a run tag), so 10,000 groups cost 10,000 flavor logs only for the ones
    that get promoted."""
    client = _client(uri)
    tags = client.get_run(run_id).data.tags
    if not model_file:
        return tags.get(MODEL_URI_TAG, f"runs:/{run_id}/{MODEL_NAME}")
    key = _tag_key(group or "global")
    if key in tags:
        return tags[key]
    from pipeline.models import load_model
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(client.download_artifacts(run_id, model_file, tmp))
    model_uri = log_torch_model(run_id, model, example_inputs(model.spec), uri,
                                set_tag=False)
    client.set_tag(run_id, key, model_uri)
    return model_uri


def register_champion(run_id: str, name: str, alias: str = "champion",
                      uri: str | None = None, group: str | None = None,
                      model_file: str | None = None, tags: dict | None = None) -> str:
    """Register the model of `run_id` (of `group`, see `model_source`) under `name` and point
    `alias` at the new version. Returns the version."""
    client = _client(uri)
    source = model_source(run_id, group, model_file, uri)
    version_tags = {"run_id": run_id, "group": group or "global",
                    **{k: str(v) for k, v in (tags or {}).items()}}
    with using(uri), _quiet("mlflow.tracking._model_registry.client"), \
            contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        mv = mlflow.register_model(source, name, tags=version_tags)  # prints "Created…"
    client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def champion_version(name: str, alias: str = "champion", uri: str | None = None):
    """The ModelVersion `name@alias`, or None when there is no such model or alias. Any other
    error (server down, 5xx) is raised: it must not read as "no champion" and promote an
    untested challenger."""
    try:
        return _client(uri).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def load_champion(name: str, alias: str = "champion", uri: str | None = None):
    """The torch model registered as `name@alias`."""
    import mlflow.pytorch
    with using(uri):
        return mlflow.pytorch.load_model(f"models:/{name}@{alias}", map_location="cpu")


def run_config(run_id: str, uri: str | None = None) -> dict:
    """The resolved config (config.yaml artifact of the parent run) a job run was trained
    with, as a dict."""
    import yaml
    client = _client(uri)
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId", run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent, CONFIG_ARTIFACT, tmp)
        return yaml.safe_load(Path(path).read_text())
