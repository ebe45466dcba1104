"""The R1 recipe as Prefect flows: data → base → R1-Zero | cold start → RL → rejection sampling
→ SFT → distillation → evaluation → registry (the stages themselves: ``flows.recipe``).

    r1flow run [--from STAGE | --only STAGE]     # or: python -m flows.cli run ...

Tasks only wire components: each training stage runs as its own process over files
(``flows.stages``), and what passes between tasks is paths and content keys, never models.
``r1flow-stage`` runs one stage on cached inputs as its own flow: ``--only``, a deployment per
stage, and the flow the pipeline sends GPU stages to (``runtime.gpu_deployment``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as prefect_run
from prefect.states import Completed, State

from components import versioning
from components.config import Profile, content_hash, load_profile
from components.data import build_datasets
from components.promotion import gate_checks, training_health, verdict
from components.reports import eval_table, plot_curves
from components.tracking import PRIMARY_METRIC, Tracker, default_uri, metric_name
from flows.recipe import (
    EVALUATED,
    PARENTS,
    RECIPE,
    REGISTERED,
    STAGES,
    Step,
    check_stage,
    downstream,
    upstream,
)
from flows.stages import (
    Artifact,
    StageFailed,
    code_version,
    file_digest,
    install,
    run_stage,
    scratch_folder,
    stage_folder,
    stage_key,
)

TRAINING_STEPS = {"base": "pretrain_steps", "sft": "max_steps", "grpo": "max_steps"}
PROJECT = Path(__file__).resolve().parents[1]


class MissingInput(FileNotFoundError):
    """``--only``: a stage's input has no cached output for this profile."""


@dataclass
class Context:
    """What every task of one run needs: the profile, folders, the MLflow parent run, the plan."""

    profile: Profile
    root: Path
    workspace: Path
    tracker: Tracker
    parent_run: str
    source: dict  # the flow's own parameters (config, overrides, root), for stages sent elsewhere
    force: frozenset[str] = frozenset()  # stages rerun even when cached (--from)
    only: str | None = None  # run this stage alone, on cached inputs (--only, stage flows)
    dispatch: bool = True  # send GPU stages to runtime.gpu_deployment (not from inside a stage flow)
    restored: Path | None = None  # rerun: datasets restored from DVC stand in for generating them
    commit: dict = field(default_factory=dict)  # git commit of the code, read once per run
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / self.profile.data_dir

    def looked_up(self, name: str) -> bool:
        """Under --only, every other stage must already be cached: look it up, never run it."""
        return self.only is not None and name != self.only


def data_key(profile: Profile) -> str:
    cfg = profile.data
    sources = [file_digest(cfg.train_path), file_digest(cfg.test_path)]  # a benchmark's content, not its path
    return content_hash("data", code_version("data"), cfg, profile.seed, sources)[:16]


def missing(ctx: Context, name: str, key: str) -> MissingInput:
    return MissingInput(f"--only {ctx.only}: input stage {name!r} has no cached output for this profile "
                        f"({stage_folder(ctx.workspace, name, key)}); run `r1flow run` (or `--only {name}`) first")


@task(name="data", cache_policy=NO_CACHE)
def prepare_data(ctx: Context) -> dict:
    """Generate, import or restore the prompt sets, decontaminate and validate them; keyed like any stage."""
    key = data_key(ctx.profile)
    folder = stage_folder(ctx.workspace, "data", key)
    cached = (folder / "report.json").exists() and "data" not in ctx.force
    if ctx.looked_up("data"):
        if not cached:
            raise missing(ctx, "data", key)
        return {"name": "data", "dir": str(folder), "key": key, "cached": True, "run_id": None}
    started = time.time()
    run_id = ctx.tracker.start_run("data", ctx.parent_run, tags={"stage_key": key})
    ctx.tracker.log_params(run_id, {"data": ctx.profile.data.model_dump(mode="json")})
    if not cached:
        tmp = scratch_folder(folder)
        try:
            if ctx.restored:
                restore_datasets(ctx.restored, tmp)
            else:
                build_datasets(ctx.profile.data, ctx.profile.seed, tmp)
            _validate(ctx, run_id, tmp, {"train": "prompts", "validation": "prompts", "test": "eval",
                                         "cold_start": "sft"})
        except BaseException:  # also Ctrl-C: nothing half-written, the run marked failed
            shutil.rmtree(tmp, ignore_errors=True)
            ctx.tracker.finish(run_id, ok=False)
            raise
        install(tmp, folder)
    report = json.loads((folder / "report.json").read_text())
    ctx.tracker.log_metrics(run_id, {k: v for k, v in report.items() if isinstance(v, int)})
    ctx.tracker.set_tags(run_id, {"cached": cached})
    ctx.tracker.log_artifact(run_id, folder / "report.json")
    ctx.tracker.finish(run_id)
    ctx.seconds["data"] = time.time() - started
    return shown_cached({"name": "data", "dir": str(folder), "key": key, "cached": cached, "run_id": run_id})


