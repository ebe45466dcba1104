"""The servers that workers on other machines share, started on one machine: SeaweedFS (the S3
stage store), an MLflow server on PostgreSQL whose artifacts go to the same bucket, and a Prefect
server. ``r1flow servers`` runs them all; the multi-host test starts them the same way.

Each binds to ``host``: 127.0.0.1 unless told otherwise. SeaweedFS's defaults are overridden:
it would bind every interface, report telemetry, and serve an admin UI and WebDAV.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
BUCKET = "r1flow"
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/r1flow"


@dataclass(frozen=True)
class Ports:
    s3: int = 8333
    mlflow: int = 5000
    prefect: int = 4200


@dataclass(frozen=True)
class Stack:
    """Where the servers answer, and the environment a client or worker needs (credentials
    included: keep it out of logs)."""

    host: str
    ports: Ports
    keys: dict[str, str]

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.ports.prefect}/api"

    def environment(self) -> dict[str, str]:
        return {**self.keys, "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "PREFECT_API_URL": self.prefect_api}


def s3_keys(folder: Path) -> dict[str, str]:
    """Access keys from the environment, else from ``folder/s3.env`` (made once, mode 600)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    if all(os.environ.get(n) for n in names):
        return {n: os.environ[n] for n in names}
    saved = folder / "s3.env"
    if not saved.exists():
        folder.mkdir(parents=True, exist_ok=True)
        saved.touch(mode=0o600)
        saved.write_text(f"export AWS_ACCESS_KEY_ID={secrets.token_hex(8)}\n"
                         f"export AWS_SECRET_ACCESS_KEY={secrets.token_hex(20)}\n")
    pairs = (line.removeprefix("export ").split("=", 1) for line in saved.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs if k in names}


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below 55536: some SeaweedFS parts dial a port + 10000 whatever their flags
    say (seen: a plugin worker dialling "70099" for an admin port of 60099)."""
    for _ in range(100):  # the kernel hands out 32768-60999: four in five fit
        with socket.socket() as s:
            s.bind((host, 0))
            if (port := s.getsockname()[1]) < 55536:
                return port
    raise OSError(f"no free port below 55536 on {host} in 100 tries")


def seaweedfs(folder: Path, host: str, port: int, keys: dict[str, str]) -> subprocess.Popen:
    """``weed mini`` (master, volume, filer, S3 in one process) serving S3 on ``host:port`` with
    one identity: these access keys, full rights; returned once S3 answers."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = folder / "s3-identity.json"
    identity.touch(mode=0o600)
    identity.write_text(json.dumps({"identities": [{
        "name": "r1flow", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        "credentials": [{"accessKey": keys["AWS_ACCESS_KEY_ID"], "secretKey": keys["AWS_SECRET_ACCESS_KEY"]}]}]}))
    # Every gRPC port too: weed's default (HTTP port + 10000) is past 65535 for a free port above
    # 55535; weed then listens elsewhere but its components still dial the invalid port.
    ports = {f"{name}.{kind}": free_port(host) for name in ("master", "volume", "filer", "admin")
             for kind in ("port", "port.grpc")}
    command = [str(BIN / "weed"), "mini", f"-dir={folder / 'data'}", f"-ip={host}", f"-ip.bind={host}",
               "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", f"-s3.config={identity}", f"-s3.port={port}", f"-bucket={BUCKET}",
               f"-s3.port.grpc={free_port(host)}", *(f"-{name}={number}" for name, number in ports.items())]
    process = _start(command, folder / "seaweedfs.log", os.environ)
    try:
        wait_for(f"http://{host}:{port}", process, 60, answered=lambda status: True)  # 403 before auth: it is up
    except BaseException:
        stop([process])
        raise
    return process


def mlflow_server(folder: Path, stack: Stack, backend: str, artifacts: str, workers: int = 4) -> subprocess.Popen:
    """``mlflow server`` on ``backend`` serving artifacts from ``artifacts`` (the bucket): a worker
    needs only the tracking URI, never the bucket's credentials, to log a model. Each of its
    ``workers`` imports MLflow anew: on SQLite, 4 (MLflow's default) took 18.6 s of CPU to answer, 1 took 8.1."""
    env = {**os.environ, **stack.keys, "MLFLOW_S3_ENDPOINT_URL": stack.endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
               "--serve-artifacts", "--host", stack.host, "--port", str(stack.ports.mlflow), "--workers", str(workers)]
    return _start(command, folder / "mlflow.log", env)


def prefect_server(folder: Path, stack: Stack) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [str(BIN / "prefect"), "server", "start", "--host", stack.host, "--port", str(stack.ports.prefect)]
    return _start(command, folder / "prefect.log", env)


def ensure_database(backend: str) -> None:
    """Create the PostgreSQL database the MLflow server uses, if missing."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(backend)
    connection = psycopg2.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                                  dbname="postgres", connect_timeout=5)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (url.database,))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{url.database}"')
    connection.close()


def start_stack(folder: Path, host: str = "127.0.0.1", ports: Ports | None = None, backend: str = POSTGRES,
                keys: dict[str, str] | None = None, mlflow_workers: int = 4) -> tuple[Stack, list[subprocess.Popen]]:
    """SeaweedFS, then MLflow (its artifacts in the bucket) and Prefect; returns once all answer."""
    stack = Stack(host, ports or Ports(), keys or s3_keys(folder))
    if backend.startswith("postgresql"):
        ensure_database(backend)
    processes = [seaweedfs(folder / "seaweedfs", host, stack.ports.s3, stack.keys)]
    try:
        processes.append(mlflow_server(folder, stack, backend, f"s3://{BUCKET}/mlflow", mlflow_workers))
        processes.append(prefect_server(folder, stack))
        wait_for(f"{stack.tracking_uri}/health", processes[1], 180)
        wait_for(f"{stack.prefect_api}/health", processes[2], 180)
    except BaseException:
        stop(processes)
        raise
    return stack, processes


def wait_for(url: str, process: subprocess.Popen, seconds: float, answered=lambda status: status == 200) -> None:
    """Poll ``url`` once a second until it answers (bounded), failing early if the server exits."""
    for _ in range(int(seconds)):
        if process.poll() is not None:
            raise RuntimeError(f"{shlex.join(process.args[:3])} exited ({process.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if answered(response.status):
                    return
        except urllib.error.HTTPError as error:
            if answered(error.code):
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to each server's process group (a server's own children too), SIGKILL after 20 s."""
    for process in reversed(processes):
        _signal_group(process, signal.SIGTERM)
    for process in reversed(processes):
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()


def _signal_group(process: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


def _start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
