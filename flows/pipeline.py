"""The R1 recipe as Prefect flows: data → base → R1-Zero | cold start → RL → rejection sampling
→ SFT → final RL → distillation → evaluation → registry (the stages themselves: ``flows.recipe``).

    r1flow run [--from STAGE | --only STAGE]     # or: python -m flows.cli run ...

Tasks only wire components: each stage runs as its own process over files (``flows.stages``),
and what passes between tasks is ``StageOutput`` records (folders and content keys), never
models. Each way of running reads on its own: ``run_stages`` (a whole run, ``--from``: each
stage as soon as the stages it reads have finished, independent branches at once),
``restore_data`` then ``run_stages`` (``r1flow rerun``), ``run_only`` (``--only``, the per-stage
deployments) and ``remote_stage`` (a GPU stage sent to a worker, ``flows.remote``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.runtime import flow_run as prefect_run
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from components import versioning
from components.config import Profile, content_hash, load_profile
from components.reachable import check_reachable
from components.stage_io import split_ref
from components.tracking import Tracker
from flows import cache
from flows.keys import Artifact, StageOutput, code_version, inputs_of, stage_key
from flows.launch import STOPPING
from flows.locks import exclusive
from flows.machines import Machines, machines
from flows.outputs import record, report, validate
from flows.recipe import RECIPE, Step, check_stage, critical_path, downstream, reads, recipe_step, section, selected
from flows.registry import pin_bases, register
from flows.remote import remote_stage, sent_to_gpu
from flows.stages import StageFailed, cached_inputs, run_stage
from flows.vllm_stages import check_vllm
from flows.workspace import Place, locate

TRAINING_STEPS = {"base": "pretrain_steps", "sft": "max_steps", "grpo": "max_steps"}
PROJECT = Path(__file__).resolve().parents[1]
STOP_SECONDS = 60.0  # for the stages still running to stop once the run is stopped (each looks every 0.2 s)


@dataclass
class Context:
    """What every task of one run needs: the profile, where its state is, the MLflow parent run."""

    profile: Profile
    place: Place
    tracker: Tracker
    parent_run: str | None
    source: dict  # the flow's own parameters (config, overrides, root), for stages sent elsewhere
    commit: dict = field(default_factory=dict)  # git commit of the code, read once per run
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # each stage's start and end
    started: float = field(default_factory=time.time)

    def took(self, name: str, started: float) -> None:
        """A stage ran (or was reused) from ``started`` until now."""
        self.spans[name] = (started, time.time())


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
        if "registered" in inputs:  # a base from the registry, downloaded once into this workspace
            inputs = {**inputs, "registered": downloaded(ctx, inputs["registered"])}
        steps = getattr(config, TRAINING_STEPS.get(step.module, ""), None)
        out = replace(run_stage(step.name, step.module, config, inputs, ctx.profile, ctx.place.workspace, steps,
                                force=force), run_id=run)
        validate(ctx.tracker, out, step, ctx.place.workspace, ctx.profile.data.source)
        record(ctx.tracker, out, step)
    ctx.took(step.name, started)
    print(f"{step.name}: {'cache hit' if out.cached else 'done'} ({out.folder})")
    # A cache hit ends its task in a state named Cached, so the Prefect UI shows it as one.
    return Completed(data=out, name="Cached", message=f"reused {out.folder}") if out.cached else out


def downloaded(ctx: Context, registered: Artifact) -> Artifact:
    """A registered version (``models:/NAME/VERSION``) as a folder in the workspace, same key."""
    name, version = registered.path.removeprefix("models:/").split("/")
    folder = ctx.place.workspace / "registry" / name / version
    return replace(registered, path=str(ctx.tracker.download_model(ctx.tracker.version(name, version), folder)))


def value(task_result: StageOutput | State) -> StageOutput:
    return task_result.result() if isinstance(task_result, State) else task_result


# --- the ways to run ------------------------------------------------------------------------
@task(name="gpu-stage", task_run_name="{step.name}", cache_policy=NO_CACHE)
def pool_stage(ctx: Context, step: Step, inputs: dict[str, Artifact], force: bool = False) -> StageOutput:
    """A stage sent to the GPU pool's deployment (``flows.remote``), waited for in a thread of its own."""
    return remote_stage(ctx, step, inputs, force)


