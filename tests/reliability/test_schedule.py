"""The nightly deployment fires while its previous run is still going: the deployment's
concurrency limit (1, ENQUEUE, in infra/prefect.yaml) makes the new run wait, then run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture
def cpu_worker(tmp_path):
    """The deployments registered on this session's Prefect server and a process worker on `cpu`."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "client")}
    deployed = subprocess.run([str(BIN / "r1flow"), "deploy"], cwd=PROJECT, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "cpu"], cwd=PROJECT,
                              env={**env, "PREFECT_HOME": str(tmp_path / "worker"),
                                   "PREFECT_WORKER_QUERY_SECONDS": "1"},
                              stdout=(tmp_path / "worker.log").open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_the_nightly_run_firing_during_the_previous_one_waits_for_it_then_completes(cpu_worker, tmp_path):
    """Two runs of the nightly deployment at once: the second is held in AwaitingConcurrencySlot
    while the first runs (never both Running), then runs, and both complete."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    parameters = {"config": str(PROJECT / "configs" / "micro.yaml"), "root": str(tmp_path),
                  "overrides": ["runtime.device=cpu", "stages=[base]"]}
    runs = [run_deployment("r1flow/nightly", parameters=parameters, timeout=0) for _ in range(2)]
    seen: list[tuple[str, str]] = []
    deadline = time.time() + 600
    with get_client(sync_client=True) as client:
        while True:
            states = [client.read_flow_run(r.id).state for r in runs]
            seen.append(tuple(s.name for s in states))
            if all(s.is_final() for s in states) or time.time() > deadline:
                break
            time.sleep(0.5)
    assert [s.name for s in states] == ["Completed", "Completed"], seen[-1]
    assert ("Running", "Running") not in seen
    assert any("AwaitingConcurrencySlot" in pair for pair in seen), sorted(set(seen))