# Where each dataset of a run lives in the DVC-versioned data folder.
VERSIONED = {"prompts/train.jsonl": "data/train", "prompts/validation.jsonl": "data/validation",
             "prompts/test.jsonl": "data/test", "traces/cold_start.jsonl": "data/cold_start",
             "traces/rejection_sampled.jsonl": "rejection_sampling/train"}


def restore_datasets(data_dir: Path, out: Path) -> None:
    """The data stage's files from a restored DVC data folder, byte for byte (``r1flow rerun``)."""
    out.mkdir(parents=True)
    report = {"source": "dvc", "restored_from": str(data_dir)}
    for relative, ref in VERSIONED.items():
        stage, name = ref.split("/")
        if stage == "data":
            shutil.copyfile(data_dir / relative, out / f"{name}.jsonl")
            report[name] = len((out / f"{name}.jsonl").read_text().splitlines())
    (out / "report.json").write_text(json.dumps(report, indent=2))


def _validate(ctx: Context, run_id: str, folder: Path, kinds: dict[str, str]) -> None:
    """Great Expectations suites at a stage boundary; a failure raises before anything trains."""
    # Great Expectations takes seconds to import: only when something is validated.
    from components.validate import validate_file

    for name, kind in kinds.items():
        path = folder / f"{name}.jsonl"
        if name == "validation" and not path.read_text().strip():
            continue  # an empty validation split is allowed (n_validation: 0)
        report = validate_file(path, kind, name=f"{ctx.profile.data.source}/{name}")
        (folder / f"validation-{name}.json").write_text(json.dumps(report, indent=2))
        ctx.tracker.log_artifact(run_id, folder / f"validation-{name}.json", "validation")


