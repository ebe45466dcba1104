"""The R1 recipe as Prefect flows: data → base → R1-Zero | cold start → RL → rejection sampling
→ SFT → distillation → evaluation → registry (the stages themselves: ``flows.recipe``).

    r1flow run [--from STAGE | --only STAGE]     # or: python -m flows.cli run ...

Tasks only wire components: each stage runs as its own process over files (``flows.stages``),
and what passes between tasks is ``StageOutput`` records (folders and content keys), never
models. Each way of running reads on its own: ``run_stages`` (a whole run, ``--from``),
``rerun_stages`` (``r1flow rerun``: data restored from DVC), ``run_only`` (``--only``, the
per-stage deployments) and ``remote_stage`` (a GPU stage sent to a worker).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as prefect_run
from prefect.states import Completed, State

from components import promotion, versioning
from components.config import Profile, content_hash, load_profile
from components.reports import eval_table, plot_curves
from components.tracking import Tracker, VersionRecord, default_uri, metric_name
from flows.outputs import read_metrics, record, validate
from flows.recipe import (
    EVALUATED,
    PARENTS,
    RECIPE,
    REGISTERED,
    Step,
    check_stage,
    downstream,
    recipe_step,
    upstream,
)
from flows.stages import (
    Artifact,
    StageFailed,
    StageOutput,
    code_version,
    inputs_of,
    install,
    read_result,
    run_stage,
    scratch_folder,
    section,
    stage_folder,
    stage_key,
)

TRAINING_STEPS = {"base": "pretrain_steps", "sft": "max_steps", "grpo": "max_steps"}
PROJECT = Path(__file__).resolve().parents[1]


class MissingInput(FileNotFoundError):
    """``--only``: a stage's input has no cached output for this profile."""


@dataclass
class Context:
    """What every task of one run needs: the profile, folders, the MLflow parent run."""

    profile: Profile
    root: Path
    workspace: Path
    tracker: Tracker
    parent_run: str | None
    source: dict  # the flow's own parameters (config, overrides, root), for stages sent elsewhere
    commit: dict = field(default_factory=dict)  # git commit of the code, read once per run
    seconds: dict[str, float] = field(default_factory=dict)


# --- one stage ------------------------------------------------------------------------------
@task(name="stage", task_run_name="{step.name}", cache_policy=NO_CACHE)
def stage(ctx: Context, step: Step, inputs: dict[str, Artifact], force: bool = False,
          run_id: str | None = None) -> StageOutput | State:
    """Run one component as a process (or reuse its keyed output) inside its MLflow child run;
    its datasets pass their Great Expectations suites before anything trains on them."""
    config, started = section(ctx.profile, step), time.time()
    with ctx.tracker.child_run(step.name, ctx.parent_run, {"component": step.module}, run_id) as run:
        ctx.tracker.log_params(run, {step.name: config.model_dump(mode="json"),
                                        "inputs": {k: v.path for k, v in inputs.items()}})
        steps = getattr(config, TRAINING_STEPS.get(step.module, ""), None)
        folder, key, cached = run_stage(step.name, step.module, config, inputs, ctx.profile, ctx.workspace, steps,
                                        force=force)
        out = StageOutput(step.name, folder, key, cached, run, read_result(folder))
        validate(ctx.tracker, out, step, ctx.workspace, ctx.profile.data.source)
        record(ctx.tracker, out, step)
    ctx.seconds[step.name] = time.time() - started
    print(f"{step.name}: {'cache hit' if cached else 'done'} ({folder})")
    # A cache hit ends its task in a state named Cached, so the Prefect UI shows it as one.
    return Completed(data=out, name="Cached", message=f"reused {folder}") if cached else out


def value(task_result: StageOutput | State) -> StageOutput:
    return task_result.result() if isinstance(task_result, State) else task_result


