"""`r1flow ui` serves both UIs on loopback and stops them on interrupt."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.servers import free_port, wait_for


@pytest.mark.slow
def test_ui_starts_mlflow_and_prefect_on_loopback(tmp_path):
    mlflow_port, prefect_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    (tmp_path / "profile.yaml").write_text(f"workspace: {tmp_path / 'workspace'}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--config", str(tmp_path / "profile.yaml"),
         "--mlflow-port", str(mlflow_port), "--prefect-port", str(prefect_port)],
        cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", process, 120)  # 200, or it fails
        wait_for(f"http://127.0.0.1:{prefect_port}/api/health", process, 120)
    finally:
        process.send_signal(signal.SIGINT)  # works even where pytest runs with SIGINT ignored (nohup, `&`)
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # leave no server behind, then fail
            raise
    assert f"http://127.0.0.1:{mlflow_port}" in output and f"http://127.0.0.1:{prefect_port}" in output
