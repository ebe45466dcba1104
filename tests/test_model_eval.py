"""`r1flow eval`: a model folder or registered version on a public benchmark the project imports."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components import versioning
from components.config import load_profile
from components.data import build_datasets
from components.jsonl import load_jsonl
from components.tracking import Tracker
from flows.workspace import default_uri

PROJECT = Path(__file__).parents[1]
MICRO = str(PROJECT / "configs" / "micro.yaml")
SETTINGS = {"config": MICRO, "overrides": ["runtime.device=cpu"]}


def test_eval_imports_versions_and_scores_with_per_sample_records(tmp_path, tiny_base):
    from flows.model_eval import evaluate_model

    result = evaluate_model(model=str(tiny_base), benchmark="countdown", root=str(tmp_path), limit=3, **SETTINGS)
    imported = tmp_path / "data" / "benchmarks" / "countdown.jsonl"
    assert len(load_jsonl(imported)) == 256  # the whole test file, through the project's importer
    assert versioning.remote_status(tmp_path) == {}  # versioned with DVC and pushed
    samples = load_jsonl(Path(result["samples"]))
    k = 2  # micro profile: evaluate.k
    assert len(samples) == 3 * k
    assert {s["id"] for s in samples} == {f"countdown-countdown_cd3_test-{i}" for i in range(3)}
    assert all({"completion", "answer", "gold", "correct", "format", "tokens"} <= set(s) for s in samples)
    assert result["metrics"]["prompts"] == 3
    assert result["metrics"]["pass@1"] == sum(s["correct"] for s in samples) / len(samples)

    run = MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["benchmark"] == "countdown"
    assert run.data.tags["data_hash"] == versioning.data_hash(tmp_path)
    assert run.data.metrics["pass_at_1"] == result["metrics"]["pass@1"]

    again = evaluate_model(model=str(tiny_base), benchmark="countdown", root=str(tmp_path), limit=3, **SETTINGS)
    assert again["cached"] and again["metrics"] == result["metrics"]


def test_eval_a_registered_version_by_number_and_alias(tmp_path, tiny_base):
    from flows.model_eval import evaluate_model

    workspace = tmp_path / ".r1flow"
    workspace.mkdir()
    tracker = Tracker(default_uri(workspace), "r1flow", workspace / "mlartifacts")
    run_id = tracker.start_run("base")
    tracker.register(run_id, tiny_base, "r1flow-base", {})
    by_number = evaluate_model(model="r1flow-base/1", benchmark="gsm8k", root=str(tmp_path), limit=2, **SETTINGS)
    assert (workspace / "models" / "r1flow-base" / "1" / "model.safetensors").exists()
    by_alias = evaluate_model(model="r1flow-base@candidate", benchmark="gsm8k", root=str(tmp_path), limit=2,
                                  **SETTINGS)
    assert by_alias["cached"] and by_alias["metrics"] == by_number["metrics"]  # the same version, the same key
    assert json.loads(Path(by_number["samples"]).read_text().splitlines()[0])["gold"] == "18"  # GSM8K test item 0


@pytest.mark.parametrize(("model", "benchmark", "message"), [
    ("nowhere", "gsm8k", "not a folder, and not a registered NAME/VERSION"),
    ("r1flow-missing/3", "gsm8k", "no such registered version"),
    (".", "gsm8k", "without config.json"),
    ("x/1", "aime", "unknown benchmark 'aime'"),
])
def test_eval_bad_input_names_what_is_wrong(tmp_path, model, benchmark, message):
    from flows.model_eval import evaluate_model

    with pytest.raises(ValueError, match=message):
        evaluate_model(model=model, benchmark=benchmark, root=str(tmp_path), **SETTINGS)


def test_eval_benchmark_reasoning_gym_is_the_pipelines_own_test_split(tmp_path):
    from flows.model_eval import benchmark_name, benchmark_records

    profile = load_profile(PROJECT / "configs" / "smollm2-gym.yaml", ["data.n_test=12"])
    records = benchmark_records(profile, "reasoning_gym")
    build_datasets(profile.data, profile.seed, tmp_path)
    assert records == load_jsonl(tmp_path / "test.jsonl")
    other = load_profile(PROJECT / "configs" / "smollm2-gym.yaml", ["data.n_test=12", "data.seed=7"])
    assert benchmark_name(other, "reasoning_gym") != benchmark_name(profile, "reasoning_gym")  # a file per seed
    with pytest.raises(ValueError, match="this profile has none; pass --config with one"):
        benchmark_name(load_profile(PROJECT / "configs" / "micro.yaml"), "reasoning_gym")
