"""Servers lost mid-run: the MLflow server killed, its PostgreSQL restarted. Finished stages keep
their outputs; the run (or its rerun) completes tracking and registration without retraining."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import finish, wait_until
from mlflow.tracking import MlflowClient

from flows.servers import free_port, wait_for

PROJECT = Path(__file__).resolve().parents[2]
MICRO = str(PROJECT / "configs" / "micro.yaml")
BIN = Path(sys.executable).parent
# A run short enough to kill in the middle of: data, base, R1-Zero and their evaluations.
ARGS = ["--set", "runtime.device=cpu", "--set", "stages=[eval_r1_zero]"]

pytestmark = pytest.mark.slow


class Postgres:
    """A private PostgreSQL cluster on a free port, owned by the `postgres` user: this test
    restarts it, which it must never do to the machine's shared one."""

    def __init__(self):
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found or os.geteuid() != 0:
            pytest.skip("needs PostgreSQL's server binaries and root (to run them as `postgres`)")
        self.bin, self.port = found[-1].parent, free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="r1flow-pg-"))
        shutil.chown(self.folder, "postgres", "postgres")
        self.pg("initdb", "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres")

    def pg(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def ctl(self, action: str) -> None:
        self.pg("pg_ctl", "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w", "-m", "fast",
                "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", action)

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.ctl("stop")
        shutil.rmtree(self.folder, ignore_errors=True)


class MlflowServer:
    def __init__(self, backend: str, folder: Path):
        self.backend, self.folder, self.port = backend, folder, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.folder / "mlflow.log").open("a")
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend, "--artifacts-destination",
             str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=log,
            start_new_session=True)
        wait_for(f"{self.uri}/health", self.process, 180)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def postgres():
    cluster = Postgres()
    try:
        cluster.ctl("start")
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    server = MlflowServer(postgres.uri, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def run(root: Path, uri: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", MICRO, *ARGS, "--set",
                             f"tracking.tracking_uri={uri}", "--summary-json", str(root / "summary.json")],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished_stages(root: Path) -> set[str]:
    stages = root / ".r1flow" / "stages"
    return {p.parent.parent.name for p in stages.glob("*/*/result.json") if not p.parent.name.startswith(".")}


def interrupt_then_complete(root: Path, server: MlflowServer, fault, repair) -> tuple[set[str], dict, str]:
    """Start a run, apply ``fault`` once the base model is done (R1-Zero then trains through it),
    ``repair``, and run again if the first did not survive; returns (stages finished when the
    first run ended, the summary that completed, its output)."""
    first = run(root, server.uri)
    wait_until(lambda: "base" in finished_stages(root), 900, "base output", first)
    assert first.poll() is None, finish(first)[-3000:]
    fault()
    repair()
    out = finish(first)
    if first.returncode == 0:  # it rode the fault out: nothing was left to redo
        return set(), json.loads((root / "summary.json").read_text()), out
    before = finished_stages(root)
    again = run(root, server.uri)
    out = finish(again)
    assert again.returncode == 0, out[-3000:]
    return before, json.loads((root / "summary.json").read_text()), out


def check_completed(server: MlflowServer, before: set[str], summary: dict) -> None:
    retrained = {name for name, cached in summary["stages"].items() if not cached} & before
    assert not retrained, f"retrained after the fault: {retrained}"
    client = MlflowClient(server.uri)
    registered = {m.name: [v.version for v in client.search_model_versions(f"name = '{m.name}'")]
                  for m in client.search_registered_models()}
    assert registered.get("r1flow-r1-zero") is not None and all(len(v) == 1 for v in registered.values())
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags.get("data_hash")


def test_mlflow_server_killed_mid_run_and_restarted_the_rerun_completes_without_retraining(mlflow_server, tmp_path):
    """The MLflow server is SIGKILLed while R1-Zero trains, then restarted: the run fails or rides
    it out; either way every stage finished by then is reused, tracking and registration
    complete, and no model is registered twice."""
    root = tmp_path / "root"
    root.mkdir()

    def restart_later() -> None:
        time.sleep(20)  # longer than the client's retries (1+2+4+8 s) for a call made meanwhile
        mlflow_server.start()

    before, summary, _ = interrupt_then_complete(root, mlflow_server, mlflow_server.kill, restart_later)
    check_completed(mlflow_server, before, summary)


def test_postgresql_restarted_under_the_mlflow_server_mid_run_loses_nothing(postgres, mlflow_server, tmp_path):
    """PostgreSQL, under the MLflow server, is restarted while R1-Zero trains: the run rides it out
    or its rerun completes; finished stages are never retrained and no model is registered twice."""
    root = tmp_path / "root"
    root.mkdir()
    before, summary, _ = interrupt_then_complete(root, mlflow_server, lambda: postgres.ctl("restart"), lambda: None)
    check_completed(mlflow_server, before, summary)
