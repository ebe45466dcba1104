"""The R1 recipe as one Prefect flow: data → base → R1-Zero | cold start → RL → rejection
sampling → SFT → distillation → evaluation → registry.

    r1flow run                      # or: python -m flows.cli run --config configs/default.yaml

Tasks only wire components: each training stage runs as its own process over files
(``flows.stages``), and what passes between tasks is paths and content keys, never models.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components import versioning
from components.config import Profile, Section, content_hash, load_profile
from components.data import build_datasets
from components.tracking import PRIMARY_METRIC, Tracker, default_uri, metric_name
from components.validate import validate_file
from flows.stages import Artifact, code_version, file_digest, run_stage

EVALUATED = ("base", "cold_start", "r1_zero", "r1_rl", "r1", "student")
REGISTERED = ("cold_start", "r1_zero", "r1_rl", "r1", "student")
TRAINING_STEPS = {"base": "pretrain_steps", "sft": "max_steps", "grpo": "max_steps"}


@dataclass
class Context:
    """What every task of one pipeline run needs: the profile, folders and the MLflow parent run."""

    profile: Profile
    root: Path
    workspace: Path
    tracker: Tracker
    parent_run: str

    @property
    def data_dir(self) -> Path:
        return self.root / self.profile.data_dir


@task(name="data", cache_policy=NO_CACHE)
def prepare_data(ctx: Context) -> dict[str, Artifact]:
    """Generate or import prompt sets, decontaminate, validate each one; keyed like any stage."""
    cfg = ctx.profile.data
    sources = [file_digest(cfg.train_path), file_digest(cfg.test_path)]  # a benchmark's content, not its path
    key = content_hash("data", code_version("data"), cfg, ctx.profile.seed, sources)[:16]
    folder = ctx.workspace / "stages" / "data" / key
    run_id = ctx.tracker.start_run("data", ctx.parent_run, tags={"stage_key": key})
    ctx.tracker.log_params(run_id, {"data": cfg.model_dump(mode="json")})
    cached = (folder / "report.json").exists()
    if not cached:
        tmp = folder.parent / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_datasets(cfg, ctx.profile.seed, tmp)
            _validate(ctx, run_id, tmp, {"train": "prompts", "validation": "prompts", "test": "eval",
                                         "cold_start": "sft"})
        except BaseException:  # also Ctrl-C: nothing half-written, the run marked failed
            shutil.rmtree(tmp, ignore_errors=True)
            ctx.tracker.finish(run_id, ok=False)
            raise
        os.replace(tmp, folder)
    report = json.loads((folder / "report.json").read_text())
    ctx.tracker.log_metrics(run_id, {k: v for k, v in report.items() if isinstance(v, int)})
    ctx.tracker.set_tags(run_id, {"cached": cached})
    ctx.tracker.log_artifact(run_id, folder / "report.json")
    ctx.tracker.finish(run_id)
    names = ("train", "validation", "test", "cold_start")
    return {name: Artifact(str(folder / f"{name}.jsonl"), f"{key}/{name}") for name in names}


def _validate(ctx: Context, run_id: str, folder: Path, kinds: dict[str, str]) -> None:
    """Great Expectations suites at a stage boundary; a failure raises before anything trains."""
    for name, kind in kinds.items():
        path = folder / f"{name}.jsonl"
        if name == "validation" and not path.read_text().strip():
            continue  # an empty validation split is allowed (n_validation: 0)
        report = validate_file(path, kind, name=f"{ctx.profile.data.source}/{name}")
        (folder / f"validation-{name}.json").write_text(json.dumps(report, indent=2))
        ctx.tracker.log_artifact(run_id, folder / f"validation-{name}.json", "validation")


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE)
def stage(ctx: Context, name: str, module: str, config: Section, **inputs: Artifact) -> dict:
    """Run one component as a process (or reuse its keyed output) inside a child MLflow run."""
    run_id = ctx.tracker.start_run(name, ctx.parent_run, tags={"component": module})
    ctx.tracker.log_params(run_id, {name: config.model_dump(mode="json"),
                                    "inputs": {k: v.path for k, v in inputs.items()}})
    steps = getattr(config, TRAINING_STEPS.get(module, ""), None)
    try:
        folder, key, cached = run_stage(name, module, config, inputs, ctx.profile, ctx.workspace, steps)
    except BaseException:
        ctx.tracker.finish(run_id, ok=False)
        raise
    result = json.loads((folder / "result.json").read_text())
    ctx.tracker.set_tags(run_id, {"stage_key": key, "cached": cached, "code_version": code_version(module)})
    ctx.tracker.log_metrics_file(run_id, folder / "metrics.jsonl")
    ctx.tracker.log_metrics(run_id, {**result, **result.get("metrics", {})})
    for extra in ("result.json", "metrics.json", "samples.jsonl", "stage.log"):
        if (folder / extra).exists():
            ctx.tracker.log_artifact(run_id, folder / extra)
    ctx.tracker.finish(run_id)
    print(f"{name}: {'cache hit' if cached else 'done'} ({folder})")
    return {"name": name, "dir": str(folder), "key": key, "cached": cached, "run_id": run_id, "result": result,
            "code_version": code_version(module)}


def model_of(out: dict) -> Artifact:
    return Artifact(str(Path(out["dir"]) / "model"), out["key"])


def traces_of(out: dict) -> Artifact:
    return Artifact(str(Path(out["dir"]) / "train.jsonl"), out["key"])


@task(name="validate-traces", cache_policy=NO_CACHE)
def validate_traces(ctx: Context, traces: dict) -> None:
    report = validate_file(Path(traces["dir"]) / "train.jsonl", "rejection_sampled", name="rejection_sampled")
    (Path(ctx.workspace) / "logs").mkdir(exist_ok=True)
    path = ctx.workspace / "logs" / f"validation-rejection_sampled-{traces['key']}.json"
    path.write_text(json.dumps(report, indent=2))
    ctx.tracker.log_artifact(traces["run_id"], path, "validation")


@task(name="version-data", cache_policy=NO_CACHE)
def version_data(ctx: Context, datasets: dict[str, Artifact]) -> str:
    """Copy this run's datasets into ``data/``, ``dvc add`` and push; return the DVC hash."""
    staging = ctx.data_dir.parent / f".{ctx.data_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    for relative, artifact in datasets.items():
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(artifact.path, staging / relative)
    shutil.rmtree(ctx.data_dir, ignore_errors=True)
    os.replace(staging, ctx.data_dir)
    versioning.ensure_repo(ctx.root, str((ctx.workspace / "dvc-remote").resolve()))
    data_hash = versioning.version_data(ctx.root, ctx.profile.data_dir.as_posix())
    ctx.tracker.set_tags(ctx.parent_run, {"data_hash": data_hash})
    return data_hash


