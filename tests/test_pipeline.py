"""The whole flow on the micro profile: what it leaves in MLflow, the registry and DVC."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from components import versioning
from components.config import load_profile
from components.validate import DataValidationError

MICRO = str(Path(__file__).parents[1] / "configs" / "micro.yaml")
STAGES = {"data", "base", "r1_zero", "cold_start", "r1_rl", "rejection_sampling", "r1", "student_base", "student"}
EVALS = {f"eval_{m}" for m in ("base", "cold_start", "r1_zero", "r1_rl", "r1", "student")}
REGISTERED = ["r1flow-cold-start", "r1flow-r1-zero", "r1flow-r1-rl", "r1flow-r1", "r1flow-student"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from flows.pipeline import r1_pipeline

    root = tmp_path_factory.mktemp("project")
    return root, r1_pipeline(config=MICRO, overrides=["runtime.device=cpu"], root=str(root))


pytestmark = pytest.mark.slow


def test_parent_run_with_one_child_per_stage(first_run):
    _, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["data_hash"] == summary["data_hash"]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert {c.info.run_name for c in children} == STAGES | EVALS
    assert all(c.info.status == "FINISHED" for c in children)
    grpo = next(c for c in children if c.info.run_name == "r1_zero")
    assert len(client.get_metric_history(grpo.info.run_id, "reward")) >= 2  # a training curve
    assert grpo.data.params["r1_zero.beta"] == str(load_profile(MICRO).grpo.beta)  # params name the stage
    evaluation = next(c for c in children if c.info.run_name == "eval_r1")
    assert "pass_at_1" in evaluation.data.metrics
    assert "samples.jsonl" in {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert set(summary["metrics"]) == {"base", "cold_start", "r1_zero", "r1_rl", "r1", "student"}


def test_registered_versions_with_aliases_and_lineage(first_run):
    _, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    for name in REGISTERED:
        champion = client.get_model_version_by_alias(name, "champion")
        candidate = client.get_model_version_by_alias(name, "candidate")
        assert str(champion.version) == str(candidate.version) == "1"
        assert champion.tags["data_hash"] == summary["data_hash"]
        assert {"config_hash", "parent_model", "eval_run_id", "eval_key", "pass_at_1", "stage_key"} <= set(champion.tags)
        folder = Path(champion.source.removeprefix("file://"))
        assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0


def test_every_saved_model_reloads(first_run):
    root, _ = first_run
    models = sorted((root / ".r1flow" / "stages").glob("*/*/model"))
    assert {m.parent.parent.name for m in models} == STAGES - {"data", "rejection_sampling"}
    for folder in models:
        assert (folder / "model.safetensors").exists()
        AutoModelForCausalLM.from_pretrained(folder)


def test_datasets_are_versioned_and_pushed(first_run):
    root, summary = first_run
    assert versioning.data_hash(root) == summary["data_hash"]
    assert versioning.remote_status(root) == {}  # `dvc status -c` clean
    assert {p.relative_to(root / "data").as_posix() for p in (root / "data").rglob("*.jsonl")} == {
        "prompts/train.jsonl", "prompts/validation.jsonl", "prompts/test.jsonl",
        "traces/cold_start.jsonl", "traces/rejection_sampled.jsonl"}


def test_unchanged_rerun_hits_every_stage_and_registers_nothing_new(first_run):
    from flows.pipeline import r1_pipeline

    root, summary = first_run
    again = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu"], root=str(root))
    assert all(again["stages"].values())
    assert again["metrics"] == summary["metrics"]
    assert not any(v["new"] for v in again["versions"].values())


def test_bad_traces_stop_the_flow_before_training_on_them(first_run):
    from flows.pipeline import r1_pipeline

    root, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    before = client.get_model_version_by_alias("r1flow-r1", "champion").version
    r1_runs = len(list((root / ".r1flow" / "stages" / "r1").iterdir()))
    # Two new tokens cannot hold a well-formed trace: rejection sampling keeps nothing.
    with pytest.raises(DataValidationError, match="rejection_sampled"):
        r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "rejection_sampling.max_new_tokens=2"],
                    root=str(root))
    assert len(list((root / ".r1flow" / "stages" / "r1").iterdir())) == r1_runs  # nothing trained
    assert client.get_model_version_by_alias("r1flow-r1", "champion").version == before