def read_metrics(path: Path) -> list[dict]:
    """A stage's ``metrics.jsonl`` (one row per logged step)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def artifact(outputs: dict[str, dict], ref: str) -> Artifact:
    """A recipe input: ``"stage"`` is its model folder, ``"stage/name"`` its ``name.jsonl``."""
    name, _, file = ref.partition("/")
    out = outputs[name]
    return Artifact(str(Path(out["dir"]) / (f"{file}.jsonl" if file else "model")),
                    f"{out['key']}/{file}" if file else out["key"])


def lookup(ctx: Context, step: Step, inputs: dict[str, Artifact]) -> dict:
    """A stage's cached output, without running anything (--only's inputs)."""
    key = stage_key(step.module, getattr(ctx.profile, step.section), inputs, ctx.profile)
    folder = stage_folder(ctx.workspace, step.name, key)
    if not (folder / "result.json").exists():
        raise missing(ctx, step.name, key)
    return {"name": step.name, "dir": str(folder), "key": key, "cached": True, "run_id": None,
            "result": json.loads((folder / "result.json").read_text()), "code_version": code_version(step.module)}


@task(name="stage", task_run_name="{step.name}", cache_policy=NO_CACHE)
def stage(ctx: Context, step: Step, inputs: dict[str, Artifact]) -> dict:
    """Run one component as a process (or reuse its keyed output) inside a child MLflow run."""
    config = getattr(ctx.profile, step.section)
    started = time.time()
    run_id = ctx.tracker.start_run(step.name, ctx.parent_run, tags={"component": step.module})
    ctx.tracker.log_params(run_id, {step.name: config.model_dump(mode="json"),
                                    "inputs": {k: v.path for k, v in inputs.items()}})
    steps = getattr(config, TRAINING_STEPS.get(step.module, ""), None)
    try:
        folder, key, cached = run_stage(step.name, step.module, config, inputs, ctx.profile, ctx.workspace, steps,
                                        force=step.name in ctx.force)
    except BaseException:
        ctx.tracker.finish(run_id, ok=False)
        raise
    result = json.loads((folder / "result.json").read_text())
    ctx.tracker.set_tags(run_id, {"stage_key": key, "cached": cached, "code_version": code_version(step.module)})
    if not cached:  # a cache hit's curves and files are already on the run that produced them
        ctx.tracker.log_metrics_file(run_id, folder / "metrics.jsonl")
        for extra in ("result.json", "metrics.json", "samples.jsonl", "stage.log"):
            if (folder / extra).exists():
                ctx.tracker.log_artifact(run_id, folder / extra)
    ctx.tracker.log_metrics(run_id, {**result, **result.get("metrics", {})})
    ctx.tracker.finish(run_id)
    ctx.seconds[step.name] = time.time() - started
    print(f"{step.name}: {'cache hit' if cached else 'done'} ({folder})")
    out = {"name": step.name, "dir": str(folder), "key": key, "cached": cached, "run_id": run_id, "result": result,
           "code_version": code_version(step.module)}
    return shown_cached(out)


def shown_cached(out: dict) -> dict | State:
    """A cache hit ends its task in a state named Cached, so the Prefect UI shows it as one."""
    return Completed(data=out, name="Cached", message=f"reused {out['dir']}") if out["cached"] else out


def value(task_result) -> dict:
    """What a task returned: the tasks above return a Cached state on a cache hit."""
    return task_result.result() if isinstance(task_result, State) else task_result


def sent_to_gpu(ctx: Context, step: Step) -> bool:
    runtime = ctx.profile.runtime
    return ctx.dispatch and runtime.gpu_deployment is not None and step.module in runtime.gpu_components


def remote_stage(ctx: Context, step: Step, inputs: dict[str, Artifact]) -> dict:
    """Send a stage to the GPU work pool's deployment, wait for it, then read its keyed output
    (the workspace is shared storage) and the MLflow run it logged under this run."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    started = time.time()
    deployment = ctx.profile.runtime.gpu_deployment.format(stage=step.name)
    try:
        run = run_deployment(deployment, timeout=None, flow_run_name=step.name, parameters={
            **ctx.source, "stage": step.name, "parent_run": ctx.parent_run, "force": step.name in ctx.force})
    except ObjectNotFound:
        raise StageFailed(f"stage {step.name!r}: no Prefect deployment {deployment!r} on the server "
                          "(runtime.gpu_deployment); `r1flow deploy` registers infra/prefect.yaml") from None
    if not run.state.is_completed():
        raise StageFailed(f"stage {step.name!r} on deployment {deployment!r} ended {run.state.name}: "
                          f"{run.state.message or 'see the Prefect UI'}")
    out = lookup(ctx, step, inputs)
    runs = ctx.tracker.client.search_runs(
        [ctx.tracker.experiment_id], f"tags.mlflow.parentRunId = '{ctx.parent_run}' and "
        f"tags.mlflow.runName = '{step.name}'", order_by=["attributes.start_time DESC"], max_results=1)
    ctx.seconds[step.name] = time.time() - started
    return {**out, "cached": runs[0].data.tags.get("cached") == "True", "run_id": runs[0].info.run_id,
            "flow_run": str(run.id)}


@task(name="validate", task_run_name="validate-{suite}", cache_policy=NO_CACHE)
def validate_output(ctx: Context, out: dict, suite: str) -> None:
    """Great Expectations on a stage's output before any stage trains on it. A report exists only
    for an output that passed (a failure raises first), so a cached output validated once is done."""
    path = ctx.workspace / "logs" / f"validation-{suite}-{out['key']}.json"
    if out["cached"] and path.exists():
        return
    from components.validate import validate_file

    report = validate_file(Path(out["dir"]) / "train.jsonl", suite, name=suite)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    if out["run_id"]:
        ctx.tracker.log_artifact(out["run_id"], path, "validation")


