"""Shared fixtures: one real local Ray instance per test session, small datasets on disk."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from timeouts import SERVICE, scaled

torch.set_num_threads(1)  # 2 cores shared with Ray workers: oversubscribed OpenMP crawls
os.environ.setdefault("RAY_ACCEPT_USAGE_STATS_PROMPT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's own start and liveness limits, scaled as every wait of the tests (tests/timeouts.py):
# on a busy machine a node slow to answer its health checks must not be declared dead.
# Set before any Ray starts, so the clusters of subprocesses (tests/multinode*.py) get them.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(scaled(SERVICE))))
os.environ.setdefault("RAY_health_check_timeout_ms", str(int(scaled(30) * 1000)))
os.environ.setdefault("RAY_health_check_failure_threshold", "10")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that asks for it (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
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
