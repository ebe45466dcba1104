"""`r1flow ui` serves both UIs on loopback and stops them on interrupt."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float) -> int:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.mark.slow
def test_ui_starts_mlflow_and_prefect_on_loopback(tmp_path):
    mlflow_port, prefect_port = _free_port(), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    (tmp_path / "profile.yaml").write_text(f"workspace: {tmp_path / 'workspace'}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--config", str(tmp_path / "profile.yaml"), "--mlflow-port", str(mlflow_port), "--prefect-port",
         str(prefect_port)], cwd=Path(__file__).parents[1], env=env, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        assert _wait_for(f"http://127.0.0.1:{mlflow_port}/health", 120) == 200
        assert _wait_for(f"http://127.0.0.1:{prefect_port}/api/health", 120) == 200
    finally:
        process.send_signal(signal.SIGINT)  # works even where pytest runs with SIGINT ignored (nohup, `&`)
        try:
            output, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # leave no server behind, then fail
            raise
    assert f"http://127.0.0.1:{mlflow_port}" in output and f"http://127.0.0.1:{prefect_port}" in output