def lookup(ctx: Context, step: Step, inputs: dict[str, Artifact]) -> StageOutput:
    """A stage's cached output, without running anything (``--only``'s inputs)."""
    key = stage_key(step.module, section(ctx.profile, step), inputs, ctx.profile)
    folder = stage_folder(ctx.workspace, step.name, key)
    if not (folder / "result.json").exists():
        raise MissingInput(f"input stage {step.name!r} has no cached output for this profile ({folder}); "
                           f"run `r1flow run` (or `--only {step.name}`) first")
    return StageOutput(step.name, folder, key, True, None, read_result(folder))


def remote_stage(ctx: Context, step: Step, inputs: dict[str, Artifact], force: bool) -> StageOutput:
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
    return replace(lookup(ctx, step, inputs), cached=cached, run_id=run_id)


def sent_to_gpu(ctx: Context, step: Step) -> bool:
    runtime = ctx.profile.runtime
    return runtime.gpu_deployment is not None and step.module in runtime.gpu_components


# --- the ways to run ------------------------------------------------------------------------
def run_stages(ctx: Context, wanted: set[str], force: set[str], done: dict | None = None) -> dict[str, StageOutput]:
    """Every wanted stage in recipe order (those in ``force`` even when cached), GPU stages sent to
    their deployment when the profile names one; ``done``: outputs already in hand."""
    outputs = dict(done or {})
    for s in RECIPE:
        if s.name in wanted and s.name not in outputs:
            inputs = inputs_of(s, outputs, ctx.profile)
            outputs[s.name] = remote_stage(ctx, s, inputs, s.name in force) if sent_to_gpu(ctx, s) else \
                value(stage(ctx, s, inputs, s.name in force))
    return outputs


@task(name="data-restore", cache_policy=NO_CACHE)
def restore_data(ctx: Context, data_dir: Path) -> StageOutput:
    """``r1flow rerun``: the data stage's output, byte for byte from the data folder DVC restored,
    under the key the recorded profile gives it."""
    s = recipe_step("data")
    key = stage_key(s.module, ctx.profile.data, inputs_of(s, {}, ctx.profile), ctx.profile)
    folder = stage_folder(ctx.workspace, s.name, key)
    with ctx.tracker.child_run(s.name, ctx.parent_run, {"component": s.module, "restored_from": data_dir}) as run_id:
        tmp = scratch_folder(folder)
        versioning.restore_data_stage(data_dir, tmp)
        install(tmp, folder)
        out = StageOutput(s.name, folder, key, False, run_id, read_result(folder))
        validate(ctx.tracker, out, s, ctx.workspace, ctx.profile.data.source)
        record(ctx.tracker, out, s)
    return out


def run_only(ctx: Context, name: str, force: bool, run_id: str | None) -> StageOutput:
    """One stage on the cached outputs of everything it needs (never sent elsewhere: this is
    what runs on the worker a stage was sent to)."""
    outputs = {}
    for s in RECIPE:
        if s.name in upstream(name):
            outputs[s.name] = lookup(ctx, s, inputs_of(s, outputs, ctx.profile))
    target = recipe_step(name)
    return value(stage(ctx, target, inputs_of(target, outputs, ctx.profile), force, run_id))


def selected(profile: Profile) -> set[str]:
    """The profile's ``stages`` and everything they need; all stages when it names none."""
    if profile.stages is None:
        return {s.name for s in RECIPE}
    return {"data"}.union(*({check_stage(name), *upstream(name)} for name in profile.stages))


# --- flows ----------------------------------------------------------------------------------
@flow(name="r1flow", log_prints=True)
def r1_pipeline(config: str | None = None, overrides: list[str] | None = None, root: str = ".",
                from_stage: str | None = None, restored: str | None = None, reproduces: str | None = None) -> dict:
    """The whole recipe for one profile; returns run ids, data hash, eval metrics and versions.

    ``from_stage`` reruns that stage and everything downstream of it even when cached;
    ``restored`` (``r1flow rerun``) takes the datasets from a DVC-restored data folder.
    """
    force = {check_stage(from_stage), *downstream(from_stage)} if from_stage else set()
    with pipeline_run(config, overrides, root, tags={"reproduces": reproduces} if reproduces else {}) as ctx:
        done = {"data": restore_data(ctx, Path(restored))} if restored else {}
        outputs = run_stages(ctx, selected(ctx.profile), force, done)
        return {**summary(ctx), **finish(ctx, outputs)}


