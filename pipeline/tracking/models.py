"""Models in MLflow: logged into a run, registered in the Model Registry.

A logged model (an MLflow 3 LoggedModel of the run's experiment, linked to its run) holds two
things: `weights.pt`, the model's spec and state dict (`pipeline.models.save_model`), which is
all the pipeline ever loads back (`read.load_champion`, with `torch.load(weights_only=True)`:
no code runs from the registry); and the PyTorch flavor for people (`mlflow.pytorch.load_model`
on the model's URI predicts identically on any batch size). The flavor is saved in the "pickle"
format: mlflow 3's "pt2" (torch.export) reloads a GraphModule specialised to the example's
shapes that loses the optional inputs. Its signature and input example describe the tensors of
`example_inputs`: a lone tensor `x` for models with no other inputs, else a dict of named
tensors {x, xf, static, idx} (call the reloaded module with `**batch`).

A statistical champion (a comparator that won, `pipeline.evaluation.statistical`) is a LoggedModel
holding only `spec.json` (its name and settings), its version tagged kind=statistical
(`register_spec`); `read.load_champion` returns it as a `Statistical`, refitted at forecast
time. Both kinds become versions through the same `_version`.

Everything goes through the `MlflowClient` it is given, bound to the run's URI: no global
state is set.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput
from mlflow.models import infer_signature

from pipeline.models import load_model, save_model
from pipeline.names import safe_key

WEIGHTS = "weights.pt"      # spec + state dict inside every logged model
SPEC = "spec.json"          # a statistical model's name and settings (no weights)
KIND_TAG = "kind"           # "statistical" on a statistical model's version; absent: neural
MODEL_NAME = "model"
MODEL_URI_TAG = "pipeline.model_uri"        # on a job run: the URI of the model it logged


def example_inputs(spec: dict, rows: int = 2, seed: int = 0) -> dict:
    """A seeded random input batch {x, xf, static, idx} for a model built from `spec`."""
    g = torch.Generator().manual_seed(seed)
    L, H = spec["lookback"], spec["horizon"]
    out = {"x": torch.randn(rows, L, 1 + spec["past_size"], generator=g)}
    if spec.get("future_size"):
        out["xf"] = torch.randn(rows, H, spec["future_size"], generator=g)
    if spec.get("static_size"):
        out["static"] = torch.randn(rows, spec["static_size"], generator=g)
    if spec.get("num_embeddings") and spec["model"].get("embedding", "none") != "none":
        out["idx"] = torch.randint(0, spec["num_embeddings"], (rows,), generator=g)
    return out


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raise these loggers to ERROR for the block."""
    olds = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in olds:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in olds:
            lg.setLevel(level)


def _save_flavor(model, path: Path) -> None:
    """The PyTorch flavor of `model` in folder `path`, and `weights.pt` in it."""
    model = model.cpu().eval()
    batch = example_inputs(model.spec)
    ex = {k: v.numpy() for k, v in batch.items()}
    ex = ex["x"] if list(ex) == ["x"] else ex
    with torch.no_grad():
        out = model(**batch).numpy()
    with _quiet("mlflow.pytorch", "mlflow.models.model"):
        # quiet: the pickle-format caution (a deliberate choice, see the module docstring),
        # and for dict examples the "failed to validate serving input" warning
        mlflow.pytorch.save_model(
            model, str(path), serialization_format="pickle",
            signature=infer_signature(ex, out), input_example=ex,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"numpy=={np.__version__}"])
    save_model(model, path / WEIGHTS)


def log_model(c: mlflow.MlflowClient, run_id: str, model, set_tag: bool = True) -> str:
    """Log `model` as a LoggedModel of `run_id`'s experiment, linked to the run; tag the run
    with its URI (`models:/<model id>`) unless `set_tag` is false, and return the URI."""
    experiment_id = c.get_run(run_id).info.experiment_id
    logged = c.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                   tags={"mlflow.source.run_id": run_id})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _save_flavor(model, Path(tmp) / MODEL_NAME)
            c.log_model_artifacts(logged.model_id, str(Path(tmp) / MODEL_NAME))
    except BaseException:
        c.finalize_logged_model(logged.model_id, "FAILED")
        raise
    c.finalize_logged_model(logged.model_id, "READY")
    c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
    uri = f"models:/{logged.model_id}"
    if set_tag:
        c.set_tag(run_id, MODEL_URI_TAG, uri)
    return uri


def model_source(c: mlflow.MlflowClient, run_id: str, group: str | None = None,
                 model_file: str | None = None) -> str:
    """The logged model of a leaderboard row. A per-group model kept only as a file artifact
    (`tracking.child_runs: per_model`) is logged on first use (its URI remembered in a run
    tag), so 10,000 groups cost 10,000 model logs only for the ones that get promoted."""
    tags = c.get_run(run_id).data.tags
    if not model_file:
        return tags[MODEL_URI_TAG]
    key = f"{MODEL_URI_TAG}.{safe_key(group or 'global')}"
    if key in tags:
        return tags[key]
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(c.download_artifacts(run_id, model_file, tmp))
    model_uri = log_model(c, run_id, model, set_tag=False)
    c.set_tag(run_id, key, model_uri)
    return model_uri


def register(c: mlflow.MlflowClient, run_id: str, name: str, alias: str,
             group: str | None = None, model_file: str | None = None,
             tags: dict | None = None) -> str:
    """Register the model of `run_id` (of `group`, see `model_source`) as a new version of
    `name` and point `alias` at it. Returns the version."""
    source = model_source(c, run_id, group, model_file)
    return _version(c, source, run_id, name, alias, group, tags)


def register_spec(c: mlflow.MlflowClient, run_id: str, name: str, alias: str, spec: dict,
                  group: str | None = None, tags: dict | None = None) -> str:
    """Register a statistical model (`pipeline.evaluation.statistical`) as a new version of `name`:
    a LoggedModel of `run_id` holding only its JSON spec (SPEC), tagged kind=statistical, no weights
    and no pickle; `alias` points at it. Returns the version."""
    experiment_id = c.get_run(run_id).info.experiment_id
    logged = c.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                   tags={"mlflow.source.run_id": run_id, KIND_TAG: spec["kind"]})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / SPEC).write_text(json.dumps(spec, sort_keys=True))
            c.log_model_artifacts(logged.model_id, tmp)
    except BaseException:
        c.finalize_logged_model(logged.model_id, "FAILED")
        raise
    c.finalize_logged_model(logged.model_id, "READY")
    return _version(c, f"models:/{logged.model_id}", run_id, name, alias, group,
                    {**(tags or {}), KIND_TAG: spec["kind"]})


def _version(c: mlflow.MlflowClient, source: str, run_id: str, name: str, alias: str,
             group: str | None, tags: dict | None) -> str:
    """A new version of `name` from the logged model at `source` (models:/<id>), `alias` on
    it."""
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(name)
    model_id = source.removeprefix("models:/")
    version_tags = {"run_id": run_id, "group": group or "global", "model_id": model_id,
                    **{k: str(v) for k, v in (tags or {}).items()}}
    if not c.tracking_uri.startswith(("http://", "https://")):
        # a local (SQLAlchemy) registry resolves a models:/ source through MLflow's global
        # tracking URI (a TODO in mlflow 3.17); the logged model's own location needs none
        source = c.get_logged_model(model_id).artifact_location
    mv = c.create_model_version(name, source, run_id=run_id, tags=version_tags,
                                model_id=model_id)
    c.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)
