"""The deployment's containers for tests/test_deploy.py: the images built as docker/README.md
builds them, and one Compose project (`Stack`) with its own name, loopback ports and env file,
driven by README's commands and taken down with its volumes. Needs a Docker engine, Compose
1.29 (`docker-compose`) and, for the local base image, root and debootstrap (.ci/run provides
them); without them the test skips, unless PIPELINE_REQUIRE_SERVICES=1 makes that a failure."""
from __future__ import annotations

import os
import pathlib
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from services import free_port, missing
from timeouts import scaled

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BASE_IMAGE = "forecast-pipeline-base:bookworm"     # debootstrap's Debian, kept between runs
POSTGRES_IMAGE = "forecast-postgres:15"            # Debian's PostgreSQL on it
PIPELINE_IMAGE = "forecast-pipeline:latest"
SECRETS = ("RAY_AUTH_TOKEN", "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
           "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_PASSWORD")


def sh(cmd: list[str], timeout: float, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def require_engine() -> None:
    if not shutil.which("docker") or not shutil.which("docker-compose"):
        missing("docker and docker-compose are not installed (.ci/run installs them)")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        missing("no Docker engine answers (start dockerd; .ci/run does)")


def apt_mirror() -> str:
    """The Debian mirror apt uses here (deb822 `URIs:` or a one-line `deb` entry)."""
    files = [pathlib.Path("/etc/apt/sources.list"),
             *sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file() or f.suffix not in ("", ".list", ".sources"):
            continue
        text = f.read_text()
        for m in re.finditer(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M):
            uri = m[1] or m[2]
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def ensure_base_image(tmp_path: pathlib.Path) -> None:
    """A Debian bookworm image made here (no registry): debootstrap then `docker import`; an
    image of that name already there is reused."""
    if sh(["docker", "image", "inspect", BASE_IMAGE], 60, check=False).returncode == 0:
        return
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        missing("the local base image needs root and debootstrap (.ci/run installs it)")
    rootfs = tmp_path / "rootfs"
    sh(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), apt_mirror()], 1200)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    sh(["docker", "import", "-", BASE_IMAGE], 600, stdin=tar.stdout)
    tar.wait(timeout=60)
    shutil.rmtree(rootfs, ignore_errors=True)


def host_extras() -> dict[str, list[pathlib.Path]]:
    """What a build behind this machine's proxy needs from the host: the CAs it added to its
    trust store (TLS inspection) for docker/extra-ca/, and torch's CPU wheel from pip's local
    find-links (its index may be out of reach) for docker/wheels/."""
    cas = sorted(pathlib.Path("/usr/local/share/ca-certificates").rglob("*.crt"))
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    r = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                       capture_output=True, text=True, timeout=60)
    links += r.stdout.split() if r.returncode == 0 else []
    wheels = [w for d in links if os.path.isdir(d.removeprefix("file://"))
              for w in pathlib.Path(d.removeprefix("file://")).glob("torch-2.13.0*cp311*.whl")]
    return {"extra-ca": cas, "wheels": wheels[:1]}


def image_id(name: str) -> str:
    return sh(["docker", "image", "inspect", "-f", "{{.Id}}", name], 60, check=False
              ).stdout.strip()


def build_images(tmp_path: pathlib.Path) -> list[str]:
    """The pipeline's and Postgres's images, built as docker/README.md builds them; the only
    differences are the base image and the host's CAs (and torch's CPU wheel) this machine's
    proxy needs, put in the git-ignored folders for the build and removed after. An image a
    rebuild replaced is removed (disk). Returns the pipeline image's build command."""
    ensure_base_image(tmp_path)
    before = {name: image_id(name) for name in (PIPELINE_IMAGE, POSTGRES_IMAGE)}
    placed = []
    for folder, files in host_extras().items():
        for f in files:
            target = DOCKER / folder / f.name
            if not target.exists():
                shutil.copyfile(f, target)
                placed.append(target)
    build = ["docker", "build", "--network", "host", "-f", "docker/Dockerfile",
             "-t", PIPELINE_IMAGE, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
             "--build-arg", "TORCH_VARIANT=cpu", "."]
    try:
        sh(build, 2400)
        sh(["docker", "build", "--network", "host", "-f", "docker/postgres.Dockerfile",
            "-t", POSTGRES_IMAGE, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "docker"], 900)
    finally:
        for target in placed:
            target.unlink()
    for name, old in before.items():
        if old and image_id(name) != old:
            sh(["docker", "rmi", old], 120, check=False)
    return build


def env_from_example() -> dict[str, str]:
    """docker/.env.example's settings with a random secret for each one left empty, as the
    command in docker/README.md fills them."""
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            out[m[1]] = m[2] or secrets.token_urlsafe(32)
    return out