@flow(name="r1flow-stage", flow_run_name="{stage}", log_prints=True)
def stage_flow(stage: str, config: str | None = None, overrides: list[str] | None = None, root: str = ".",
               run_id: str | None = None, force: bool = False) -> dict:
    """One stage on cached inputs, as its own flow: ``r1flow run --only STAGE``, the per-stage
    deployments, and where the pipeline sends GPU stages (logging into the MLflow run ``run_id``)."""
    label = f" (only {check_stage(stage)})"
    with pipeline_run(config, overrides, root, label=label, own_run=run_id is None) as ctx:
        out = run_only(ctx, stage, force, run_id)
        return {**summary(ctx), "stages": {stage: out.cached}, "result": out.result, "stage_run_id": out.run_id}


@contextmanager
def pipeline_run(config: str | None, overrides: list[str] | None, root: str, tags: dict | None = None,
                 label: str = "", own_run: bool = True) -> Iterator[Context]:
    """The run's context, inside its MLflow parent run (none for a stage sent here to log into a
    run of its own): finished on success, failed on any error."""
    profile = load_profile(config, overrides)
    root_path = Path(root).resolve()
    workspace = root_path / profile.workspace
    workspace.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(profile.tracking.tracking_uri or default_uri(workspace), profile.tracking.experiment,
                      workspace / "mlartifacts")
    commit, parent = code_commit(), None
    if own_run:
        parent = tracker.start_run(profile.name + label, tags={
            "profile": profile.name, "config_hash": content_hash(profile)[:16], **commit, **(tags or {})})
        tracker.log_params(parent, profile.model_dump(mode="json"))
        tracker.log_dict(parent, profile.model_dump(mode="json"), "profile.json")  # what `r1flow rerun` reads
    source = {"config": config, "overrides": list(overrides or []), "root": str(root_path)}
    ctx = Context(profile, root_path, workspace, tracker, parent, source, commit)
    if parent is None:
        yield ctx
        return
    with tracker.child_run(profile.name + label, None, run_id=parent):
        yield ctx


def summary(ctx: Context) -> dict:
    return {"run_id": ctx.parent_run, "tracking_uri": ctx.tracker.uri, "flow_run_id": str(prefect_run.id),
            "seconds": ctx.seconds}


def code_commit() -> dict:
    """The git commit of the code that ran, and whether the tree had uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"git_commit": commit, "git_dirty": dirty}


# --- after the stages -----------------------------------------------------------------------
def finish(ctx: Context, outputs: dict[str, StageOutput]) -> dict:
    """Version the run's datasets, register and review its models, publish the report."""
    data_hash = version_data(ctx, {path: outputs[ref.split("/")[0]].artifact(ref.split("/")[1]).path
                                   for path, ref in versioning.DATASETS.items() if ref.split("/")[0] in outputs})
    versions = register(ctx, outputs, data_hash)
    return {"data_hash": data_hash, "metrics": report(ctx, outputs, versions), "versions": versions,
            "stages": {name: out.cached for name, out in outputs.items()},
            **{name: outputs[name].result for name in ("rejection_sampling",) if name in outputs}}


@task(name="version-data", cache_policy=NO_CACHE)
def version_data(ctx: Context, files: dict[str, str]) -> str:
    """This run's datasets into ``data/``, ``dvc add`` and push; returns the DVC hash."""
    versioning.stage_datasets(ctx.root / ctx.profile.data_dir, {k: Path(v) for k, v in files.items()})
    versioning.ensure_repo(ctx.root, str((ctx.workspace / "dvc-remote").resolve()))
    data_hash = versioning.version_data(ctx.root, ctx.profile.data_dir.as_posix())
    ctx.tracker.set_tags(ctx.parent_run, {"data_hash": data_hash})
    ctx.tracker.log_artifact(ctx.parent_run, ctx.root / f"{ctx.profile.data_dir.as_posix()}.dvc")  # for reruns
    return data_hash


