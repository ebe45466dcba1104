"""``r1flow eval MODEL --benchmark NAME``: a registered version or a Hugging Face folder on a
public benchmark, with R1's protocol (pass@1 over k samples at T=0.6 / top-p 0.95, cons@k,
greedy), graded as the pipeline grades (math-verify; countdown: the equation checker;
reasoning-gym: each task's own verifier), every sample kept.

A public benchmark's test file enters through the project's own import path: ``sources/`` (public
copies, see its README) → the importer → ``data/benchmarks/NAME.jsonl``; reasoning-gym's is
generated, the test split of the profile's ``data.tasks``. Either is validated by the GX ``eval``
suite and versioned with DVC. The model is scored by the pipeline's ``evaluate`` component as a
keyed stage (same model, file and settings: a cache hit) in its own MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow

from components import versioning
from components.config import Profile, content_hash, load_profile, plain_template
from components.data import data_seed
from components.digest import file_sha256, tree_sha256
from components.gym import gym_splits
from components.importer import import_benchmark
from components.jsonl import write_jsonl
from components.tracking import NotFound, Tracker
from flows.keys import Artifact
from flows.stages import run_stage
from flows.vllm_stages import check_interpreter, uses_vllm
from flows.workspace import Place, locate

PROJECT = Path(__file__).resolve().parents[1]
# name -> (its format, a key of importer.PRESETS; public test file in sources/)
BENCHMARKS = {
    "gsm8k": ("gsm8k", "sources/gsm8k/test.jsonl.gz"),
    "math500": ("math", "sources/math500/test.jsonl.gz"),
    "countdown": ("countdown", "sources/countdown/countdown_cd3_test.jsonl.gz"),
}
GYM = "reasoning_gym"  # generated, not imported: the test split of the profile's data.tasks
NAMES = (*BENCHMARKS, GYM)


def benchmark_name(profile: Profile, benchmark: str) -> str:
    """The benchmark's file name; reasoning-gym's is named by the profile's tasks, seed and size."""
    if benchmark != GYM:
        return benchmark
    if not profile.data.tasks:
        raise ValueError(f"--benchmark {GYM} generates the profile's data.tasks, and this profile has none; "
                         "pass --config with one (e.g. configs/smollm2-gym.yaml)")
    return f"{GYM}-{content_hash(profile.data.tasks, data_seed(profile.data, profile.seed), profile.data.n_test)[:12]}"


def benchmark_records(profile: Profile, benchmark: str) -> list[dict]:
    """A benchmark's test set. reasoning-gym's is the pipeline's own test split of the profile's
    tasks and data seed: the same problems, drawn within the same budget."""
    if benchmark != GYM:
        kind, source = BENCHMARKS[benchmark]
        return import_benchmark(kind, PROJECT / source)
    data = profile.data
    return gym_splits(data.tasks, data_seed(data, profile.seed), data.n_train, data.n_validation, data.n_test)[2]


def benchmark_file(place: Place, profile: Profile, benchmark: str) -> Path:
    """``data/benchmarks/NAME.jsonl``, imported, validated and versioned with DVC on first use."""
    name, root = benchmark_name(profile, benchmark), place.root
    path = root / profile.data_dir / "benchmarks" / f"{name}.jsonl"
    if path.exists():
        return path
    from components.validate import validate_file  # Great Expectations: seconds to import

    staged = path.parent / f".{name}.jsonl"
    write_jsonl(staged, benchmark_records(profile, benchmark))
    try:
        validate_file(staged, "eval", name=f"benchmark/{name}")
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    staged.rename(path)  # only a validated file takes the name
    versioning.ensure_repo(root, versioning.remote_url(profile.store, place.workspace))
    versioning.version_data(root, profile.data_dir.as_posix())
    return path


def model_folder(ref: str, tracker: Tracker, workspace: Path) -> tuple[Path, str]:
    """(folder, content key) of a Hugging Face folder, or of a registered version ``NAME/VERSION``
    or ``NAME@ALIAS`` (downloaded once into the workspace)."""
    folder = Path(ref)
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ValueError(f"model {ref!r}: a folder without config.json is not a Hugging Face model folder")
        return folder, tree_sha256(folder)[:16]
    name, sep, version = ref.partition("/") if "/" in ref else ref.partition("@")
    if not sep or not version:
        raise ValueError(f"model {ref!r}: not a folder, and not a registered NAME/VERSION or NAME@ALIAS")
    try:
        found = tracker.version(name, version)
    except NotFound as error:
        raise ValueError(f"model {ref!r}: no such registered version ({error})") from None
    target = tracker.download_model(found, workspace / "models" / name / found.version)
    return target, f"{name}/{found.version}/{found.run_id}"


@flow(name="r1flow-eval", flow_run_name="{benchmark}", log_prints=True)
def evaluate_model(model: str, benchmark: str, config: str | None = None, overrides: list[str] | None = None,
                   root: str | None = None, limit: int | None = None) -> dict:
    """Score ``model`` on ``benchmark``'s test file with the profile's ``evaluate`` settings;
    ``root``: where the workspace is (none: ``$R1FLOW_ROOT``, else the working directory)."""
    profile = load_profile(config, overrides)
    place = locate(profile, root)
    workspace = place.workspace
    workspace.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(place.tracking_uri, place.experiment, place.artifacts)
    if benchmark not in NAMES:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(NAMES)}")
    folder, model_key = model_folder(model, tracker, workspace)
    data = benchmark_file(place, profile, benchmark)
    settings = profile.evaluate.model_copy(update={"limit": limit})
    if uses_vllm("evaluate", settings, profile):
        check_interpreter(profile, [f"eval_{benchmark}"])
    inputs = {"model": Artifact(str(folder), model_key), "data": Artifact(str(data), file_sha256(data))}
    started = time.time()
    data_hash = versioning.data_hash(place.root, profile.data_dir.as_posix())
    run_id = tracker.start_run(f"eval {benchmark}: {model}",
                               tags={"model": model, "benchmark": benchmark, "data_hash": data_hash})
    tracker.log_params(run_id, {"evaluate": settings.model_dump(mode="json"), "model_folder": str(folder),
                                "prompt_template": plain_template(profile)})
    try:
        out = run_stage(f"eval_{benchmark}", "evaluate", settings, inputs, profile, workspace)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    metrics = json.loads((out.folder / "metrics.json").read_text())
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, {"stage_key": out.key, "cached": out.cached})
    tracker.log_artifact(run_id, out.folder / "samples.jsonl")
    tracker.finish(run_id)
    return {"run_id": run_id, "metrics": metrics, "samples": str(out.folder / "samples.jsonl"), "cached": out.cached,
            "seconds": time.time() - started, "tracking_uri": tracker.uri}
