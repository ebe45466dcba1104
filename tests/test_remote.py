"""flows.remote against the session's Prefect server: a stage across machines is one flow run per
machine, each told its rank and one rendezvous; when one fails, the others are cancelled, and
when the pipeline run is stopped, all of them."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from flows import launch, remote


@pytest.fixture
def sent(monkeypatch):
    """A stage sent to a deployment of its own across three machines, in a thread; returns the
    client, the three flow runs by rank, the thread and what it returned or raised."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    monkeypatch.setattr(remote, "POLL_SECONDS", 0.2)
    launch.STOPPING.clear()
    pool = f"machines-{uuid.uuid4().hex[:8]}"  # no worker polls it: the runs stay scheduled until told
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        flow_id = client.create_flow_from_name("r1flow-stage")
        deployment = client.create_deployment(flow_id, pool, work_pool_name=pool,
                                              entrypoint="flows/pipeline.py:stage_flow")
        result: dict = {}

        def send():
            try:
                result["states"] = remote.launched(f"r1flow-stage/{pool}", "r1_zero", {"stage": "r1_zero"}, 3)
            except launch.Stopped as stopped:
                result["stopped"] = stopped

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        only_ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment]))
        for _ in range(300):  # the three runs appear at once: at most 30 s
            runs = client.read_flow_runs(deployment_filter=only_ours)
            if len(runs) == 3:
                break
            time.sleep(0.1)
        env = {run.id: run.job_variables["env"] for run in runs}
        by_rank = {int(e["R1FLOW_MACHINE_RANK"]): run_id for run_id, e in env.items()}
        assert sorted(by_rank) == [0, 1, 2] and len({e["R1FLOW_RENDEZVOUS"] for e in env.values()}) == 1
        try:
            yield client, by_rank, sender, result
        finally:
            launch.STOPPING.clear()


def test_one_machine_failing_cancels_the_others_and_returns_every_state(sent):
    from prefect.states import Failed

    client, by_rank, sender, result = sent
    client.set_flow_run_state(by_rank[1], Failed(message="rank 1 ran out of memory"), force=True)
    sender.join(timeout=30)
    assert not sender.is_alive(), "the sender kept waiting after a machine failed"
    states = result["states"]
    assert states[1].is_failed() and states[1].message == "rank 1 ran out of memory"
    for rank in (0, 2):  # the others, which would wait for rank 1 at the rendezvous, are told to stop
        state = client.read_flow_run(by_rank[rank]).state
        # a run that no worker holds goes straight to Cancelled; one on a worker waits in Cancelling
        assert state.name in ("Cancelling", "Cancelled") and not states[rank].is_final(), (rank, state)


def test_a_stopped_pipeline_run_cancels_every_flow_run_it_sent(sent):
    client, by_rank, sender, result = sent
    launch.STOPPING.set()  # what Ctrl-C or SIGTERM does to the pipeline's stage threads
    sender.join(timeout=30)
    assert not sender.is_alive() and "stopped" in result, result
    assert all(client.read_flow_run(run).state.name in ("Cancelling", "Cancelled") for run in by_rank.values())