def run_stages(ctx: Context, wanted: set[str], force: set[str], done: dict | None = None) -> dict[str, StageOutput]:
    """Every wanted stage (those in ``force`` even when cached) as soon as the stages it reads have
    finished: at most ``runtime.max_parallel`` at once here, in recipe order where more are ready; a
    stage sent to the GPU pool waits on the pool's workers instead. A failed stage stops only what
    reads it: the other branches run to their end, then the run fails naming every failed stage.
    Bad data (the data stage failed, or no worked solutions for a cold start), Ctrl-C or SIGTERM
    stop every stage running at once. ``done``: outputs already in hand."""
    outputs, failed, to_pool = dict(done or {}), {}, {}
    todo = [s for s in RECIPE if s.name in wanted and s.name not in outputs]
    running: dict[PrefectFuture, Step] = {}
    slots = ctx.profile.runtime.max_parallel or 1
    for s in todo:  # parsed here, before the threads: a traceback formatted in one parses too (CPython 3.11)
        code_version(s.module)
    try:
        while True:
            for s in [s for s in todo if reads(s) <= outputs.keys()]:
                inputs, forced = inputs_of(s, outputs, ctx.profile), s.name in force
                if s.name not in to_pool:  # asked once: for a stage across machines it looks in the store
                    to_pool[s.name] = sent_to_gpu(ctx, s, inputs, forced)
                if to_pool[s.name] or sum(not to_pool[r.name] for r in running.values()) < slots:
                    running[(pool_stage if to_pool[s.name] else stage).submit(ctx, s, inputs, forced)] = s
                    todo.remove(s)
            if not running:
                break
            finished = next(as_completed(list(running)))
            s = running.pop(finished)
            try:
                outputs[s.name] = value(finished.result())
            except Exception as error:
                if s.name == "data":  # bad input: every result reads it, so nothing else is worth training
                    raise
                failed[s.name] = error  # reported with the others at the end
                continue
            if s.name == "data" and "cold_start" in wanted and outputs["data"].result.get("cold_start") == 0:
                from components.data import no_traces  # R1-Zero needs no worked solutions; the cold start does

                raise ValueError(no_traces(ctx.profile.data))
    except BaseException:  # Ctrl-C, SIGTERM or bad data: every stage still running stops, its run marked failed
        STOPPING.set()
        if not wait(list(running), timeout=STOP_SECONDS).not_done:
            STOPPING.clear()  # all stopped: a later run in this process starts clean
        raise
    if failed:
        if todo:
            print(f"not run, as they read a failed stage: {', '.join(s.name for s in todo)}")
        raise failure(failed)
    return {s.name: outputs[s.name] for s in RECIPE if s.name in outputs}  # the tables list them in recipe order


def failure(failed: dict[str, Exception]) -> Exception:
    """The error of a run whose stages failed: a single one's own (bad data stays a ValueError),
    else one naming every failed stage and why."""
    if len(failed) == 1:
        return next(iter(failed.values()))
    why = "; ".join(f"{name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
                    for name, error in failed.items())
    return StageFailed(f"{len(failed)} stages failed ({', '.join(failed)}): {why}")


@task(name="data-restore", cache_policy=NO_CACHE)
def restore_data(ctx: Context, data_dir: Path, key: str | None = None) -> StageOutput:
    """``r1flow rerun``: the data stage's output, byte for byte from the data folder DVC restored,
    under the key the run recorded (a bucket prefix may hold more objects now), else the key the
    recorded profile gives it."""
    s = recipe_step("data")
    key = key or stage_key(s.module, ctx.profile.data, inputs_of(s, {}, ctx.profile), ctx.profile)
    with ctx.tracker.child_run(s.name, ctx.parent_run, {"component": s.module, "restored_from": data_dir}) as run_id:
        folder = cache.build(ctx.place.workspace, s.name, key, lambda tmp: versioning.restore_data_stage(data_dir, tmp))
        out = StageOutput(s.name, folder, key, False, run_id, json.loads((folder / "result.json").read_text()))
        validate(ctx.tracker, out, s, ctx.place.workspace, ctx.profile.data.source)
        record(ctx.tracker, out, s)
    return out


