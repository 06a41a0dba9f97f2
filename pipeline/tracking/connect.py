"""Connecting to a tracking store: the one place MLflow clients are made.

Credentials never reach MLflow inside a URI: `connect` takes `user:password@` out of an
http(s) URI and hands them to MLflow through its own environment variables
(MLFLOW_TRACKING_USERNAME / _PASSWORD) of this process, so nothing MLflow prints ("View run …
at: http://host/…") or raises can show them. `timeout` (`tracking.timeout_seconds`) bounds each
request of this process (MLFLOW_HTTP_REQUEST_TIMEOUT, one retry after a second), so a server
that stops answering costs seconds, not MLflow's default retry cycle of about four minutes.
A server given up during a run (`give_up`) is not asked again by that run in this process:
every epoch logger of the jobs a Ray worker runs checks `given_up` first.
"""
from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit

import mlflow

RETRIES = "1"           # MLFLOW_HTTP_REQUEST_MAX_RETRIES under a timeout
BACKOFF = "1"           # MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR: one second before the retry
_GIVEN_UP: set[tuple[str, str]] = set()     # (URI without credentials, run id)


def split_credentials(uri: str | None) -> tuple[str | None, str | None, str | None]:
    """(the URI without `user:password@`, user, password) of an http(s) URI; other URIs (and
    None: MLflow's default) as they are, with no credentials."""
    if not uri or not uri.startswith(("http://", "https://")):
        return uri, None, None
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None, None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = host + (f":{parts.port}" if parts.port else "")
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, unquote(parts.username or "") or None, unquote(parts.password or "") or None


def connect(uri: str | None, timeout: float | None = None) -> str | None:
    """The URI to hand MLflow: without credentials, which go to MLFLOW_TRACKING_USERNAME /
    _PASSWORD of this process instead (the URI's win over the environment's). `timeout`:
    each HTTP request of this process waits at most that many seconds, retried once."""
    clean, user, password = split_credentials(uri)
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    if timeout is not None and clean and clean.startswith(("http://", "https://")):
        os.environ.update(MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, int(timeout))),
                          MLFLOW_HTTP_REQUEST_MAX_RETRIES=RETRIES,
                          MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=BACKOFF)
    return clean


def client(uri: str | None, timeout: float | None = None) -> mlflow.MlflowClient:
    """A client bound to `uri` (credentials taken out, see `connect`) for runs and the Model
    Registry alike."""
    clean = connect(uri, timeout)
    return mlflow.MlflowClient(tracking_uri=clean, registry_uri=clean)


def unreachable(e: BaseException) -> bool:
    """Did `e` come from a server that does not answer (as opposed to a refused request)?"""
    text = f"{type(e).__name__} {e}".lower()
    return any(k in text for k in ("max retries exceeded", "connection refused",
                                   "failed to establish", "timed out", "connectionerror",
                                   "remotedisconnected", "name or service not known"))


def give_up(uri: str, run_id: str | None) -> None:
    """Run `run_id`'s server stopped answering: this process asks it nothing more for it."""
    if run_id:
        _GIVEN_UP.add((split_credentials(uri)[0], run_id))


def given_up(uri: str, run_id: str | None) -> bool:
    return bool(run_id) and (split_credentials(uri)[0], run_id) in _GIVEN_UP