@task(name="register", cache_policy=NO_CACHE)
def register(ctx: Context, outputs: dict[str, StageOutput], data_hash: str) -> dict[str, dict]:
    """Register each trained model once per stage key (alias ``candidate``) with its lineage; then
    review each against its parent and the champion (``components.promotion``). ``champion``
    moves only after every version is registered and reviewed, so a failure on the way leaves
    every champion where it was."""
    registered, crowned = {}, []
    for role in (r for r in REGISTERED if f"eval_{r}" in outputs):  # parents first: lineage names their version
        version, new = registered_version(ctx, role, outputs, data_hash, registered)
        champion = ctx.tracker.champion(version.name)
        registered[role] = {"name": version.name, "version": version.version, "ref": version.ref, "new": new,
                            "champion": champion is not None and champion.version == version.version}
        if not registered[role]["champion"]:
            checks = promotion.review(ctx.tracker, version, ctx.profile.promotion)
            print(f"{version.ref}: {promotion.verdict(checks)}")
            if promotion.passed(checks):
                crowned.append(version)
    for version in crowned:
        promotion.crown(ctx.tracker, version)
        registered[next(r for r, v in registered.items() if v["ref"] == version.ref)]["champion"] = True
    return registered


def registered_version(ctx: Context, role: str, outputs: dict[str, StageOutput], data_hash: str,
                       registered: dict[str, dict]) -> tuple[VersionRecord, bool]:
    """The version registered for this role's stage output, and whether it was registered now."""
    out, evaluation, parent = outputs[role], outputs[f"eval_{role}"], PARENTS[role]
    name = f"{ctx.profile.tracking.registry_prefix}-{role.replace('_', '-')}"
    found = ctx.tracker.version_by_stage_key(name, out.key)
    if found is not None:
        return found, False
    tags = promotion.lineage(
        stage_key=out.key, code_version=code_version(recipe_step(role).module), config_hash=content_hash(ctx.profile)[:16],
        commit=ctx.commit, data_hash=data_hash, eval_run_id=evaluation.run_id, eval_key=eval_key(ctx, outputs),
        metrics=evaluation.result["metrics"],
        parent=registered[parent]["ref"] if parent in registered else f"{parent} (stage {outputs[parent].key})",
        parent_eval_run_id=outputs[f"eval_{parent}"].run_id if f"eval_{parent}" in outputs else None,
        health=promotion.training_health(read_metrics(out.folder / "metrics.jsonl"), ctx.profile.promotion))
    return ctx.tracker.version(name, ctx.tracker.register(out.run_id, out.folder / "model", name, tags)), True


def eval_key(ctx: Context, outputs: dict[str, StageOutput]) -> str:
    """What makes two evaluations comparable: the protocol and the test set."""
    return content_hash(ctx.profile.evaluate, outputs["data"].artifact("test").key)[:16]


def report(ctx: Context, outputs: dict[str, StageOutput], versions: dict[str, dict]) -> dict[str, dict]:
    """The eval table across the lineage and the GRPO training curves: a Prefect markdown
    artifact, and files on the MLflow parent run (``report/``). Returns the table."""
    table = {role: outputs[f"eval_{role}"].result["metrics"] for role in EVALUATED if f"eval_{role}" in outputs}
    folder = ctx.workspace / "reports" / ctx.parent_run
    markdown = eval_table(table, versions, ctx.profile.evaluate.k)
    curves = {name: read_metrics(outputs[name].folder / "metrics.jsonl") for name in ("r1_zero", "r1_rl")
              if name in outputs}
    plots = plot_curves(curves, folder)
    (folder / "eval_table.md").write_text(markdown + "\n")
    ctx.tracker.log_artifact(ctx.parent_run, folder, "report")
    create_markdown_artifact(markdown + "\n\nTraining curves (reward, accuracy, KL, completion length): "
                             f"MLflow run {ctx.parent_run}, `report/` ({', '.join(p.name for p in plots)}).",
                             key="r1flow-eval", description="evaluation across the lineage")
    ctx.tracker.log_metrics(ctx.parent_run, {f"{role}.{metric_name(k)}": v for role, m in table.items()
                                             for k, v in m.items()})
    return table
