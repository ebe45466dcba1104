"""The whole flow on the micro profile: what it leaves in MLflow, the registry and DVC."""

import time
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


def test_report_published_to_mlflow_and_prefect(first_run):
    from prefect.artifacts import Artifact

    _, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    report = {a.path for a in client.list_artifacts(summary["run_id"], "report")}
    assert {f"report/{name}" for name in ("eval_table.md", "reward.png", "accuracy.png", "kl.png",
                                          "completion_length.png")} <= report
    table = Artifact.get("r1flow-eval")
    assert table is not None and "| r1_zero |" in table.data and "| student |" in table.data


def test_registered_versions_with_aliases_and_lineage(first_run):
    _, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    for name in REGISTERED:
        champion = client.get_model_version_by_alias(name, "champion")
        candidate = client.get_model_version_by_alias(name, "candidate")
        assert str(champion.version) == str(candidate.version) == "1"
        assert champion.tags["data_hash"] == summary["data_hash"]
        assert {"config_hash", "code_version", "git_commit", "parent_model", "eval_run_id", "eval_key", "pass_at_1",
                "stage_key", "format_rate", "data_validation", "training_health"} <= set(champion.tags)
        assert champion.tags["promotion"] == "promoted to champion"
        folder = Path(champion.source.removeprefix("file://"))
        assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0
    r1_rl = client.get_model_version_by_alias("r1flow-r1-rl", "champion")
    assert r1_rl.tags["parent_model"] == "r1flow-cold-start/1"  # lineage names the parent's version


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
    assert set(again["stages"]) == STAGES | EVALS and all(again["stages"].values())
    assert again["metrics"] == summary["metrics"]
    assert not any(v["new"] for v in again["versions"].values())
    assert set(_prefect_task_states(again["flow_run_id"], STAGES - {"data"} | EVALS).values()) == {"Cached"}


def _prefect_task_states(flow_run_id: str, names: set[str]) -> dict[str, str]:
    """State names of a flow run's task runs, as the Prefect UI shows them (recorded a little later)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.time() + 30
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states = {r.name: r.state.name for r in runs if r.state and r.name in names}
        if set(states) == names and "Running" not in states.values() or time.time() > deadline:
            return states
        time.sleep(1)


GRPO_AND_DOWNSTREAM = {"r1_zero", "r1_rl", "rejection_sampling", "r1", "student", "eval_r1_zero", "eval_r1_rl",
                       "eval_r1", "eval_student"}


def test_a_grpo_change_reruns_grpo_and_downstream_only_and_from_forces_a_stage_on(first_run):
    from flows.pipeline import r1_pipeline

    root, _ = first_run
    changed = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "grpo.learning_rate=4e-5"], root=str(root))
    assert {name for name, cached in changed["stages"].items() if not cached} == GRPO_AND_DOWNSTREAM
    forced = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "grpo.learning_rate=4e-5"], root=str(root),
                         from_stage="rejection_sampling")
    assert {name for name, cached in forced["stages"].items() if not cached} == {
        "rejection_sampling", "r1", "student", "eval_r1", "eval_student"}
    assert forced["metrics"] == changed["metrics"]  # same keys, same seeds: the same results again
    assert not any(v["new"] for v in forced["versions"].values())  # no duplicate versions


def test_only_runs_one_stage_on_cached_inputs_and_names_a_missing_one(first_run, tmp_path):
    from flows.pipeline import MissingInput, stage_flow

    root, _ = first_run
    only = stage_flow(stage="cold_start", config=MICRO, overrides=["runtime.device=cpu"], root=str(root), force=True)
    assert only["stages"] == {"cold_start": False}
    with pytest.raises(MissingInput, match="input stage 'cold_start' has no cached output"):
        stage_flow(stage="r1_rl", config=MICRO, overrides=["runtime.device=cpu"], root=str(tmp_path))


def test_a_regressed_model_stays_candidate_with_the_reason_logged(first_run):
    from flows.pipeline import r1_pipeline

    root, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    before = client.get_model_version_by_alias("r1flow-r1", "champion").version
    # R1's SFT cut to one step: an undertrained r1, worse on purpose.
    worse = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "sft.max_steps=1"], root=str(root))
    version = worse["versions"]["r1"]
    assert version["new"] and not version["champion"]
    assert client.get_model_version_by_alias("r1flow-r1", "champion").version == before
    reason = client.get_model_version("r1flow-r1", version["version"]).tags["promotion"]
    assert reason.startswith("kept as candidate: primary metric")


def test_a_failing_stage_leaves_every_champion_in_place(first_run):
    from flows.pipeline import r1_pipeline
    from flows.stages import StageFailed

    root, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    before = {name: client.get_model_version_by_alias(name, "champion").version for name in REGISTERED}
    with pytest.raises(StageFailed, match="'r1' failed"):
        r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "runtime.stage_python=/bin/false"],
                    root=str(root), from_stage="r1")
    assert {name: client.get_model_version_by_alias(name, "champion").version for name in REGISTERED} == before


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
