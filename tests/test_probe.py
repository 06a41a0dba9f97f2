"""The reliability probe's findings (issue 29, item 5): each test fails on the behaviour the probe
found and passes now. Tracking findings are in test_probe_tracking.py."""
from __future__ import annotations

import glob
import os
import pathlib
import shutil

import numpy as np
import polars as pl
import pytest
from conftest import run_args

from pipeline.cli import main
from pipeline.errors import EXIT_OK


def read_kind(out, kind: str) -> pl.DataFrame:
    files = glob.glob(str(out / kind / "job=*" / "**" / "*.parquet"), recursive=True)
    return pl.read_parquet(files, hive_partitioning=False)


# ------------------------------------------------------------------ no made-up zeros

@pytest.mark.slow
def test_series_with_no_usable_value_get_no_made_up_number(demo_dir, tmp_path):
    """Finding: an all-NaN and an all-1e308 series were zero-filled on the grid, then got 24
    rows of y_hat = 0.0 labelled fallback. Now their forecast rows are NaN (y_hat and
    quantiles), they have no backtest or metrics rows, and the validation report lists them
    as skipped for having no finite value."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    (part,) = glob.glob(str(data / "store=store_A" / "*.parquet"))
    df = pl.read_parquet(part)
    nan_id, huge_id = df["unique_id"].unique().sort()[:2]
    df = df.with_columns(pl.when(pl.col("unique_id") == nan_id).then(float("nan"))
                         .when(pl.col("unique_id") == huge_id).then(1e308)
                         .otherwise(pl.col("y")).alias("y"))
    df.write_parquet(part)
    out = tmp_path / "out"
    assert main(run_args("run", data, out, "--set", "tracking.enabled=false")) == EXIT_OK
    empty = {nan_id, huge_id}
    fc = read_kind(out, "forecasts")
    mine = fc.filter(pl.col("unique_id").is_in(list(empty)))
    assert len(mine) == 2 * 24 and mine["y_hat"].is_nan().all()
    assert set(mine["model"]) == {"fallback:seasonal_naive"}
    rest = fc.filter(~pl.col("unique_id").is_in(list(empty)))
    assert rest["y_hat"].is_finite().all() and rest["unique_id"].n_unique() == 38
    for kind in ("backtest", "metrics"):
        got = read_kind(out, kind)
        if "unique_id" in got.columns:
            assert not set(got["unique_id"]) & empty, kind
    report = pl.read_parquet(out / "demo" / "validation_report.parquet")
    skipped = report.filter(pl.col("issue") == "no_finite_values")
    assert set(skipped["series"]) == empty and set(skipped["action"]) == {"skipped"}
    assert np.isfinite(rest["y_hat"].to_numpy()).all()
    assert os.path.exists(out / "demo" / "validation_report.parquet")


# ------------------------------------------------------------------ registry values are checked

@pytest.mark.parametrize("key,value", [("horizon", 48), ("horizon", 100_000), ("horizon", 1),
                                       ("season", 10**6), ("history", 0), ("season", 2.5)])
def test_a_statistical_spec_from_the_registry_is_checked_against_the_run(key, value):
    """Finding: a champion's horizon of 48 under a 24-step config wrote 48 steps, 100000 made
    the console report 125,090 series, 1 crashed with an IndexError."""
    from pipeline.errors import PipelineError
    from pipeline.evaluation.statistical import Statistical
    spec = {"kind": "statistical", "model": "auto_ets", "season": 24, "history": 120,
            "horizon": 24}
    assert Statistical.from_spec(spec, "x", horizon=24).horizon == 24
    with pytest.raises(PipelineError, match=f"champ: {key} "):
        Statistical.from_spec({**spec, key: value}, "champ", horizon=24)


def calibration_json(width) -> str:
    from pipeline.forecasting.intervals import Calibration, Conformal
    w = np.asarray(width, float)
    k, h = w.shape
    conf = Conformal((0.8, 0.95)[:k], w, np.zeros((k, h), bool), np.full(h, 10),
                     np.asarray([], object), np.zeros((0, k, h)), np.zeros((0, k, h), bool),
                     np.zeros((0, h), bool))
    return Calibration(conf.levels, {"gru_direct": conf}, {}).to_json()


@pytest.mark.parametrize("width,why", [([[1.0, -2.0, 1.0]], "negative"),
                                       ([[1.0, float("inf"), 1.0]], "not finite"),
                                       ([[1.0, float("nan"), 1.0]], "not finite"),
                                       ([[1.0, 1.0]], "for 2 steps")])
def test_crafted_conformal_widths_are_refused(width, why):
    """Finding: negative widths in a crafted conformal.json gave crossed intervals on every
    row, exit 0. Negative, infinite, NaN (where not capped) widths and a wrong shape are refused,
    naming the model."""
    from pipeline.forecasting.intervals import Calibration
    assert Calibration.from_json(calibration_json([[1.0, 2.0, 3.0]]), 3).fitted
    with pytest.raises(ValueError, match=f"'gru_direct'.*{why}"):
        Calibration.from_json(calibration_json(width), 3)


def test_a_weights_file_asking_for_a_huge_model_allocates_nothing(tmp_path):
    """Finding: a 15.8 KB weights file whose spec asks for a huge hidden size made the driver
    allocate 2.2 GB before refusing. The spec is checked on the meta device first."""
    import io
    import resource

    import torch

    from pipeline import config as C
    from pipeline.models import SpecError, build_model, load_model, save_model
    cfg = C.load("configs/demo.yaml", ["model.encoder.hidden_size=8"])
    model = build_model(cfg.model, lookback=72, horizon=24, past_size=3, future_size=2)
    buf = io.BytesIO()
    save_model(model, buf)
    buf.seek(0)
    assert load_model(buf).spec == model.spec
    huge = {"format": 1, "spec": model.spec, "state_dict": model.state_dict()}
    huge["spec"]["model"]["encoder"]["hidden_size"] = 6_000     # about 450 MB of GRU weights
    path = tmp_path / "weights.pt"
    torch.save(huge, path)
    assert path.stat().st_size < 100_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(SpecError, match="spec and weights disagree"):
        load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB
    huge["spec"]["model"]["encoder"]["hidden_size"] = 10**9
    torch.save(huge, path)
    with pytest.raises(SpecError, match="hidden_size = 1000000000 is out of bounds"):
        load_model(path)


def grouped_config(tmp_path) -> str:
    """test_statistical_champions's panel of daily patterns in two groups (s0, s1 | s2, s3),
    trained per group: the comparators win both groups."""
    import yaml
    from test_statistical_champions import statistical_config
    path = statistical_config(tmp_path)
    cfg = yaml.safe_load(pathlib.Path(path).read_text())
    df = pl.read_parquet(cfg["data"]["path"])
    df.with_columns(grp=pl.when(pl.col("unique_id").is_in(["s0", "s1"])).then(pl.lit("A"))
                    .otherwise(pl.lit("B"))).write_parquet(cfg["data"]["path"])
    cfg["data"]["group_col"] = "grp"
    cfg["train"]["mode"] = "per_group"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("horizon", [48, 1])
def test_a_champion_whose_horizon_disagrees_is_refused_and_its_group_falls_back(
        tmp_path, capsys, horizon):
    """Finding: a registered statistical champion with horizon 48 under a 24-step config wrote
    48 steps per series (exit 0); 1 crashed with an IndexError (exit 1). Now it is refused in
    one line naming it; its group gets the fallback, the other group its champion."""
    import mlflow

    from pipeline import tracking
    from pipeline.cli import execute
    from pipeline.tracking import models as tracked
    config = grouped_config(tmp_path)
    assert execute(["run", "--config", config]).exit_code == EXIT_OK
    assert main(["compare", "--config", config]) == EXIT_OK
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mv = mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias("stat.A", "champion")
    assert mv.tags["kind"] == "statistical"
    bad = {"kind": "statistical", "model": "auto_ets", "season": 24, "history": 120,
           "horizon": horizon}
    version = tracked.register_spec(tracking.client(uri), mv.tags["run_id"], "stat.A",
                                    "champion", bad, group="A")
    with pytest.warns(UserWarning) as seen:     # on stderr as one `warning:` line
        fc = execute(["forecast", "--config", config, "--from-registry"])
    assert fc.exit_code == EXIT_OK, capsys.readouterr().err
    lines = [str(w.message) for w in seen if "refused" in str(w.message)]
    assert len(lines) == 1 and f"champion stat.A v{version} refused" in lines[0]
    assert f"horizon {horizon} differs" in lines[0]
    cols = fc.outcome.forecast.rows()
    assert len(cols["y_hat"]) == 4 * 24 and set(cols["step"]) == set(range(1, 25))
    models = {g: set(np.asarray(cols["model"])[np.asarray(cols["group"]) == g]) for g in "AB"}
    assert models["A"] == {"fallback:seasonal_naive"}
    assert len(models["B"]) == 1 and models["B"] <= {"auto_ets", "auto_theta"}
    # every champion refused: the fallback everywhere, said so (not "no champion registered")
    tracked.register_spec(tracking.client(uri), mv.tags["run_id"], "stat.B", "champion", bad,
                          group="B")
    with pytest.warns(UserWarning):
        fc = execute(["forecast", "--config", config, "--from-registry"])
    assert fc.exit_code == EXIT_OK and fc.outcome.forecast.note.startswith(
        "every champion refused (stat.")
    assert set(fc.outcome.forecast.rows()["model"]) == {"fallback:seasonal_naive"}


# ------------------------------------------------------------------ leftovers

@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_every_output_file_has_one_mode_under_the_umask(demo_dir, tmp_path, umask):
    """Finding: forecast and backtest files were written 0600 (made by mkstemp), metrics 0644.
    Every file a run writes now has the mode `open()` gives: 0666 less the umask."""
    import subprocess
    import sys

    from conftest import ENV, ROOT
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pipeline", *run_args("run", demo_dir, out, "--set",
                                                                    "tracking.enabled=false")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: os.umask(umask))
    assert r.returncode == EXIT_OK, r.stderr[-2000:]
    modes = {}
    for root, _, files in os.walk(out):
        for f in files:
            modes[os.path.relpath(os.path.join(root, f), out)] = \
                os.stat(os.path.join(root, f)).st_mode & 0o777
    kinds = {p.split(os.sep)[0] for p in modes}
    assert {"forecasts", "backtest", "metrics", "reports", "demo"} <= kinds
    assert {oct(m) for m in modes.values()} == {oct(0o666 & ~umask)}, modes


def delta_files(root) -> tuple[set, set]:
    """(Parquet files on disk, files the latest version reads) of the forecasts Delta table."""
    from deltalake import DeltaTable
    base = root / "forecasts"
    on_disk = {os.path.relpath(p, base) for p in glob.glob(str(base / "**" / "*.parquet"),
                                                            recursive=True)}
    live = {os.path.relpath(u.removeprefix("file://"), base)
            for u in DeltaTable(str(base)).file_uris()}
    return on_disk, live


@pytest.mark.parametrize("hours,kept", [("0", False), ("null", True), ("168", True)])
def test_delta_tables_are_vacuumed_after_the_retention(tmp_path, hours, kept):
    """Finding: Delta tables were never vacuumed: every rewrite of a partition left its old
    files. With `output.delta_retention_hours` the files no version of that window reads are
    deleted after each write (0: all but the latest's; null: never)."""
    pytest.importorskip("deltalake")
    import pyarrow as pa

    from pipeline import config as C
    from pipeline.outputs import partitions as output
    cfg = C.load(None, [f"output.path={tmp_path}", "name=demo", "output.format=delta",
                        f"output.delta_retention_hours={hours}"])
    for version in range(3):
        for end in ("20240101T000000", "20240102T000000"):
            output.write(cfg, "forecasts", end, pa.table({"unique_id": ["a", "b"],
                                                          "version": [version] * 2}))
    on_disk, live = delta_files(tmp_path)
    assert len(live) == 2
    assert (on_disk != live) is kept, (on_disk, live)
    assert live <= on_disk


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_dead_writers_multipart_uploads_are_aborted_by_the_next_write(s3_bucket, fmt):
    """Finding: abandoned S3 multipart uploads piled up after kills (5 after 15). The next
    writer of the partition (holding its lock) aborts those under it; another partition's
    upload, which another lock may cover, is left alone."""
    import boto3
    import pyarrow as pa

    from pipeline import config as C
    from pipeline import paths
    from pipeline.outputs import partitions as output
    if fmt == "delta":
        pytest.importorskip("deltalake")
    uri = s3_bucket[0].replace("/out?", f"/out-{fmt}?")     # the bucket is the test's
    cfg = C.load(None, [f"output.path={uri}", "name=demo", f"output.format={fmt}"])
    bucket = uri.split("/")[2]
    endpoint = uri.split("endpoint_override=")[1].split("&")[0]
    s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
    ours, theirs = "20240101T000000", "20240102T000000"

    def key_in(end: str) -> str:
        if fmt == "delta":
            keys = paths.partition_values(cfg, "forecasts", end, "run")
            folder = paths.join(paths.table(cfg, "forecasts"),
                                *(f"{k}={v}" for k, v in keys.items()))
        else:
            folder = paths.partition(cfg, "forecasts", end)
        return folder.partition("?")[0].split("/", 3)[3] + "/part-dead.parquet"

    for end in (ours, theirs):           # a killed writer's upload: one part, never completed
        up = s3.create_multipart_upload(Bucket=bucket, Key=key_in(end))
        s3.upload_part(Bucket=bucket, Key=key_in(end), UploadId=up["UploadId"], PartNumber=1,
                       Body=b"x" * 1024)
    mine = {"Bucket": bucket, "Prefix": f"out-{fmt}/"}
    assert len(s3.list_multipart_uploads(**mine).get("Uploads", [])) == 2
    output.write(cfg, "forecasts", ours, pa.table({"unique_id": ["a"], "y_hat": [1.0]}))
    left = [u["Key"] for u in s3.list_multipart_uploads(**mine).get("Uploads", [])]
    assert left == [key_in(theirs)]