@task(name="register", cache_policy=NO_CACHE)
def register(ctx: Context, models: dict[str, dict], evaluations: dict[str, dict], parents: dict[str, str],
             data_hash: str, test_set: Artifact) -> dict[str, dict]:
    """Register each trained model (once per stage key), alias candidate, champion if best."""
    eval_key = content_hash(ctx.profile.evaluate, test_set.key)[:16]  # scores compare only under the same one
    registered = {}
    for role, out in models.items():
        name = f"{ctx.profile.tracking.registry_prefix}-{role.replace('_', '-')}"
        score = evaluations[role]["result"]["metrics"]["pass@1"]
        existing = ctx.tracker.client.search_model_versions(f"name = '{name}' and tags.stage_key = '{out['key']}'")
        if existing:
            version = existing[0].version
        else:
            version = ctx.tracker.register(out["run_id"], Path(out["dir"]) / "model", name, {
                "stage_key": out["key"], "config_hash": content_hash(ctx.profile)[:16],
                "code_version": out["code_version"], "data_hash": data_hash,
                "parent_model": parents[role], "eval_run_id": evaluations[role]["run_id"],
                "eval_key": eval_key, PRIMARY_METRIC: score,
            })
        champion = ctx.tracker.promote_if_best(name, version, score, eval_key)
        registered[role] = {"name": name, "version": version, "champion": champion, "new": not existing}
    return registered


@flow(name="r1flow", log_prints=True)
def r1_pipeline(config: str | None = None, overrides: list[str] | None = None, root: str = ".") -> dict:
    """The whole recipe for one profile; returns run ids, data hash, eval metrics and versions."""
    profile = load_profile(config, overrides)
    root_path = Path(root).resolve()
    workspace = root_path / profile.workspace
    workspace.mkdir(parents=True, exist_ok=True)
    tracking = profile.tracking
    tracker = Tracker(tracking.tracking_uri or default_uri(workspace), tracking.experiment, workspace / "mlartifacts")
    parent = tracker.start_run(f"{profile.name}", tags={"profile": profile.name,
                                                          "config_hash": content_hash(profile)[:16]})
    tracker.log_params(parent, profile.model_dump(mode="json"))
    ctx = Context(profile, root_path, workspace, tracker, parent)
    try:
        summary = _recipe(ctx)
    except BaseException:
        tracker.finish(parent, ok=False)
        raise
    tracker.finish(parent)
    return {"run_id": parent, "tracking_uri": tracker.uri, **summary}


