"""Deployment files, checked statically (no Docker engine or Kubernetes here): the compose
file, the Dockerfile, the scheduling examples and the cluster config hang together, and the
package installs from a wheel exactly as the image installs it."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest
import yaml

from pipeline import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def load_yaml(path: pathlib.Path):
    return list(yaml.safe_load_all(path.read_text()))


def test_compose_services_reference_what_exists():
    (compose,) = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "nightly"}
    declared = set(compose["volumes"])
    for name, svc in services.items():
        assert "image" in svc, name
        if "build" in svc:
            ctx = (DOCKER / svc["build"]["context"]).resolve()
            assert ctx == ROOT and (ctx / svc["build"]["dockerfile"]).is_file()
        for vol in svc.get("volumes", []):
            assert vol.split(":")[0] in declared, (name, vol)
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
    gpu = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    assert "postgresql+psycopg://" in services["mlflow"]["command"]
    assert "--serve-artifacts" in services["mlflow"]["command"]
    for name in ("ray-head", "ray-worker", "nightly", "mlflow"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    cmd = services["nightly"]["command"].split()
    assert cmd[:3] == ["python", "-m", "flows.nightly"]
    assert (ROOT / cmd[cmd.index("--config") + 1]).is_file()


def test_dockerfile_parses_copies_existing_paths_and_ends_non_root():
    dockerfile = pytest.importorskip("dockerfile")
    cmds = dockerfile.parse_file(str(DOCKER / "Dockerfile"))
    kinds = [c.cmd for c in cmds]
    assert kinds.count("FROM") == 1
    base = [c for c in cmds if c.cmd == "ARG" and c.value[0].startswith("BASE_IMAGE")][0]
    assert re.search(r"pytorch/pytorch:.*cuda", base.value[0])
    for c in cmds:
        if c.cmd == "COPY":
            for src in c.value[:-1]:
                assert (ROOT / src).exists(), src
    users = [c.value[0] for c in cmds if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = " ".join(" ".join(c.value) for c in cmds if c.cmd == "RUN")
    assert 'pip install ".[postgres]"' in runs            # the install the wheel test repeats
    entry = [c for c in cmds if c.cmd == "CMD"][-1].value
    assert entry[:3] == ("python", "-m", "flows.nightly")
    assert (ROOT / entry[entry.index("--config") + 1]).is_file()


def test_schedules_run_existing_flows_and_configs():
    cron = [ln for ln in (ROOT / "flows/schedules/crontab").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert len(cron) == 1 and len(cron[0].split()[:5]) == 5
    assert "python -m flows.nightly --config configs/demo.yaml" in cron[0]
    (cronjob,) = load_yaml(ROOT / "flows/schedules/cronjob.yaml")
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "flows.nightly"]
    assert (ROOT / command[command.index("--config") + 1]).is_file()
    assert pod["securityContext"]["runAsNonRoot"] is True
    (rayjob,) = load_yaml(ROOT / "flows/schedules/rayjob.yaml")
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "flows.nightly"]
    assert (ROOT / entry[entry.index("--config") + 1]).is_file()
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/opt/pipeline" and runtime_env["env_vars"]
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    for module in ("nightly", "forecast_only", "backtest"):
        assert (ROOT / "flows" / f"{module}.py").is_file()


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = C.load(path)
        assert cfg.name, path
    cluster = C.load(ROOT / "configs" / "cluster.yaml")
    assert cluster.data.path.startswith("s3://") and cluster.output.path.startswith("s3://")
    assert cluster.tracking.uri is None and cluster.ray.address    # MLFLOW_TRACKING_URI
    assert 0 < cluster.ray.task_num_gpus <= 1


@pytest.mark.slow
def test_the_wheel_the_image_installs_ships_every_module(tmp_path):
    """`pip install .` (not editable, as in the Dockerfile): build the wheel, install it alone
    into a folder, and import the CLI and the flows from there, away from the checkout."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "wheel"), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for src in list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "flows").glob("*.py")):
        assert str(src.relative_to(ROOT)) in names, src
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                        str(target), str(whl)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    probe = ("import pipeline, flows.nightly, pipeline.cli, pipeline.config.loading, "
             "pipeline.tracking.read; print(pipeline.__file__); print(flows.nightly.nightly)")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith(str(target))
