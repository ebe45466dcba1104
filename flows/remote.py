"""A stage sent to the GPU work pool: ``runtime.gpu_deployment`` names the Prefect deployment
(``r1flow-stage/{stage}`` in infra/prefect.yaml) whose workers run it as ``stage_flow``.

The MLflow run is made here and passed down, so the stage logs under this pipeline run without
anyone searching for it. With a stage store (``profile.store``), the worker may be another
machine: it keeps its own workspace (``R1FLOW_ROOT``), takes the stage's inputs from the store and
puts its output there, where this side fetches it. Without one, the workspace must be shared.

A training stage across ``runtime.machines`` machines is one flow run per machine, each with its
rank and a rendezvous id in its job variables' ``env`` (the machines meet in the store:
``flows.machines.main_address``); when one fails, the others are cancelled. Stopping the pipeline
run (Ctrl-C, SIGTERM) cancels the flow runs of every stage it sent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace

from flows import cache
from flows.keys import Artifact, StageOutput, stage_key
from flows.launch import STOPPING, Stopped
from flows.machines import accelerated
from flows.recipe import Step, section
from flows.stages import StageFailed, cached_output, reuse

POLL_SECONDS = 2.0  # between looks at a stage's flow runs


def sent_to_gpu(ctx, step: Step, inputs: dict[str, Artifact], force: bool) -> bool:
    """Whether the stage goes to the GPU pool. One across machines whose output the store holds
    already is not sent: reused here, it trains nothing and needs no machine."""
    runtime = ctx.profile.runtime
    if runtime.gpu_deployment is None or step.module not in runtime.gpu_components:
        return False
    if runtime.machines > 1 and accelerated(step.module, ctx.profile) and not force:
        key = stage_key(step.module, section(ctx.profile, step), inputs, ctx.profile)
        return not reuse(cache.store_of(ctx.profile), ctx.place.workspace, step.name, key)
    return True


def remote_stage(ctx, step: Step, inputs: dict[str, Artifact], force: bool) -> StageOutput:
    """Send a stage to the GPU work pool's deployment, logging into an MLflow run made here, wait
    for it, then read its keyed output (fetched from the store, or from the shared workspace)."""
    from prefect.exceptions import ObjectNotFound

    started = time.time()
    deployment = ctx.profile.runtime.gpu_deployment.format(stage=step.name)
    if ctx.profile.store and ctx.tracker.uri.startswith("sqlite"):
        raise StageFailed(f"stage {step.name!r}: a worker on another machine cannot log into this machine's "
                          "SQLite store; set tracking.tracking_uri to an MLflow server (`r1flow servers`)")
    # With a store, the worker's own root holds its workspace: this machine's path means nothing there.
    source = {**ctx.source, "root": None} if ctx.profile.store else ctx.source
    count = ctx.profile.runtime.machines if accelerated(step.module, ctx.profile) else 1
    with ctx.tracker.child_run(step.name, ctx.parent_run, {"component": step.module}) as run_id:
        # across machines every one trains (the store holds no output: ``sent_to_gpu``), so none waits for
        # a rank 0 that found one
        parameters = {**source, "stage": step.name, "run_id": run_id, "force": force or count > 1}
        try:
            states = launched(deployment, step.name, parameters, count)
        except ObjectNotFound:
            raise StageFailed(f"stage {step.name!r}: no Prefect deployment {deployment!r} on the server "
                              "(runtime.gpu_deployment); `r1flow deploy` registers infra/prefect.yaml") from None
        for rank, state in enumerate(states):
            if not state.is_completed():
                where = f" (machine rank {rank})" if count > 1 else ""
                raise StageFailed(f"stage {step.name!r} on deployment {deployment!r}{where} ended {state.name}: "
                                  f"{state.message or 'see the Prefect UI'}")
    ctx.took(step.name, started)
    cached = ctx.tracker.run(run_id).tags.get("cached") == "True"
    return replace(cached_output(step, inputs, ctx.profile, ctx.place.workspace), cached=cached, run_id=run_id)


def launched(deployment: str, name: str, parameters: dict, count: int) -> list:
    """The stage's flow runs, one per machine (each told its rank and where to meet the others
    when it spans several), followed to their end; cancelled as soon as one fails (the others
    would wait for it) or this run is stopped (Ctrl-C, SIGTERM: ``Stopped``). Their states."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    rendezvous = uuid.uuid4().hex
    variables = lambda rank: {"env": {"R1FLOW_MACHINE_RANK": str(rank), "R1FLOW_RENDEZVOUS": rendezvous}}
    runs = [run_deployment(deployment, timeout=0, flow_run_name=name, parameters=parameters,
                           **({"job_variables": variables(rank)} if count > 1 else {}))
            for rank in range(count)]
    with get_client(sync_client=True) as client:
        while True:  # as long as the stage trains: hours on a cluster
            states = [client.read_flow_run(run.id).state for run in runs]
            if STOPPING.is_set() or any(s.is_final() and not s.is_completed() for s in states):
                why = "the pipeline run was stopped" if STOPPING.is_set() else "another machine of the stage failed"
                for run, state in zip(runs, states):
                    if not state.is_final():
                        client.set_flow_run_state(run.id, Cancelling(message=why), force=True)
                if STOPPING.is_set():
                    raise Stopped(f"stage {name!r}: stopped (Ctrl-C or SIGTERM); its flow runs cancelled")
                return states
            if all(s.is_completed() for s in states):
                return states
            STOPPING.wait(POLL_SECONDS)