@task(name="version-data", cache_policy=NO_CACHE)
def version_data(ctx: Context, datasets: dict[str, Artifact]) -> str:
    """Copy this run's datasets into ``data/`` (imported benchmarks stay), ``dvc add`` and push;
    return the DVC hash."""
    staging = ctx.data_dir.parent / f".{ctx.data_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if (ctx.data_dir / "benchmarks").is_dir():  # `r1flow eval`'s imports
        shutil.copytree(ctx.data_dir / "benchmarks", staging / "benchmarks")
    for relative, artifact in datasets.items():
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact.path, staging / relative)
    shutil.rmtree(ctx.data_dir, ignore_errors=True)
    os.replace(staging, ctx.data_dir)
    versioning.ensure_repo(ctx.root, str((ctx.workspace / "dvc-remote").resolve()))
    data_hash = versioning.version_data(ctx.root, ctx.profile.data_dir.as_posix())
    ctx.tracker.set_tags(ctx.parent_run, {"data_hash": data_hash})
    ctx.tracker.log_artifact(ctx.parent_run, ctx.root / f"{ctx.profile.data_dir.as_posix()}.dvc")  # for reruns
    return data_hash


@task(name="register", cache_policy=NO_CACHE)
def register(ctx: Context, outputs: dict[str, dict], data_hash: str) -> dict[str, dict]:
    """Register each trained model once per stage key (alias ``candidate``), with its lineage; then
    move ``champion`` to those that pass every promotion gate. Aliases move only after every
    version is registered, so a failure on the way leaves every champion where it was."""
    profile, tracker = ctx.profile, ctx.tracker
    eval_key = content_hash(profile.evaluate, artifact(outputs, "data/test").key)[:16]  # scores compare only here
    registered, decisions = {}, []
    for role in (r for r in REGISTERED if f"eval_{r}" in outputs):  # parents first: lineage names their version
        out, evaluation = outputs[role], outputs[f"eval_{role}"]
        name = f"{profile.tracking.registry_prefix}-{role.replace('_', '-')}"
        existing = tracker.client.search_model_versions(f"name = '{name}' and tags.stage_key = '{out['key']}'")
        if existing:
            version, tags = str(existing[0].version), existing[0].tags
        else:
            metrics = evaluation["result"]["metrics"]
            parent = PARENTS[role]
            problems = training_health(read_metrics(Path(out["dir"]) / "metrics.jsonl"), profile.promotion)
            tags = {
                "stage_key": out["key"], "config_hash": content_hash(profile)[:16], "code_version": out["code_version"],
                **ctx.commit, "data_hash": data_hash, "eval_run_id": evaluation["run_id"], "eval_key": eval_key,
                "parent_model": registered[parent]["ref"] if parent in registered
                else f"{parent} (stage {outputs[parent]['key']})",
                PRIMARY_METRIC: metrics["pass@1"], "format_rate": metrics["format_rate"],
                "data_validation": "passed",  # every suite passed, or the flow would have stopped before
                "training_health": "; ".join(problems) or "ok",
            }
            version = tracker.register(out["run_id"], Path(out["dir"]) / "model", name, tags)
        registered[role] = {"name": name, "version": version, "ref": f"{name}/{version}", "new": not existing}
        champion = tracker.champion(name)
        if champion is not None and str(champion.version) == version:
            registered[role]["champion"] = True
            continue
        checks = gate_checks({k: str(v) for k, v in tags.items()}, champion.tags if champion else None,
                             profile.promotion)
        tracker.tag_version(name, version, {"promotion": verdict(checks)})
        decisions.append((role, all(c.passed for c in checks)))
        registered[role]["champion"] = False
        print(f"{name} v{version}: {verdict(checks)}")
    for role, passed in decisions:
        if passed:
            tracker.set_alias(registered[role]["name"], "champion", registered[role]["version"])
            registered[role]["champion"] = True
    return registered


@flow(name="r1flow", log_prints=True)
def r1_pipeline(config: str | None = None, overrides: list[str] | None = None, root: str = ".",
                from_stage: str | None = None, restored: str | None = None, reproduces: str | None = None) -> dict:
    """The whole recipe for one profile; returns run ids, data hash, eval metrics and versions.

    ``from_stage`` reruns that stage and everything downstream of it even when cached;
    ``restored`` (``r1flow rerun``) takes the datasets from a DVC-restored data folder.
    """
    force = frozenset({check_stage(from_stage), *downstream(from_stage)}) if from_stage else frozenset()
    return run_recipe(config, overrides, root, force=force, restored=Path(restored) if restored else None,
                      tags={"reproduces": reproduces} if reproduces else {})


@flow(name="r1flow-stage", flow_run_name="{stage}", log_prints=True)
def stage_flow(stage: str, config: str | None = None, overrides: list[str] | None = None, root: str = ".",
               parent_run: str | None = None, force: bool = False) -> dict:
    """One stage on cached inputs, as its own flow: ``r1flow run --only STAGE``, the per-stage
    deployments, and where the pipeline sends GPU stages (logging under its MLflow run)."""
    return run_recipe(config, overrides, root, force=frozenset({stage}) if force else frozenset(),
                      only=check_stage(stage), parent_run=parent_run)


