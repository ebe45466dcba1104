"""Exposure: what r1flow serves listens on loopback unless told otherwise, and a secret in the
environment or a profile reaches no record a run leaves (MLflow, Prefect, specs, logs, reports)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import drop_database, postgres_database

from components.config import ConfigError, load_profile
from flows.servers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
MICRO = str(ROOT / "configs" / "micro.yaml")
LOOPBACK = {"127.0.0.1", "::1"}


# --- listening sockets ----------------------------------------------------------------------
def answers(url: str) -> bool:
    """Whether anything answers HTTP at ``url`` (an error status counts: S3 says 403 before auth)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def wait_until_all_answer(process: subprocess.Popen, urls: list[str], seconds: float) -> None:
    deadline = time.time() + seconds
    pending = list(urls)
    while pending:
        assert process.poll() is None, f"{process.args[:2]} exited ({process.returncode}) before {pending} answered"
        assert time.time() < deadline, f"{pending} did not answer within {seconds:.0f} s"
        pending = [url for url in pending if not answers(url)]
        time.sleep(1)


def tree(pid: int) -> list[psutil.Process]:
    """A process and every descendant (the servers start theirs in sessions of their own)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listening(processes: list[psutil.Process]) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket these processes listen on."""
    found = set()
    for process in processes:
        try:
            found |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return found


def stop(process: subprocess.Popen, started: list[psutil.Process]) -> None:
    """Ctrl-C, as a person stops it; then SIGKILL to whatever it left, each process by its own id."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pass
    left = [p for p in started + tree(process.pid) if p.is_running()]
    for leftover in left:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    process.wait(timeout=10)


def serve_and_list(command: list[str], env: dict, log: Path, urls: list[str]) -> set[tuple[str, int]]:
    """Start an r1flow command that serves, wait until every URL answers, list what its process tree
    listens on, and stop it (bounded), whatever happened."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    started: list[psutil.Process] = []
    try:
        wait_until_all_answer(process, urls, 300)
        time.sleep(2)  # ports a server opens just after it first answers
        started = tree(process.pid)
        return listening(started)
    finally:
        stop(process, started)


def high_free_port() -> int:
    """A free port above 55535, where SeaweedFS's default gRPC port (HTTP port + 10000) cannot exist."""
    for port in range(60999, 55535, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port above 55535")


def test_r1flow_servers_listen_on_loopback_only(tmp_path):
    """Every TCP port that ``r1flow servers`` (SeaweedFS, MLflow, Prefect) listens on, in its whole
    process tree, is bound to loopback when no --host is given, with the S3, MLflow and Prefect ports
    among them and none of SeaweedFS's ports left to its fallback (an S3 port above 55535 included)."""
    s3, mlflow, prefect = high_free_port(), free_port(), free_port()
    database = postgres_database(create=False)  # `r1flow servers` makes it
    backend = (f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}" if database
               else f"sqlite:///{tmp_path / 'mlflow.db'}")
    command = [str(BIN / "r1flow"), "servers", "--s3-port", str(s3), "--mlflow-port", str(mlflow),
               "--prefect-port", str(prefect), "--backend", backend, "--mlflow-workers", "1",
               "--folder", str(tmp_path / "servers")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # keys made in the folder
    try:
        ports = serve_and_list(command, env, tmp_path / "servers.log", [
            f"http://127.0.0.1:{s3}", f"http://127.0.0.1:{mlflow}/health", f"http://127.0.0.1:{prefect}/api/health"])
    finally:
        if database:
            drop_database(database)
    print(f"r1flow servers listens on {sorted(ports)}")
    assert {s3, mlflow, prefect} <= {port for _, port in ports}, ports
    assert {address for address, _ in ports} <= LOOPBACK, sorted(ports)
    weed = (tmp_path / "servers" / "seaweedfs" / "seaweedfs.log").read_text()
    assert "finding alternative" not in weed and "invalid port" not in weed  # every gRPC port given


def test_r1flow_ui_listens_on_loopback_only(tmp_path):
    """Every TCP port that ``r1flow ui`` (the MLflow and Prefect UIs) listens on, in its whole process
    tree, is bound to loopback when no --host is given, and both UI ports are among them."""
    mlflow, prefect = free_port(), free_port()
    (tmp_path / "profile.yaml").write_text(f"workspace: {tmp_path / 'workspace'}\n")
    command = [str(BIN / "r1flow"), "ui", "--config", str(tmp_path / "profile.yaml"), "--mlflow-port", str(mlflow),
               "--prefect-port", str(prefect)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    ports = serve_and_list(command, env, tmp_path / "ui.log", [f"http://127.0.0.1:{mlflow}/health",
                                                               f"http://127.0.0.1:{prefect}/api/health"])
    print(f"r1flow ui listens on {sorted(ports)}")
    assert {mlflow, prefect} <= {port for _, port in ports}, ports
    assert {address for address, _ in ports} <= LOOPBACK, sorted(ports)


# --- planted secrets ------------------------------------------------------------------------
# Names a machine running r1flow may well have set; each gets a value no record may contain.
PLANTED = ("R1FLOW_PLANTED_API_KEY", "R1FLOW_PLANTED_SECRET", "R1FLOW_PLANTED_TOKEN", "R1FLOW_DB_PASSWORD",
           "MLFLOW_TRACKING_PASSWORD", "PGPASSWORD", "HF_TOKEN", "WANDB_API_KEY")


def planted_value() -> str:
    return f"planted{secrets.token_hex(12)}"


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


def holding(files: list[Path], values: list[str]) -> list[str]:
    """``path: value`` for each file whose bytes contain one of the values."""
    return [f"{path}: {value}" for path in files for value in values if value.encode() in path.read_bytes()]


def prefect_records() -> str:
    """Every flow run's parameters and every log line the session's Prefect server holds, as text."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        logs = client.read_logs()
    return json.dumps([r.parameters for r in runs] + [log.message for log in logs], default=str)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A secret planted in each ``PLANTED`` variable, one profile URI with a password refused by
    ``r1flow run``, then the micro pipeline run in-process with those variables set."""
    from flows.pipeline import r1_pipeline

    tmp = tmp_path_factory.mktemp("planted")
    env_secrets = {name: planted_value() for name in PLANTED}
    uri_secret = planted_value()
    with pytest.MonkeyPatch.context() as env:
        for name, value in env_secrets.items():
            env.setenv(name, value)
        refused = subprocess.run(
            [str(BIN / "r1flow"), "run", "--config", MICRO, "--set", "runtime.device=cpu", "--set",
             f"tracking.tracking_uri=postgresql://postgres:{uri_secret}@127.0.0.1:5432/r1flow_none"],
            cwd=tmp, env={**os.environ, "R1FLOW_ROOT": str(tmp / "cli")}, capture_output=True, text=True,
            timeout=300, check=False)
        started = time.time()
        root = tmp / "project"
        # Stages through a registered, evaluated model: every kind of record a run leaves.
        summary = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "stages=[eval_r1_zero]"], root=str(root))
        print(f"micro pipeline with planted secrets: {time.time() - started:.0f} s")
    return {"env": env_secrets, "uri": uri_secret, "refused": refused, "root": root, "summary": summary,
            "cli": tmp / "cli"}