def readme_deploy_commands() -> list[list[str]]:
    """The argv of each docker command in README's "Deployment: Docker Compose" block (the
    part after a pipe)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Deployment: Docker Compose"):]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)[:1]
    out = []
    for line in block.splitlines():
        line = line.rsplit(" | ", 1)[-1]
        if line.startswith(("docker build", "docker-compose")):
            out.append(shlex.split(line))
    return out


class Stack:
    """One Compose project of docker/compose.yaml: its own project name, free loopback ports
    and the Postgres image built here, with docker/.env made as docker/README.md makes it.
    `commands` records each README command as run (the env file's path as README writes it)."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.project = f"fptest{os.getpid()}"
        self.mlflow_port, self.ray_port = free_port(), free_port()
        self.env = env_from_example()
        self.env.update({"COMPOSE_PROJECT_NAME": self.project, "POSTGRES_IMAGE": POSTGRES_IMAGE,
                         "MLFLOW_PORT": str(self.mlflow_port),
                         "RAY_DASHBOARD_PORT": str(self.ray_port)})
        self.env_file = tmp_path / ".env"
        self.compose = ["docker-compose", "--env-file", str(self.env_file),
                        "-f", "docker/compose.yaml"]
        self.commands: list[list[str]] = []
        self.mlflow_url = f"http://127.0.0.1:{self.mlflow_port}"
        self.dashboard = f"http://127.0.0.1:{self.ray_port}"

    def write_env(self, leave_out: str | None = None) -> None:
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()
                                         if k != leave_out))
        self.env_file.chmod(0o600)

    def run(self, args: list[str], timeout: float, check: bool = True, record: bool = True,
            **kw) -> subprocess.CompletedProcess:
        cmd = [*self.compose, *args]
        if record:
            self.commands.append([a.replace(str(self.env_file), "docker/.env") for a in cmd])
        # Compose reads the shell's environment too: only docker/.env may give the secrets (a
        # MLFLOW_TRACKING_PASSWORD of this process would fill the one the test leaves out)
        env = {k: v for k, v in os.environ.items()
               if k not in SECRETS and not k.startswith("MLFLOW_TRACKING_")}
        return sh(cmd, timeout, check=check, env=env, **kw)

    def containers(self) -> list[str]:
        return sh(["docker", "ps", "-q", "-a", "--filter",
                   f"label=com.docker.compose.project={self.project}"], 60).stdout.split()

    def volumes(self) -> list[str]:
        return sh(["docker", "volume", "ls", "-q", "--filter",
                   f"label=com.docker.compose.project={self.project}"], 60).stdout.split()

    def container(self, service: str) -> str:
        (cid,) = self.run(["ps", "-q", service], 60, record=False).stdout.split()
        return cid

    def up(self) -> None:
        """`up -d`, then wait until MLflow's health check passes (10 minutes at most, scaled:
        tests/timeouts.py)."""
        self.run(["up", "-d"], 600)
        deadline = time.monotonic() + scaled(600)
        while True:
            health = sh(["docker", "inspect", "-f", "{{.State.Health.Status}}",
                         self.container("mlflow")], 60).stdout.strip()
            if health == "healthy":
                return
            assert health == "starting" and time.monotonic() < deadline, \
                self.run(["logs", "--tail", "50", "mlflow"], 60, record=False).stdout
            time.sleep(3)

    def create_user(self) -> None:
        user = f"{self.env['MLFLOW_TRACKING_USERNAME']}\n{self.env['MLFLOW_TRACKING_PASSWORD']}\n"
        self.run(["exec", "-T", "mlflow", "mlflow-create-user"], 300, input=user)

    def make_demo_data(self) -> None:
        self.run(["run", "--rm", "--no-deps", "--entrypoint", "python", "nightly", "-m",
                  "pipeline", "make-demo-data", "--out", "/data/input"], 600)

    def nightly(self, timeout: float, record: bool = True) -> subprocess.CompletedProcess:
        return self.run(["run", "--rm", "nightly", "python", "-m", "flows.nightly", "--config",
                         "docker/demo.yaml"], timeout, check=False, record=record)

    def data_mount(self) -> pathlib.Path:
        """The data volume's folder on the host."""
        (volume,) = [v for v in self.volumes() if v.endswith("_data")]
        return pathlib.Path(sh(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", volume],
                               60).stdout.strip())

    def ip(self, service: str) -> str:
        return sh(["docker", "inspect", "-f",
                   "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                   self.container(service)], 60).stdout.strip()

    def down(self) -> subprocess.CompletedProcess:
        return self.run(["down", "-v"], 600, check=False)
