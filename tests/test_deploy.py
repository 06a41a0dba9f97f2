"""The deployment: its files checked statically (the compose file, the Dockerfile, the
scheduling examples and the cluster config hang together, and the package installs from a
wheel exactly as the image installs it), then the stack run in containers on demo data
(`docker` marker; tests/containers.py builds the images and drives the Compose project)."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time
import zipfile

import containers as K
import pytest
import yaml

from pipeline import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def load_yaml(path: pathlib.Path):
    return list(yaml.safe_load_all(path.read_text()))


# A variable that holds a credential: its value must be required (`${VAR:?msg}`), never
# defaulted, never on a command line, and only in the services that use it.
SECRET = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|_KEY$|CREDENTIAL")
# A compose interpolation: `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?message}`,
# `${NAME?message}`, `${NAME:+alt}`, or bare `$NAME`; `$$` is a literal `$` (not interpolated).
REFERENCE = re.compile(r"(?<!\$)(?P<esc>(?:\$\$)*)\$(?:\{(?P<braced>[A-Za-z_]\w*)(?P<op>:?[-?+])?"
                       r"(?P<arg>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")
PIPELINE_SERVICES = ("ray-head", "ray-worker", "nightly")


def compose() -> dict:
    (doc,) = load_yaml(DOCKER / "compose.yaml")
    return doc


def strings(node):
    """Every string in a parsed YAML node, mapping keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def references(node) -> list[tuple[str, str | None, str]]:
    """(name, operator, argument) of every interpolation in `node`."""
    out = []
    for s in strings(node):
        for m in REFERENCE.finditer(s):
            out.append((m["braced"] or m["bare"], m["op"], m["arg"] or ""))
    return out