def test_a_password_in_a_profile_uri_is_refused_naming_the_key_without_echoing_it(planted_run):
    """``r1flow run --set tracking.tracking_uri=postgresql://user:SECRET@...`` stops with one config
    error line that names the key and points to the environment, never printing the secret; nothing starts."""
    refused = planted_run["refused"]
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output
    assert output.count("\n") == 1 and "tracking.tracking_uri: credentials in the URI" in output, output
    assert "MLFLOW_TRACKING_USERNAME/PASSWORD, PGPASSWORD" in output
    assert planted_run["uri"] not in output
    assert not planted_run["cli"].exists()  # refused before the flow: no workspace, no Prefect flow run
    secret = planted_value()
    for uri in (f"tracking.tracking_uri=http://user:{secret}@127.0.0.1:5000", f"store=s3://key:{secret}@bucket/p",
                f"tracking.tracking_uri=postgresql://127.0.0.1/db?password={secret}"):
        with pytest.raises(ConfigError) as error:
            load_profile(MICRO, [uri])
        assert secret not in str(error.value) and "set them in the environment" in str(error.value)


def test_planted_secrets_reach_no_record_of_a_run(planted_run):
    """After a micro pipeline run with secrets planted in ``*_KEY``, ``*_SECRET``, ``*_TOKEN`` and
    ``*PASSWORD*`` variables, and after a profile URI with a password was refused, none of those values is
    in the MLflow store (database and artifacts), the Prefect server's database and records, a stage spec,
    a log or a report."""
    summary, root = planted_run["summary"], planted_run["root"]
    values = [*planted_run["env"].values(), planted_run["uri"]]
    session = Path(os.environ["PREFECT_HOME"]).parent  # tests/conftest.py's session folder
    files = files_under(root, session)
    names = {p.name for p in files}
    assert {"spec.json", "mlflow.db", "prefect.db"} <= names, sorted(names)
    assert any(name.endswith(".log") for name in names) and any(name.endswith(".md") for name in names)
    # The scan reads the stores this run wrote: its MLflow run and its Prefect parameters are in them.
    prefect_db = [p for p in files if p.name.startswith("prefect.db")]
    assert any(summary["run_id"].replace("-", "").encode() in p.read_bytes() for p in files if p.name == "mlflow.db")
    assert any(str(root).encode() in p.read_bytes() for p in prefect_db)
    assert holding(files, values) == []
    records = prefect_records()
    assert str(root) in records and not any(value in records for value in values)
