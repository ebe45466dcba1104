"""One answer to "where is this run's state": every command finds what `r1flow run` wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.config import load_profile
from flows.workspace import locate

PROJECT = Path(__file__).resolve().parents[1]
MICRO = str(PROJECT / "configs" / "micro.yaml")


def test_the_root_is_the_argument_else_r1flow_root_else_the_working_directory(tmp_path, monkeypatch):
    profile = load_profile(None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("R1FLOW_ROOT", raising=False)
    here = locate(profile)
    assert here.root == tmp_path and here.workspace == tmp_path / ".r1flow"
    assert here.tracking_uri == f"sqlite:///{tmp_path / '.r1flow' / 'mlflow.db'}" and here.experiment == "r1flow"
    monkeypatch.setenv("R1FLOW_ROOT", str(tmp_path / "env"))
    assert locate(profile).workspace == tmp_path / "env" / ".r1flow"
    assert locate(profile, tmp_path / "given").root == tmp_path / "given"
    served = load_profile(None, ["tracking.tracking_uri=http://127.0.0.1:5000", "tracking.experiment=nightly"])
    assert (locate(served).tracking_uri, locate(served).experiment) == ("http://127.0.0.1:5000", "nightly")


@pytest.mark.slow
def test_promote_eval_and_rerun_find_the_run_that_r1flow_root_points_at_from_another_directory(tmp_path):
    """`r1flow run` with R1FLOW_ROOT set, from one directory; `promote`, `eval` and `rerun` from
    another: each opens that run's store (none creates one where it stands)."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "R1FLOW_ROOT": str(root), "COLUMNS": "400"}  # rich: no wrapped paths

    def r1flow(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--config", MICRO], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout

    r1flow("run", "--set", "runtime.device=cpu", "--set", "stages=[eval_r1_zero]", "--summary-json",
           str(tmp_path / "summary.json"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tracking_uri"] == f"sqlite:///{root / '.r1flow' / 'mlflow.db'}"
    assert "champion of r1flow-r1-zero is now v1" in r1flow("promote", "r1flow-r1-zero/1", "--yes")
    evaluated = r1flow("eval", "r1flow-r1-zero@champion", "-b", "countdown", "--limit", "2")
    assert f"MLflow: {summary['tracking_uri']}" in evaluated  # logged into the run's store
    assert "reproduced:" in r1flow("rerun", summary["run_id"])
    assert not (elsewhere / ".r1flow").exists() and not (elsewhere / "mlflow.db").exists()