def _recipe(ctx: Context) -> dict:
    p = ctx.profile
    data = prepare_data(ctx)
    base = stage(ctx, "base", "base", p.base)

    # R1-Zero: GRPO straight from the base, rule rewards only.
    r1_zero = stage(ctx, "r1_zero", "grpo", p.grpo, model=model_of(base), data=data["train"])

    # R1: a little cold-start SFT, then the same RL, then rejection sampling and SFT of the base.
    cold_start = stage(ctx, "cold_start", "sft", p.cold_start, model=model_of(base), data=data["cold_start"])
    r1_rl = stage(ctx, "r1_rl", "grpo", p.grpo, model=model_of(cold_start), data=data["train"])
    traces = stage(ctx, "rejection_sampling", "rejection_sampling", p.rejection_sampling,
                   model=model_of(r1_rl), data=data["train"])
    validate_traces(ctx, traces)
    r1 = stage(ctx, "r1", "sft", p.sft, model=model_of(base), data=traces_of(traces))

    # Distillation: plain SFT of a smaller student on the R1 traces.
    student_base = stage(ctx, "student_base", "base", p.student)
    student = stage(ctx, "student", "sft", p.distill, model=model_of(student_base), data=traces_of(traces))

    data_hash = version_data(ctx, {
        "prompts/train.jsonl": data["train"], "prompts/validation.jsonl": data["validation"],
        "prompts/test.jsonl": data["test"], "traces/cold_start.jsonl": data["cold_start"],
        "traces/rejection_sampled.jsonl": traces_of(traces),
    })
    models = {"base": base, "cold_start": cold_start, "r1_zero": r1_zero, "r1_rl": r1_rl, "r1": r1,
              "student": student}
    evaluations = {role: stage(ctx, f"eval_{role}", "evaluate", p.evaluate, model=model_of(models[role]),
                               data=data["test"]) for role in EVALUATED}
    lineage = {**models, "student_base": student_base}
    parents = {"cold_start": "base", "r1_zero": "base", "r1_rl": "cold_start", "r1": "base",
               "student": "student_base"}
    parents = {role: f"{parent}:{lineage[parent]['key']}" for role, parent in parents.items()}
    versions = register(ctx, {r: models[r] for r in REGISTERED}, evaluations, parents, data_hash, data["test"])
    table = {role: evaluations[role]["result"]["metrics"] for role in EVALUATED}
    _report(ctx, table, versions)
    ran = [base, r1_zero, cold_start, r1_rl, traces, r1, student_base, student, *evaluations.values()]
    return {"data_hash": data_hash, "metrics": table, "versions": versions,
            "stages": {s["name"]: s["cached"] for s in ran},
            "rejection_sampling": traces["result"]}


def _report(ctx: Context, table: dict[str, dict], versions: dict[str, dict]) -> None:
    """The eval table across the lineage, as a Prefect markdown artifact and an MLflow artifact."""
    keys = ["pass@1", f"cons@{ctx.profile.evaluate.k}", "greedy_accuracy", "format_rate",
            "language_consistency", "mean_length"]
    lines = ["| model | " + " | ".join(keys) + " | registered |", "|---" * (len(keys) + 2) + "|"]
    for role, metrics in table.items():
        version = versions.get(role)
        tag = f"{version['name']} v{version['version']}{' (champion)' if version['champion'] else ''}" if version else ""
        lines.append(f"| {role} | " + " | ".join(f"{metrics[k]:.3f}" for k in keys) + f" | {tag} |")
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="r1flow-eval", description="evaluation across the lineage")
    path = ctx.workspace / "logs" / "eval_table.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(markdown + "\n")
    ctx.tracker.log_artifact(ctx.parent_run, path)
    ctx.tracker.log_metrics(ctx.parent_run, {f"{role}.{metric_name(k)}": v for role, m in table.items()
                                             for k, v in m.items()})