def run_only(ctx: Context, name: str, force: bool, run_id: str | None) -> StageOutput:
    """One stage on the cached outputs of everything it needs (never sent elsewhere: this is
    what runs on the worker a stage was sent to)."""
    return value(stage(ctx, recipe_step(name), cached_inputs(name, ctx.profile, ctx.place.workspace), force, run_id))


# --- flows ----------------------------------------------------------------------------------
# A thread per stage that can run at once; how many do is ``run_stages``' limit.
@flow(name="r1flow", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=len(RECIPE)))
def r1_pipeline(config: str | None = None, overrides: list[str] | None = None, root: str | None = None,
                from_stage: str | None = None, restored: str | None = None, restored_key: str | None = None,
                reproduces: str | None = None) -> dict:
    """The whole recipe for one profile; returns run ids, data hash, eval metrics and versions.

    ``from_stage`` reruns that stage and everything downstream of it even when cached;
    ``restored`` (``r1flow rerun``) takes the datasets from a DVC-restored data folder (under the
    data stage key ``restored_key``, the recorded run's). ``root``
    holds the workspace and the data folder; none: ``$R1FLOW_ROOT``, else the working directory.
    """
    force = {check_stage(from_stage), *downstream(from_stage)} if from_stage else set()
    with pipeline_run(config, overrides, root, tags={"reproduces": reproduces} if reproduces else {}) as ctx:
        done = {"data": restore_data(ctx, Path(restored), restored_key)} if restored else {}
        outputs = run_stages(ctx, selected(ctx.profile), force, done)
        finished = finish(ctx, outputs)  # before the summary: its wall time includes registering
        return {**summary(ctx), **finished}


@flow(name="r1flow-stage", flow_run_name="{stage}", log_prints=True)
def stage_flow(stage: str, config: str | None = None, overrides: list[str] | None = None, root: str | None = None,
               run_id: str | None = None, force: bool = False) -> dict:
    """One stage on cached inputs, as its own flow: ``r1flow run --only STAGE``, the per-stage
    deployments, and where the pipeline sends GPU stages (logging into the MLflow run ``run_id``).
    ``root``: where the workspace is; none: ``$R1FLOW_ROOT``, else the working directory."""
    label = f" (only {check_stage(stage)})"
    profile = load_profile(config, overrides)
    if (group := machines(recipe_step(stage).module, profile)) is not None and group.follower:
        return follow(stage, profile, root, group, force)
    with pipeline_run(config, overrides, root, label=label, own_run=run_id is None, only=stage) as ctx:
        out = run_only(ctx, stage, force, run_id)
        return {**summary(ctx), "stages": {stage: out.cached}, "result": out.result, "stage_run_id": out.run_id}


def follow(stage: str, profile: Profile, root: str | None, group: Machines, force: bool) -> dict:
    """A machine of rank > 0 in a multi-machine training stage: it fetches the inputs and trains
    its share; rank 0's machine writes the output and every MLflow record. Where the output is
    already in the store, rank 0 trains nothing, and neither does this machine (unless ``force``)."""
    step, workspace = recipe_step(stage), locate(profile, root).workspace
    out = run_stage(step.name, step.module, section(profile, step), cached_inputs(stage, profile, workspace), profile,
                    workspace, force=force)
    return {"run_id": None, "stages": {stage: out.cached}, "key": out.key, "machine_rank": group.rank}


