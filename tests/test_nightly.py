"""Scheduled retraining as users run it: the `retrain` deployment (configs/nightly.yaml) on a
Prefect server and a process worker, data in SeaweedFS, MLflow on PostgreSQL with its artifacts
in the bucket. Countdown problems in TinyZero's columns, without worked solutions, land under
the data prefix night after night; each night is a deployment run, as the schedule starts it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import drop_database, postgres_database

from flows.servers import BUCKET, Ports, free_port, start_stack, stop

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "nightly-r1-zero"
PREFIX = f"s3://{BUCKET}/nightly"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The servers, the deployments registered by `r1flow deploy` and one worker on the `cpu` pool;
    yields the stack and the environment a client needs."""
    database = postgres_database()
    if database is None:
        pytest.skip("no PostgreSQL answers on 127.0.0.1:5432")
    folder = tmp_path_factory.mktemp("servers")
    ports = Ports(s3=free_port(), mlflow=free_port(), prefect=free_port())
    stack, processes = start_stack(folder, ports=ports, backend=f"postgresql+psycopg2://postgres@127.0.0.1:5432/"
                                   f"{database}", mlflow_workers=1)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, **stack.environment()}
    try:
        deployed = subprocess.run([str(BIN / "r1flow"), "deploy"], cwd=PROJECT, capture_output=True, text=True,
                                  env={**env, "PREFECT_HOME": str(folder / "client")}, timeout=300, check=False)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "cpu"], cwd=PROJECT, start_new_session=True,
            env={**env, "PREFECT_HOME": str(folder / "worker"), "PREFECT_WORKER_QUERY_SECONDS": "1",
                 "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true"},
            stdout=(folder / "worker.log").open("w"), stderr=subprocess.STDOUT)
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            # the environment alone does not move a client whose settings an earlier test loaded
            with pytest.MonkeyPatch.context() as patch, temporary_settings({PREFECT_API_URL: stack.prefect_api}):
                for key, value in env.items():
                    patch.setenv(key, value)
                yield stack
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)  # and any flow-run process it left
            worker.wait()
    finally:
        stop(processes)
        drop_database(database)


def countdown(path: Path, problems: list[tuple[list[int], int]]) -> Path:
    import pandas as pd

    pd.DataFrame({"nums": [n for n, _ in problems], "target": [t for _, t in problems]}).to_parquet(path)
    return path


def problems(start: int, count: int, wrong: bool = False) -> list[tuple[list[int], int]]:
    """Distinct Countdown problems, a + b with a third number spare; ``wrong``: a target no
    equation of the numbers reaches, so every reward teaches the wrong thing."""
    return [([a, a + 1, 7], 2 * a + 1 + (1000 if wrong else 0)) for a in range(start, start + count)]


def night(stack, root: Path) -> tuple[dict, float]:
    """One night, started as the schedule starts it (a run of the deployment, on the worker);
    returns its summary and the flow run's own seconds."""
    from prefect.deployments import run_deployment

    overrides = ["runtime.device=cpu", f"tracking.tracking_uri={stack.tracking_uri}", f"store={PREFIX}/store",
                 "data.task=countdown", "data.columns={numbers: nums, target: target}", "data.n_validation=8",
                 f"data.test_path={PREFIX}/test.parquet"]
    run = run_deployment("r1flow/retrain", parameters={"root": str(root), "overrides": overrides}, timeout=900,
                         poll_interval=1)
    assert run.state.is_completed(), run.state
    return run.state.result(), run.total_run_time.total_seconds()


