"""Shared fixtures (one real local Ray instance per test session, the real services, small
datasets on disk) and the helpers several test files use (`from conftest import …`)."""
from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from timeouts import EVENT, SERVICE, scaled

torch.set_num_threads(1)  # 2 cores shared with Ray workers: oversubscribed OpenMP crawls
os.environ.setdefault("RAY_ACCEPT_USAGE_STATS_PROMPT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's own start and liveness limits, scaled as every wait of the tests (tests/timeouts.py):
# on a busy machine a node slow to answer its health checks must not be declared dead.
# Set before any Ray starts, so the clusters of subprocesses (tests/multinode*.py) get them.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(scaled(SERVICE))))
os.environ.setdefault("RAY_health_check_timeout_ms", str(int(scaled(30) * 1000)))
os.environ.setdefault("RAY_health_check_failure_threshold", "10")


# ------------------------------------------------------------------ helpers

SMALL = ["windows.lookback=48", "windows.horizon=12", "windows.val_size=24",
         "model.encoder.hidden_size=16", "model.encoder.num_layers=2",
         "model.decoder.hidden_size=32", "train.batch_size=64", "train.device=cpu",
         "train.lr=0.003", "data.calendar=[]", "evaluate.comparators=[]"]   # a small model


def sines(n_series=12, length=300, seed=0, groups=None):
    """Learnable data: daily sines with random phase, amplitude and level, little noise."""
    from pipeline.data.series import SeriesArrays
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    vals = [rng.uniform(5, 50) + rng.uniform(1, 5) * np.sin(2 * np.pi * t / 24 + rng.uniform(0, 6))
            + rng.normal(0, 0.05, length) for _ in range(n_series)]
    arrays = SeriesArrays.from_list(vals)
    if groups:
        arrays.groups = np.array([groups[i % len(groups)] for i in range(n_series)], object)
    return arrays


def weights(result) -> dict:
    """A trained model's state dict, from a JobResult or its bytes (weights only)."""
    return torch.load(io.BytesIO(getattr(result, "state", result)), weights_only=True)


# the pipeline's commands on the demo config, fast: in this process (`run_args` for
# `pipeline.cli.main`) or as a subprocess (`start_run`, `wait_for` a line it prints)
ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set",
        "windows.lookback=72", "--set", "model.encoder.hidden_size=8", "--set",
        "evaluate.plots=0", "--set", "evaluate.comparators=[]", "--set", "ray.enabled=false"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # 2 cores: no spinning


def run_args(cmd, data, out, *extra, config="configs/demo.yaml"):
    """The arguments of `cmd` on `data`, writing under `out`, with FAST and `extra`."""
    return [cmd, "--config", config, "--set", f"data.path={data}", "--set",
            f"output.path={out}", *FAST, *extra]


RUN = [sys.executable, "-m", "pipeline", "run", "--config", "configs/demo.yaml"]


def start_run(demo_dir, out, *extra, env=None):
    """`python -m pipeline run` on the demo data as a subprocess (50 epochs: still training
    when the test acts), its stdout and stderr piped."""
    return subprocess.Popen(
        [*RUN, "--set", f"data.path={demo_dir}", "--set", f"output.path={out}", "--set",
         "ray.enabled=false", "--set", "evaluate.plots=0", "--set", "train.epochs=50", *extra],
        cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def wait_for(proc, text: str, seconds: float = EVENT) -> None:
    """Read `proc`'s stdout up to a line holding `text` (at most `seconds`, scaled)."""
    t0, timeout = time.monotonic(), scaled(seconds)
    for line in proc.stdout:
        if text in line:
            return
        assert time.monotonic() - t0 < timeout, f"no {text!r}"
    raise AssertionError(f"{text!r} never printed; stderr: {proc.stderr.read()[-2000:]}")


@pytest.fixture(autouse=True)
def _mlflow_environment_stays_in_its_test(monkeypatch):
    """The tracking layer hands MLflow a URI's credentials and `tracking.timeout_seconds`
    through this process's environment (MLFLOW_TRACKING_USERNAME / _PASSWORD,
    MLFLOW_HTTP_REQUEST_*): restored after each test, so none leaks into the next one (a test's
    2 s timeout made a later test's requests time out on a loaded machine) or into a
    `docker-compose` it starts."""
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        value = os.environ.get(key)
        monkeypatch.setenv(key, value or "-")     # records the value to restore (or none)
        if value is None:
            monkeypatch.delenv(key)
    yield


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that asks for it (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        # address="local": this session's own instance, never a cluster another job on the
        # machine started
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_uri():
    """A real PostgreSQL database for MLflow's backend store (tests/services.py)."""
    from services import Postgres
    if os.environ.get("PIPELINE_TEST_POSTGRES_URI"):
        yield os.environ["PIPELINE_TEST_POSTGRES_URI"]
        return
    pg = Postgres()
    try:
        yield pg.start()
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def mlflow_server(postgres_uri, tmp_path_factory):
    """A real `mlflow server --serve-artifacts` with the PostgreSQL backend store; its URL."""
    from services import MlflowServer
    server = MlflowServer(postgres_uri, str(tmp_path_factory.mktemp("mlflow_server")))
    try:
        yield server.wait()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from pipeline.data.demo import make_demo_data
    out = tmp_path_factory.mktemp("demo") / "demo"
    make_demo_data(str(out), n_series=40, seed=1)
    return str(out)


def write_long(path, ids, ds, y, **cols) -> str:
    """Write a long table (lists or arrays) as one Parquet file and return its path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({"unique_id": ids, "ds": np.asarray(ds, "datetime64[ns]"),
                      "y": np.asarray(y, float), **cols})
    pq.write_table(table, path)
    return str(path)


def hourly(n: int, start: str = "2024-01-01T00") -> np.ndarray:
    return np.datetime64(start, "ns") + np.arange(n) * np.timedelta64(1, "h")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto in server mode), shared by the session: yields
    (endpoint "127.0.0.1:port", environment with its credentials). Each test makes its own
    bucket."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"{host}:{port}", env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; its pyarrow URI (the endpoint in the query) and the environment."""
    import boto3
    endpoint, env = s3_server
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing"
                 ).create_bucket(Bucket=name)
    return f"s3://{name}/out?endpoint_override={endpoint}&scheme=http", env