def command_text(svc: dict) -> str:
    """What a service runs: command, entrypoint and health check, as one string."""
    parts = []
    for key in ("command", "entrypoint"):
        value = svc.get(key)
        parts += [value] if isinstance(value, str) else list(value or [])
    test = (svc.get("healthcheck") or {}).get("test")
    parts += [test] if isinstance(test, str) else list(test or [])
    return " ".join(parts)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation, enough for the defaults this file uses."""
    def one(m):
        name, op, arg = m["braced"] or m["bare"], m["op"], m["arg"]
        value = env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?"):
            if not value and (op == ":?" or value is None):
                raise KeyError(f"{name}: {arg}")
            return value
        return value or ""
    return REFERENCE.sub(lambda m: m["esc"] + one(m), text).replace("$$", "$")


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
    # CPU by default (the stack comes up without NVIDIA's runtime); the GPU override file
    # reserves the worker's GPU and nothing else.
    assert not any("deploy" in svc for svc in services.values())
    (gpu_file,) = load_yaml(DOCKER / "compose.gpu.yaml")
    assert set(gpu_file) == {"services"} and set(gpu_file["services"]) == {"ray-worker"}
    gpu = gpu_file["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    # Compose 1.29 reads no top-level `name:` (the project name comes from .env)
    assert set(compose) <= {"services", "volumes", "x-pipeline", "x-ray-env",
                            "x-mlflow-client-env"}
    # Ray's object store lives in /dev/shm: each Ray service's shm holds its store
    for name in ("ray-head", "ray-worker"):
        svc = services[name]
        store = int(re.search(r"--object-store-memory=(\d+)", svc["command"])[1])
        assert store < int(svc["shm_size"].removesuffix("gb")) * 1e9, name
    assert "--num-cpus=0" in services["ray-head"]["command"]   # tasks run on the workers
    assert services["nightly"]["entrypoint"][-1] == "with-ray-node"
    assert "--address=ray-head:6379" in services["ray-worker"]["command"]
    mlflow = services["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert "--serve-artifacts" in command_text(mlflow)
    for name in ("ray-head", "ray-worker", "nightly"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    cmd = services["nightly"]["command"].split()
    assert cmd[:3] == ["python", "-m", "flows.nightly"]
    assert (ROOT / cmd[cmd.index("--config") + 1]).is_file()


def test_dockerfile_parses_copies_existing_paths_and_ends_non_root():
    dockerfile = pytest.importorskip("dockerfile")
    cmds = dockerfile.parse_file(str(DOCKER / "Dockerfile"))
    froms = [c.value for c in cmds if c.cmd == "FROM"]
    # the base (BASE_IMAGE, apt), the build stage (the venv), the final stage (from the base)
    assert froms == [("${BASE_IMAGE}", "AS", "base"), ("base", "AS", "build"), ("base",)]
    base = [c for c in cmds if c.cmd == "ARG" and c.value[0].startswith("BASE_IMAGE")][0]
    assert re.search(r"pytorch/pytorch:.*cuda", base.value[0])
    args = {c.value[0].split("=")[0]: c.value[0] for c in cmds if c.cmd == "ARG"}
    assert args["TORCH_VARIANT"] == "TORCH_VARIANT=cuda"
    for c in cmds:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                assert (ROOT / src).exists(), src
    users = [c.value[0] for c in cmds if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = " ".join(" ".join(c.value) for c in cmds if c.cmd == "RUN")
    assert 'pip install ".[postgres,server]"' in runs     # the install the wheel test repeats
    entry = [c for c in cmds if c.cmd == "CMD"][-1].value
    assert entry[:3] == ("python", "-m", "flows.nightly")
    assert (ROOT / entry[entry.index("--config") + 1]).is_file()



# Security properties of the deployment (each test fails on the compose file and Dockerfile
# before MLflow had authentication: see docker/README.md, "Secrets and exposure").

def test_mlflow_runs_the_basic_auth_app_with_config_from_the_environment(tmp_path, monkeypatch):
    """`mlflow server --app-name basic-auth`; the auth config file it is pointed at is written
    at start and holds no secret; the admin user, the CSRF key and the store URIs reach the
    server through variables the installed MLflow reads."""
    mlflow_cli = pytest.importorskip("mlflow.cli")
    from mlflow.utils.plugins import get_entry_points

    svc = compose()["services"]["mlflow"]
    run = command_text(svc)
    assert re.search(r"\bmlflow server\b.*--app-name[ =]basic-auth\b", run), run
    assert "basic-auth" in {e.name for e in get_entry_points("mlflow.app")}
    # The app imports Flask-WTF, which only mlflow's `auth` extra installs: the image needs it.
    dockerfile = pytest.importorskip("dockerfile")
    runs = " ".join(" ".join(c.value) for c in dockerfile.parse_file(str(DOCKER / "Dockerfile"))
                    if c.cmd == "RUN")
    assert re.search(r'pip install "\.\[[^"]*server[^"]*\]"', runs), runs   # the server extra
    assert "mlflow[auth]" in (ROOT / "pyproject.toml").read_text()
    assert "--backend-store-uri" not in run and "--registry-store-uri" not in run
    env = svc["environment"]
    options = {p.name: p for p in mlflow_cli.server.params}
    assert options["backend_store_uri"].envvar in env          # MLFLOW_BACKEND_STORE_URI
    assert env[options["backend_store_uri"].envvar].startswith("postgresql+psycopg://mlflow@")
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        (ref,) = references(env[name])
        assert ref[1] == ":?", (name, ref)
    # The auth config: the file the command writes is the one MLFLOW_AUTH_CONFIG_PATH names,
    # and MLflow reads from it an auth database and the admin user from the environment.
    m = re.search(r"printf '([^']*)' > (\S+)", run)
    assert m and m[2] == env["MLFLOW_AUTH_CONFIG_PATH"], run
    ini = m[1].replace("\\n", "\n")
    assert "password" not in ini.lower() and not references(ini)
    path = tmp_path / "basic_auth.ini"
    path.write_text(ini)
    # The config module alone: importing the mlflow.server.auth package needs Flask-WTF, which
    # the image installs (mlflow[auth]) and this test environment need not have.
    import mlflow
    spec = importlib.util.spec_from_file_location(
        "mlflow_auth_config", pathlib.Path(mlflow.__file__).parent / "server/auth/config.py")
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "operator")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    cfg = auth_config.read_auth_config()
    assert (cfg.admin_username, cfg.admin_password) == ("operator", "from-the-environment")
    db = cfg.database_uri
    assert db.startswith("sqlite:////") and not re.search(r"://[^/@]*:[^/@]*@", db)
    volumes = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert volumes[str(pathlib.PurePosixPath(db[len("sqlite:///"):]).parent)] == "mlauth"


def test_every_secret_is_required_never_defaulted():
    """No `${PASSWORD:-default}`: every reference to a secret variable is `${VAR:?message}`,
    and every secret-named variable a service gets is set from such a reference."""
    doc = compose()
    refs = [r for r in references(doc) if SECRET.search(r[0])]
    assert refs
    for name, op, arg in refs:
        assert op == ":?" and arg.strip(), f"${{{name}{op or ''}{arg}}} is not required"
    for svc_name, svc in doc["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET.search(key):
                (ref,) = references(str(value))
                assert ref[1] == ":?" and SECRET.search(ref[0]), (svc_name, key, value)


def test_no_secret_on_any_command_line():
    """Commands, entrypoints and health checks name no secret variable (neither compose's
    `${VAR}` nor the shell's `$$VAR`: a shell that expands it puts it in argv) and carry no
    URI with a password in it."""
    for name, svc in compose()["services"].items():
        text = command_text(svc)
        named = set(re.findall(r"\$+\{?([A-Za-z_]\w*)", text))
        assert not {n for n in named if SECRET.search(n)}, (name, text)
        assert not re.search(r"://[^/\s@:]+:[^/\s@]*@", text), (name, text)


def test_published_ports_bind_to_loopback_unless_opted_in():
    """Every published port names its host address, and that address is 127.0.0.1 unless the
    operator sets the variable (MLFLOW_BIND, RAY_DASHBOARD_BIND) that opts in."""
    short = re.compile(r"(?P<host>.+):(?P<published>\d+|\$\{[A-Z_]+:-\d+\}):(?P<target>\d+)"
                       r"(/(tcp|udp))?")
    published = {}
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            if isinstance(port, dict):
                host = port.get("host_ip")
            else:
                m = short.fullmatch(str(port))
                host = m["host"] if m else None
            assert host is not None, f"{name}: {port!r} publishes on every interface"
            assert interpolate(host, {}) == "127.0.0.1", (name, port)
            published[name] = host
    assert set(published) == {"mlflow", "ray-head"}
    assert interpolate(published["mlflow"], {"MLFLOW_BIND": "0.0.0.0"}) == "0.0.0.0"
    assert interpolate(published["ray-head"], {"RAY_DASHBOARD_BIND": "10.0.0.5"}) == "10.0.0.5"


def test_each_service_gets_only_the_secrets_it_uses():
    """No env_file (it would hand every service every secret); the secrets each service's
    definition (its environment included, after the anchors are merged) references."""
    services = compose()["services"]
    assert not any("env_file" in svc for svc in services.values())
    got = {name: {r[0] for r in references(svc) if SECRET.search(r[0])}
           for name, svc in services.items()}
    client = {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD"}
    assert got == {
        "postgres": {"POSTGRES_PASSWORD"},
        "mlflow": {"POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
                   "MLFLOW_FLASK_SERVER_SECRET_KEY"},
        "ray-head": client, "ray-worker": client, "nightly": client,
    }
    assert "RAY_AUTH_TOKEN" not in services["mlflow"]["environment"]
    assert [k for k in services["postgres"]["environment"] if SECRET.search(k)] == [
        "POSTGRES_PASSWORD"]
    for name in PIPELINE_SERVICES:
        env = services[name]["environment"]
        assert "POSTGRES_PASSWORD" not in env and "PGPASSWORD" not in env
        assert "MLFLOW_TRACKING_USERNAME" in env and "MLFLOW_TRACKING_PASSWORD" in env


def test_nothing_unpickles_models(monkeypatch):
    """MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false in the image and in every service that runs
    pipeline code, a value MLflow reads as off."""
    dockerfile = pytest.importorskip("dockerfile")
    env = {}
    for c in dockerfile.parse_file(str(DOCKER / "Dockerfile")):
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION") == "false"
    services = compose()["services"]
    values = {name: services[name]["environment"].get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
              for name in (*PIPELINE_SERVICES, "mlflow")}
    assert set(values.values()) == {"false"}, values
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    assert MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get() is False


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


def test_no_champion_yet_behind_mlflows_basic_auth(monkeypatch):
    """The compose stack's MLflow (basic auth) answers 403, not 404, for the alias of a model
    that does not exist: that reads as no champion; a 403 for a model that exists is raised."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    from pipeline.tracking import read

    class Client:
        def __init__(self, models):
            self.models = models

        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("Permission denied", error_code=PERMISSION_DENIED)

        def search_registered_models(self, filter_string):
            name = re.fullmatch(r"name = '(.*)'", filter_string)[1]
            return [type("M", (), {"name": m}) for m in self.models if m == name]

    monkeypatch.setattr(read, "_client", lambda uri: Client([]))
    assert read.champion_version("exp.store_A") is None
    monkeypatch.setattr(read, "_client", lambda uri: Client(["exp.store_A"]))
    with pytest.raises(MlflowException):
        read.champion_version("exp.store_A")


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


# The stack run in containers (tests/containers.py builds the images and drives one Compose
# project), checked from the host.

@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(2700)
def test_the_stack_runs_the_nightly_flow_in_containers(tmp_path, monkeypatch):
    """docker/README.md's commands, run: the images built (the base and the CAs the only
    differences), a missing secret refused, the stack up, the nightly flow as the one-shot
    service on demo data; then from the host: exit 0, forecasts readable in the volume, MLflow
    holds the run, its child runs and a champion and refuses anonymous requests, the Ray job
    API refuses a request without the token, training ran on the worker, a second run is
    skipped as done, no secret in the image, and `down -v` leaves nothing."""
    import polars as pl
    import requests
    K.require_engine()
    started = time.monotonic()
    build = K.build_images(tmp_path)
    built = time.monotonic()
    stack = K.Stack(tmp_path)
    env = stack.env
    assert set(K.SECRETS) <= set(env) and env["MLFLOW_TRACKING_USERNAME"], env.keys()

    try:
        # A missing secret: one line naming it, nothing started.
        stack.write_env(leave_out="MLFLOW_TRACKING_PASSWORD")
        r = stack.run(["up", "-d"], 300, check=False, record=False)
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1, lines
        assert "MLFLOW_TRACKING_PASSWORD" in lines[0]
        assert not stack.containers()

        stack.write_env()
        stack.up()
        stack.create_user()
        stack.make_demo_data()
        first = stack.nightly(1500)
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        ran = time.monotonic()

        # The forecasts, read from the data volume on the host.
        outputs = stack.data_mount() / "outputs"
        parts = sorted((outputs / "forecasts").rglob("*.parquet"))
        assert parts, sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*"))
        forecasts = pl.read_parquet(parts)
        assert forecasts.height > 0 and forecasts["unique_id"].n_unique() >= 100

        # MLflow, through its published loopback port, as the pipeline's user.
        anonymous = requests.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search",
                                 params={"max_results": 1}, timeout=30)
        assert anonymous.status_code == 401, anonymous.text[:300]
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", env["MLFLOW_TRACKING_USERNAME"])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env["MLFLOW_TRACKING_PASSWORD"])
        from mlflow import MlflowClient
        client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
        experiment = client.get_experiment_by_name("compose_demo")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                    == parents[0].info.run_id]
        assert children, [r.data.tags for r in runs]
        champions = [client.get_model_version_by_alias(m.name, "champion")
                     for m in client.search_registered_models()
                     if "champion" in m.aliases]
        assert champions and {mv.run_id for mv in champions} <= {r.info.run_id for r in runs}

        # Ray: the job API wants the token; the training tasks ran on the worker container.
        jobs = f"{stack.dashboard}/api/jobs/"
        assert requests.get(jobs, timeout=30).status_code in (401, 403)
        bearer = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
        assert requests.get(jobs, headers=bearer, timeout=30).status_code == 200

        def state(kind: str) -> list[dict]:
            r = requests.get(f"{stack.dashboard}/api/v0/{kind}", headers=bearer, timeout=60,
                             params={"detail": 1, "limit": 10000})
            return r.json()["data"]["result"]["result"]
        worker_ip = stack.ip("ray-worker")
        nodes = state("nodes")
        worker_nodes = {n["node_id"] for n in nodes if n["node_ip"] == worker_ip}
        assert len(worker_nodes) == 1, (worker_ip, nodes)
        tasks = state("tasks")
        training = [t for t in tasks if t["name"] in ("_pack_task", "_members_task")
                    and t["state"] == "FINISHED"]
        assert training and {t["node_id"] for t in training} == worker_nodes, \
            [(t["name"], t["state"], t["node_id"]) for t in tasks]

        # The second run of the same batch is skipped as done: exit 0, no new run.
        second = stack.nightly(900, record=False)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "already finished" in second.stdout + second.stderr
        assert len(client.search_runs([experiment.experiment_id])) == len(runs)

        # No secret in any image layer or in the images' configuration.
        for image in (K.PIPELINE_IMAGE, K.POSTGRES_IMAGE):
            layers = K.sh(["docker", "history", "--no-trunc", image], 60).stdout
            config = K.sh(["docker", "image", "inspect", image], 60).stdout
            for name in K.SECRETS:
                assert env[name] not in layers + config, (image, name)
            assert not re.search(r"(PASSWORD|TOKEN|SECRET)[A-Z_]*=\S", config), image
    finally:
        downed = stack.down()
    assert downed.returncode == 0, downed.stderr[-2000:]
    assert not stack.containers()
    assert not stack.volumes()
    # README's deployment block is these commands; only the base image and the env file differ
    build = [a.replace(f"BASE_IMAGE={K.BASE_IMAGE}", "BASE_IMAGE=python:3.11-slim-bookworm")
             for a in build]
    assert [build, *stack.commands] == K.readme_deploy_commands()
    print(f"\ncontainer test: images {(built - started) / 60:.1f} min, "
          f"stack + first nightly {(ran - built) / 60:.1f} min, "
          f"total {(time.monotonic() - started) / 60:.1f} min")
