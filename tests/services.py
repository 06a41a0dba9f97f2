"""Real services for the tracking tests: a private PostgreSQL cluster and an `mlflow server`
on loopback ports, started once per test session (see the fixtures in conftest.py).

PostgreSQL: `PIPELINE_TEST_POSTGRES_URI` points at an existing database; otherwise a private
cluster is created with the installed binaries (Debian's `postgresql` package: .ci/run installs
it), owned by the `postgres` user when the tests run as root. Without binaries the tests that
need it skip, unless `PIPELINE_REQUIRE_SERVICES=1` (set by .ci/run) makes that a failure.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request

import pytest
from timeouts import QUICK, SERVICE, STOP, scaled, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing(what: str) -> None:
    if os.environ.get("PIPELINE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} (PIPELINE_REQUIRE_SERVICES=1)")
    pytest.skip(what)


def _tail(path: str, n: int) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _pg_bindir() -> str | None:
    for exe in ("initdb", "pg_ctl"):
        found = shutil.which(exe)
        if found:
            return os.path.dirname(os.path.realpath(found))
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    return dirs[-1] if dirs else None


class Postgres:
    """A throwaway PostgreSQL cluster: trust auth on 127.0.0.1, database `mlflow`."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        if self.bindir is None:
            missing("PostgreSQL is not installed (apt-get install -y postgresql)")
        self.root = tempfile.mkdtemp(prefix="pipeline-pg-")
        os.chmod(self.root, 0o755)
        self.as_user: list[str] = []
        if os.geteuid() == 0:     # initdb refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.log = os.path.join(self.root, "server.log")

    def _run(self, *cmd: str) -> None:
        r = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True,
                           timeout=scaled(SERVICE + QUICK))
        if r.returncode != 0:
            log = _tail(self.log, 2000)
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr or r.stdout}\n{log}")

    def start(self) -> str:
        b = self.bindir
        self._run(f"{b}/initdb", "-D", self.data, "-U", "mlflow", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c full_page_writes=off")
        self._run(f"{b}/pg_ctl", "-D", self.data, "-o", opts, "-l", self.log, "-w", "-t",
                  str(int(scaled(SERVICE))), "start")
        self._run(f"{b}/createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow",
                  "mlflow")
        return f"postgresql+psycopg://mlflow@127.0.0.1:{self.port}/mlflow"

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            self._run(f"{self.bindir}/pg_ctl", "-D", self.data, "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server --serve-artifacts` over `backend` on a free loopback port."""

    def __init__(self, backend: str, artifacts: str, port: int | None = None) -> None:
        exe = shutil.which("mlflow") or os.path.join(os.path.dirname(sys.executable), "mlflow")
        if not os.path.exists(exe):
            missing("the `mlflow` executable is not installed")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(artifacts, "server.log")
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [exe, "server", "--backend-store-uri", backend, "--serve-artifacts",
             "--artifacts-destination", os.path.join(artifacts, "store"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        """/health answers before the backend store is ready: the API must answer too."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=scaled(5)) as r:
                ok = r.status == 200
            with urllib.request.urlopen(
                    f"{self.url}/api/2.0/mlflow/experiments/search?max_results=1",
                    timeout=scaled(30)) as r:
                return ok and r.status == 200
        except OSError:
            return False

    def wait(self, seconds: float = SERVICE) -> str:
        """The server's URL once it answers; it is stopped, and the error carries its log,
        if it exits or does not answer within `scaled(seconds)` (tests/timeouts.py)."""
        try:
            wait_until(lambda: self.healthy() or self.proc.poll() is not None, seconds,
                       "mlflow server start", every=0.5)
        except AssertionError as e:
            self._failed(str(e))
        if self.proc.poll() is not None:
            self._failed(f"it exited with {self.proc.returncode}")
        return self.url

    def _failed(self, why: str) -> None:
        self.log.flush()
        self.stop()
        raise RuntimeError(f"mlflow server did not become healthy ({why}):\n"
                           + _tail(self.log_path, 3000))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(scaled(STOP))
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(scaled(STOP))
        self.log.close()