def test_three_nights_new_data_from_the_bucket_continue_from_the_champion_and_a_bad_night_stays_candidate(
        cluster, tmp_path):
    from components.config import load_profile
    from components.promotion import crown, history
    from components.store import Store
    from components.tracking import Tracker
    from flows.reproduce import rerun
    from flows.workspace import locate

    fs, root = Store.at(PREFIX).fs, tmp_path / "worker"
    land = lambda name, rows: fs.put(str(countdown(tmp_path / name.replace("/", "-"), rows)), f"{PREFIX}/{name}")
    land("test.parquet", problems(500, 24))
    land("train/2026-12-01.parquet", problems(10, 120))
    tracker = Tracker(cluster.tracking_uri, "r1flow")

    first, seconds = night(cluster, root)  # nothing registered yet: from the fallback base
    assert set(first["stages"]) == {"data", "base", "r1_zero", "eval_base", "eval_r1_zero"}
    assert not any(first["stages"].values()) and first["versions"]["r1_zero"]["ref"] == f"{NAME}/1"
    assert tracker.run(first["run_id"]).tags["base_base"] == f"fallback ({NAME}@champion: none yet)"
    # A micro model gains nothing significant in 4 GRPO steps, so the gate keeps it candidate; the
    # operator promotes it (what `r1flow promote nightly-r1-zero/1 --yes` does).
    assert "beats its parent" in tracker.version(NAME, "1").tags["promotion"]
    crown(tracker, tracker.version(NAME, "1"), by_hand="night 1, the first champion")

    land("train/2026-12-02.parquet", problems(200, 60))  # new data: one more object
    second, _ = night(cluster, root)
    # Everything reran: the data (a new object) and, from the champion, the base, so all that reads either.
    assert not any(second["stages"].values())
    assert tracker.run(second["run_id"]).tags["base_base"] == f"{NAME}/1 ({NAME}@champion)"
    v2 = tracker.version(NAME, "2")
    assert v2.tags["parent_model"] == f"{NAME}/1" and v2.tags["data_hash"] == second["data_hash"] != \
        first["data_hash"]
    assert tracker.champion(NAME).version == "1"  # no significant gain over the champion on the same prompts
    # Paired with the champion on the same test prompts, though new training data changed the data key.
    assert v2.tags["promotion"].startswith("kept as candidate") and "another protocol" not in v2.tags["promotion"]
    assert f"(paired bootstrap over 24 prompts) vs champion {NAME}/1" in v2.tags["promotion"]

    third, third_seconds = night(cluster, root)  # nothing new: every stage reused, nothing registered
    assert all(third["stages"].values()) and third["versions"]["r1_zero"] == {**second["versions"]["r1_zero"],
                                                                              "new": False}
    # Its cost is fixed (~8 s here: the registry, the listing, DVC, the report), night 1's is training:
    # under a quarter of a micro night 1 (~40 s), ~1% of a default-scale one (bench/nightly.py).
    assert third_seconds <= 0.25 * seconds, (third_seconds, seconds)

    land("train/2026-12-03.parquet", problems(300, 60, wrong=True))  # a planted bad night
    bad, _ = night(cluster, root)
    assert bad["stages"]["data"] is False and bad["stages"]["base"] is True  # the same champion, new data
    v3 = tracker.version(NAME, "3")
    assert tracker.champion(NAME).version == "1" and "kept as candidate" in v3.tags["promotion"]

    table = history(tracker, NAME)
    assert [(r["version"], r["parent"], r["champion"]) for r in table] == [
        ("1", table[0]["parent"], "yes"), ("2", f"{NAME}/1", ""), ("3", f"{NAME}/1", "")]
    assert table[0]["night"] == first["run_id"] and table[1]["data"] == second["data_hash"]

    # Night 1 again from what MLflow and DVC recorded, whatever has landed since: its metrics exactly.
    profile = load_profile(PROJECT / "configs" / "nightly.yaml")
    again, comparisons, _ = rerun(first["run_id"], locate(profile, root), cluster.tracking_uri)
    assert comparisons and all(c.matches(0.0) for c in comparisons), [str(c) for c in comparisons]
    assert again["stages"] == {**{name: True for name in first["stages"]}, "data": False}  # DVC's copy, night 1's key
    assert json.loads(tracker.read_artifact(first["run_id"], "profile.json"))["base"]["source"] == "tiny"