def run_recipe(config: str | None, overrides: list[str] | None, root: str, force: frozenset[str] = frozenset(),
               only: str | None = None, parent_run: str | None = None, restored: Path | None = None,
               tags: dict | None = None) -> dict:
    profile = load_profile(config, overrides)
    root_path = Path(root).resolve()
    workspace = root_path / profile.workspace
    workspace.mkdir(parents=True, exist_ok=True)
    tracking = profile.tracking
    tracker = Tracker(tracking.tracking_uri or default_uri(workspace), tracking.experiment, workspace / "mlartifacts")
    own_run, commit = parent_run is None, code_commit()
    if own_run:
        parent_run = tracker.start_run(profile.name + (f" (only {only})" if only else ""), tags={
            "profile": profile.name, "config_hash": content_hash(profile)[:16], **commit, **(tags or {})})
        tracker.log_params(parent_run, profile.model_dump(mode="json"))
        tracker.log_dict(parent_run, profile.model_dump(mode="json"), "profile.json")  # what `r1flow rerun` reads
    source = {"config": config, "overrides": list(overrides or []), "root": str(root_path)}
    ctx = Context(profile, root_path, workspace, tracker, parent_run, source, force=force, only=only,
                  dispatch=only is None, restored=restored, commit=commit)
    try:
        summary = _recipe(ctx)
    except BaseException:
        if own_run:
            tracker.finish(parent_run, ok=False)
        raise
    if own_run:
        tracker.finish(parent_run)
    return {"run_id": parent_run, "tracking_uri": tracker.uri, "flow_run_id": str(prefect_run.id),
            "seconds": ctx.seconds, **summary}


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


def _recipe(ctx: Context) -> dict:
    """Every stage of ``RECIPE`` in order (under --only: its inputs looked up, then it alone),
    then data versioning, registration and the report."""
    wanted = {ctx.only, *upstream(ctx.only)} if ctx.only else selected(ctx.profile)
    outputs = {"data": value(prepare_data(ctx))}
    for step in RECIPE:
        if step.name not in wanted:
            continue
        inputs = {name: artifact(outputs, ref) for name, ref in step.inputs.items()}
        if ctx.looked_up(step.name):
            outputs[step.name] = lookup(ctx, step, inputs)
            continue
        outputs[step.name] = remote_stage(ctx, step, inputs) if sent_to_gpu(ctx, step) else value(stage(ctx, step, inputs))
        if step.validate:
            validate_output(ctx, outputs[step.name], step.validate)
    ran = {name: out["cached"] for name, out in outputs.items() if not ctx.looked_up(name)}
    if ctx.only:
        return {"stages": ran, "result": outputs[ctx.only].get("result", {})}

    data_hash = version_data(ctx, {relative: artifact(outputs, ref) for relative, ref in VERSIONED.items()
                                   if ref.split("/")[0] in outputs})
    versions = register(ctx, outputs, data_hash)
    table = _report(ctx, outputs, versions)
    return {"data_hash": data_hash, "metrics": table, "versions": versions, "stages": ran,
            **{name: outputs[name]["result"] for name in ("rejection_sampling",) if name in outputs}}


def selected(profile: Profile) -> set[str]:
    """The profile's ``stages`` and everything they need; all stages when it names none."""
    if profile.stages is None:
        return set(STAGES)
    return {"data"}.union(*({check_stage(name), *upstream(name)} for name in profile.stages))


def _report(ctx: Context, outputs: dict[str, dict], versions: dict[str, dict]) -> dict[str, dict]:
    """The eval table across the lineage and the GRPO training curves: a Prefect markdown
    artifact, and files on the MLflow parent run (``report/``). Returns the table."""
    table = {role: outputs[f"eval_{role}"]["result"]["metrics"] for role in EVALUATED if f"eval_{role}" in outputs}
    folder = ctx.workspace / "reports" / ctx.parent_run
    markdown = eval_table(table, versions, ctx.profile.evaluate.k)
    curves = {name: read_metrics(Path(outputs[name]["dir"]) / "metrics.jsonl") for name in ("r1_zero", "r1_rl")
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
