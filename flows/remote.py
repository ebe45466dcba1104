"""A stage sent to the GPU work pool: ``runtime.gpu_deployment`` names the Prefect deployment
(``r1flow-stage/{stage}`` in infra/prefect.yaml) whose workers run it as ``stage_flow``.

The MLflow run is made here and passed down, so the stage logs under this pipeline run without
anyone searching for it. With a stage store (``profile.store``), the worker may be another
machine: it keeps its own workspace (``R1FLOW_ROOT``), takes the stage's inputs from the store and
puts its output there, where this side fetches it. Without one, the workspace must be shared.
"""

from __future__ import annotations

import time
from dataclasses import replace

from flows.keys import Artifact, StageOutput
from flows.recipe import Step
from flows.stages import StageFailed, cached_output


def sent_to_gpu(ctx, step: Step) -> bool:
    runtime = ctx.profile.runtime
    return runtime.gpu_deployment is not None and step.module in runtime.gpu_components


def remote_stage(ctx, step: Step, inputs: dict[str, Artifact], force: bool) -> StageOutput:
    """Send a stage to the GPU work pool's deployment, logging into an MLflow run made here, wait
    for it, then read its keyed output (fetched from the store, or from the shared workspace)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    started = time.time()
    deployment = ctx.profile.runtime.gpu_deployment.format(stage=step.name)
    if ctx.profile.store and ctx.tracker.uri.startswith("sqlite"):
        raise StageFailed(f"stage {step.name!r}: a worker on another machine cannot log into this machine's "
                          "SQLite store; set tracking.tracking_uri to an MLflow server (`r1flow servers`)")
    # With a store, the worker's own root holds its workspace: this machine's path means nothing there.
    source = {**ctx.source, "root": None} if ctx.profile.store else ctx.source
    with ctx.tracker.child_run(step.name, ctx.parent_run, {"component": step.module}) as run_id:
        try:
            run = run_deployment(deployment, timeout=None, flow_run_name=step.name,
                                 parameters={**source, "stage": step.name, "run_id": run_id, "force": force})
        except ObjectNotFound:
            raise StageFailed(f"stage {step.name!r}: no Prefect deployment {deployment!r} on the server "
                              "(runtime.gpu_deployment); `r1flow deploy` registers infra/prefect.yaml") from None
        if not run.state.is_completed():
            raise StageFailed(f"stage {step.name!r} on deployment {deployment!r} ended {run.state.name}: "
                              f"{run.state.message or 'see the Prefect UI'}")
    ctx.seconds[step.name] = time.time() - started
    cached = ctx.tracker.run(run_id).tags.get("cached") == "True"
    return replace(cached_output(step, inputs, ctx.profile, ctx.place.workspace), cached=cached, run_id=run_id)
