"""Security: no code from the registry, no path from the data, no secret in the logs, a Ray
that authenticates. Each test names the finding it pins (the output-integrity findings are in
test_atomicity.py, test_locks.py, test_failures.py and test_exit_codes.py)."""
from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, run_args

from pipeline import config as C
from pipeline import tracking
from pipeline.cli import execute
from pipeline.data.series import SeriesArrays
from pipeline.errors import EXIT_OK, PipelineError
from pipeline.forecasting.final import final_forecast
from pipeline.outputs.plots import plot_sample
from pipeline.secrets import redact
from pipeline.tracking import read

mlflow = pytest.importorskip("mlflow")


# ------------------------------------------------------------------ 1. no code from the registry

class Payload:
    """Unpickled, it runs a shell command: what a hostile model version would carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def register_files(uri: str, name: str, folder: pathlib.Path) -> None:
    """Register the files in `folder` as a logged model's artifacts, aliased champion."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("hostile") or None
    exp_id = exp.experiment_id if exp else c.create_experiment(
        "hostile", artifact_location=tracking.artifact_root(uri))
    run = c.create_run(exp_id)
    logged = c.create_logged_model(exp_id, name="model", source_run_id=run.info.run_id)
    c.log_model_artifacts(logged.model_id, str(folder))
    c.finalize_logged_model(logged.model_id, "READY")
    c.create_registered_model(name)
    mv = c.create_model_version(name, c.get_logged_model(logged.model_id).artifact_location,
                                run_id=run.info.run_id)
    c.set_registered_model_alias(name, "champion", mv.version)


def test_a_registered_pickle_is_refused_and_its_payload_never_runs(tmp_path, monkeypatch):
    """Finding 1: champions were loaded with mlflow.pytorch.load_model (a pickle)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save(Payload(str(marker)), evil / "weights.pt")        # a pickle, not weights
    register_files(uri, "evil", evil)
    with pytest.raises(PipelineError, match="evil@champion .*not a weights-only model file"):
        read.load_champion("evil", uri=uri)
    flavor = tmp_path / "flavor_only"                            # the PyTorch flavor alone
    flavor.mkdir()
    torch.save(Payload(str(marker)), flavor / "data.pth")
    (flavor / "MLmodel").write_text("flavors: {pytorch: {model_data: data.pth}}\n")
    register_files(uri, "flavor_only", flavor)
    with pytest.raises(PipelineError, match="no weights.pt to load"):
        read.load_champion("flavor_only", uri=uri)
    assert not marker.exists()


# ------------------------------------------------------------------ 3. no path from the data

def test_series_ids_never_become_paths_outside_the_output(tmp_path):
    """Finding 3: an id "../../../../tmp/x" or "/abs/dir/x" wrote its plot outside."""
    outside = tmp_path / "outside"
    ids = ["../../../../" + str(outside / "x"), str(outside / "abs"), "..", "ünï/cödé", "ok"]
    arrays = SeriesArrays.from_list([np.sin(np.arange(200) / 4) + i for i in range(5)], ids=ids)
    cfg = C.load(None, ["windows.lookback=24", "windows.horizon=6", "data.calendar=[]"])
    cols = final_forecast(arrays, [], {}, cfg)                   # every series: the fallback
    out = tmp_path / "plots"
    pngs = plot_sample(str(out), arrays, cols, None, 5, 6)
    assert len(pngs) == 5 and not outside.exists()
    for p in pngs:
        assert os.path.realpath(p).startswith(str(out) + os.sep)
    assert len({os.path.basename(p) for p in pngs}) == 5       # still one file per series


# ------------------------------------------------------------------ 4. no secret in the logs

@pytest.mark.parametrize("text,expected", [
    ("s3://AKIAKEY:SECRET@bucket/x", "s3://bucket/x"),
    ("http://user:pw@host:5000/api", "http://host:5000/api"),
    ("postgresql://mlflow:p@ss@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("https://h/x?token=abc&size=3", "https://h/x?token=***&size=3"),
    ("s3://b/k?X-Amz-Signature=f00&X-Amz-Credential=AK/1", "s3://b/k?X-Amz-Signature=***"
                                                          "&X-Amz-Credential=***"),
    ("see http://a:b@h and s3://c:d@e/f", "see http://h and s3://e/f"),
    ("no uri here: bob@example.com", "no uri here: bob@example.com"),
])
def test_redact_removes_userinfo_and_credential_parameters(text, expected):
    """Finding 4: `p@ss@db` became `ss@db`, `?token=` stayed."""
    assert redact(text) == expected


@pytest.mark.slow
def test_a_run_keeps_secrets_out_of_params_artifacts_tags_and_stdout(demo_dir, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    secret_uri = "s3://AKIAKEY:SECRET@bucket/ck?token=T0KEN"
    out = tmp_path / "out"
    b = execute(run_args("run", demo_dir, out, "--set", f"train.checkpoint_dir={secret_uri}",
                         "--set", "train.checkpoint_minutes=null"))
    assert b.exit_code == EXIT_OK
    printed = capsys.readouterr()
    c = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = c.get_run(b.run_id)
    config = pathlib.Path(c.download_artifacts(b.run_id, "config.yaml", str(tmp_path))).read_text()
    seen = [printed.out, printed.err, config, *run.data.params.values(), *run.data.tags.values()]
    assert "s3://bucket/ck?token=***" in config
    assert not any("SECRET" in s or "T0KEN" in s or "AKIAKEY" in s for s in seen)



# ------------------------------------------------------------------ 10. a Ray that authenticates

def test_pyproject_requires_a_ray_with_token_authentication():
    """Finding 10: `ray>=2.40` allowed releases before token authentication (2.52)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"ray\[[a-z,]+\]>=2\.52"', text)
