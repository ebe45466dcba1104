"""A stage sent to the GPU work pool: ``runtime.gpu_deployment`` names the Prefect deployment
(``r1flow-stage/{stage}`` in infra/prefect.yaml) whose workers run it as ``stage_flow``.

The MLflow run is made here and passed down, so the stage logs under this pipeline run without
anyone searching for it; its output is then read from the workspace (shared storage).
"""

from __future__ import annotations

import time
from dataclasses import replace

from flows.recipe import Step
from flows.stages import Artifact, StageFailed, StageOutput, cached_output


def sent_to_gpu(ctx, step: Step) -> bool:
    runtime = ctx.profile.runtime
    return runtime.gpu_deployment is not None and step.module in runtime.gpu_components


def remote_stage(ctx, step: Step, inputs: dict[str, Artifact], force: bool) -> StageOutput:
    """Send a stage to the GPU work pool's deployment, logging into an MLflow run made here, wait
    for it, then read its keyed output (the workspace is shared storage)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    started = time.time()
    deployment = ctx.profile.runtime.gpu_deployment.format(stage=step.name)
    with ctx.tracker.child_run(step.name, ctx.parent_run, {"component": step.module}) as run_id:
        try:
            run = run_deployment(deployment, timeout=None, flow_run_name=step.name,
                                 parameters={**ctx.source, "stage": step.name, "run_id": run_id, "force": force})
        except ObjectNotFound:
            raise StageFailed(f"stage {step.name!r}: no Prefect deployment {deployment!r} on the server "
                              "(runtime.gpu_deployment); `r1flow deploy` registers infra/prefect.yaml") from None
        if not run.state.is_completed():
            raise StageFailed(f"stage {step.name!r} on deployment {deployment!r} ended {run.state.name}: "
                              f"{run.state.message or 'see the Prefect UI'}")
    ctx.seconds[step.name] = time.time() - started
    cached = ctx.tracker.run(run_id).tags.get("cached") == "True"
    return replace(cached_output(step, inputs, ctx.profile, ctx.workspace), cached=cached, run_id=run_id)
