"""Integration: the pipeline deployed to a real Prefect server and run by process workers (GPU
stages on the `gpu` pool), tracked by a real MLflow server backed by PostgreSQL; the same
assertions as against the local store (``helpers.check_runs`` and the rest)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import POSTGRES, check_registry, check_report, check_runs, drop_database, postgres_database

from flows.servers import free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
MICRO = str(ROOT / "configs" / "micro.yaml")


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)  # a worker's graceful stop can take 20 s; the test is over by then
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # and any flow-run process a worker left
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 over PostgreSQL; SQLite, with a warning, where there is none."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    database = postgres_database()
    if database:
        backend = f"postgresql+psycopg2://{POSTGRES['user']}@127.0.0.1:5432/{database}"
    else:
        backend = f"sqlite:///{folder / 'mlflow.db'}"
        warnings.warn("no PostgreSQL answers on 127.0.0.1:5432: the MLflow server runs on SQLite", stacklevel=1)
    print(f"MLflow server backend: {backend}")
    port = free_port()
    server = _start([str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination",
                     str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                    {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, folder / "server.log")
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, 180)
        yield f"http://127.0.0.1:{port}", backend
    finally:
        _stop(server)
        if database:
            drop_database(database)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server on 127.0.0.1, the deployments registered by `r1flow deploy`, and one
    process worker on each pool; yields the API URL and the environment clients need."""
    folder = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    common = {**base, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LOG_PRINTS": "true"}
    processes = [_start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                        {**common, "PREFECT_HOME": str(folder / "server")}, folder / "server.log")]
    try:
        wait_for(f"{api}/health", processes[0], 180)
        client_env = {**common, "PREFECT_HOME": str(folder / "client"), "PREFECT_API_URL": api}
        deployed = subprocess.run([str(BIN / "r1flow"), "deploy"], cwd=ROOT, env=client_env, capture_output=True,
                                  text=True, timeout=300, check=False)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        for pool in ("cpu", "gpu"):
            processes.append(_start(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"{pool}-worker"],
                {**client_env, "PREFECT_HOME": str(folder / pool), "PREFECT_WORKER_QUERY_SECONDS": "1",
                 "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true"}, folder / f"worker-{pool}.log"))
        yield api
    finally:
        for process in reversed(processes):
            _stop(process)


def test_deployed_pipeline_runs_on_workers_and_tracks_to_the_mlflow_server(prefect_server, mlflow_server,
                                                                           tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    uri, _ = mlflow_server
    overrides = ["runtime.device=cpu", "runtime.gpu_deployment=r1flow-stage/{stage}", "runtime.gpu_components=[grpo]",
                 f"tracking.tracking_uri={uri}"]
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        run = run_deployment("r1flow/nightly", parameters={"config": MICRO, "overrides": overrides,
                                                           "root": str(tmp_path)}, timeout=1200, poll_interval=2)
        assert run.state.is_completed(), run.state
        summary = run.state.result()
        with get_client(sync_client=True) as client:
            pipeline = client.read_flow_run(run.id)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert pipeline.labels["prefect.worker.name"] == "cpu-worker"
    sent = {r.name: r for r in children}
    # the GRPO stages, sent to the gpu pool's deployments
    assert set(sent) == {"r1_zero", "r1_rl", "r1_final", "student_rl"}
    assert all(r.state.is_completed() and r.labels["prefect.worker.name"] == "gpu-worker" for r in sent.values())
    assert summary["tracking_uri"] == uri and not any(summary["stages"].values())
    check_runs(summary)
    check_report(summary)
    check_registry(summary)