@contextmanager
def pipeline_run(config: str | None, overrides: list[str] | None, root: str | None, tags: dict | None = None,
                 label: str = "", own_run: bool = True, only: str | None = None) -> Iterator[Context]:
    """The run's context, inside its MLflow parent run (none for a stage sent here to log into a
    run of its own): finished on success, failed on any error. The stages it will run (``only``
    that one, else the profile's) have their vLLM environment checked first."""
    profile = load_profile(config, overrides)
    check_vllm(profile, {only} if only else selected(profile))
    place = locate(profile, root)
    place.workspace.mkdir(parents=True, exist_ok=True)
    check_reachable(place.tracking_uri)  # before anything trains: seconds, not MLflow's minutes of retries
    tracker = Tracker(place.tracking_uri, place.experiment, place.artifacts)
    pins, base_tags = pin_bases(profile, tracker)  # a registry base: one version for the whole run
    if pins:  # and its registry, where the keys look its version up: this run's, wherever it runs
        overrides = [*(overrides or []), *pins, f"tracking.tracking_uri={place.tracking_uri}"]
        profile = load_profile(config, overrides)
    commit, parent = code_commit(), None
    if own_run:
        parent = tracker.start_run(profile.name + label, tags={
            "profile": profile.name, "config_hash": content_hash(profile)[:16], **commit, **base_tags,
            **(tags or {})})
        tracker.log_params(parent, profile.model_dump(mode="json"))
        tracker.log_dict(parent, profile.model_dump(mode="json"), "profile.json")  # what `r1flow rerun` reads
    source = {"config": config, "overrides": list(overrides or []), "root": str(place.root)}
    ctx = Context(profile, place, tracker, parent, source, commit)
    STOPPING.clear()  # an earlier run in this process may have been stopped
    if parent is None:
        yield ctx
        return
    with tracker.child_run(profile.name + label, None, run_id=parent):
        yield ctx


def summary(ctx: Context) -> dict:
    """The run's ids and times: each stage's seconds, its start and end (seconds from the run's
    start), the wall time, the stages' sum, and the critical path through the recipe graph."""
    seconds = {name: end - start for name, (start, end) in ctx.spans.items()}
    path, longest = critical_path(seconds)
    return {"run_id": ctx.parent_run, "tracking_uri": ctx.tracker.uri, "flow_run_id": str(prefect_run.id),
            "seconds": seconds, "timeline": {name: [round(start - ctx.started, 1), round(end - ctx.started, 1)]
                                                 for name, (start, end) in ctx.spans.items()},
            "wall_seconds": time.time() - ctx.started, "stage_seconds": sum(seconds.values()),
            "critical_path": {"stages": path, "seconds": longest}}


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
    refs = {path: split_ref(ref) for path, ref in versioning.DATASETS.items()}
    data_hash = version_data(ctx, {path: outputs[stage].artifact(file).path
                                   for path, (stage, file) in refs.items() if stage in outputs})
    versions = register(ctx, outputs, data_hash)
    return {"data_hash": data_hash, "metrics": report(ctx, outputs, versions), "versions": versions,
            "stages": {name: out.cached for name, out in outputs.items()},
            **{name: outputs[name].result for name in ("rejection_sampling",) if name in outputs}}


@task(name="version-data", cache_policy=NO_CACHE)
def version_data(ctx: Context, files: dict[str, str]) -> str:
    """This run's datasets into ``data/``, ``dvc add`` and push; returns the DVC hash."""
    root = ctx.place.root
    # Two runs of one checkout at once reach here together (the second reused every stage): both
    # would `dvc init` and `dvc add` the same folder, and each must log its own pointer, so one
    # versions at a time.
    with exclusive("data-version", ctx.place.workspace / "locks"):
        versioning.stage_datasets(root / ctx.profile.data_dir, {k: Path(v) for k, v in files.items()})
        versioning.ensure_repo(root, versioning.remote_url(ctx.profile.store, ctx.place.workspace))
        data_hash = versioning.version_data(root, ctx.profile.data_dir.as_posix())
        ctx.tracker.log_artifact(ctx.parent_run, root / f"{ctx.profile.data_dir.as_posix()}.dvc")  # for reruns
    ctx.tracker.set_tags(ctx.parent_run, {"data_hash": data_hash})
    return data_hash
