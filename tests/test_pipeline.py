"""The whole flow on the micro profile: what it leaves in MLflow, the registry and DVC."""

import time
from pathlib import Path

import pytest
from helpers import EVALS, REGISTERED, STAGES, check_registry, check_report, check_runs, check_schedule, child_runs
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from components import versioning
from components.config import load_profile
from components.validate import DataValidationError
from flows.recipe import STAGES as STAGE_ORDER

MICRO = str(Path(__file__).parents[1] / "configs" / "micro.yaml")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The whole micro recipe, two stages at once where the graph allows."""
    from flows.pipeline import r1_pipeline

    root = tmp_path_factory.mktemp("project")
    return root, r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "runtime.max_parallel=2"], root=str(root))


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def champions(first_run):
    """Every registered model's first version made champion by hand, as `r1flow promote --yes`
    does: planted, so the tests below know where every champion must stay."""
    from components.promotion import crown
    from components.tracking import Tracker

    _, summary = first_run
    tracker = Tracker(summary["tracking_uri"], "r1flow")
    for name in REGISTERED:
        crown(tracker, tracker.version(name, "1"), by_hand="planted by the test")
    return {name: "1" for name in REGISTERED}


def test_parent_run_with_one_child_per_stage(first_run):
    _, summary = first_run
    check_runs(summary)
    grpo = child_runs(summary)["r1_zero"]
    assert grpo.data.params["r1_zero.beta"] == str(load_profile(MICRO).grpo.beta)  # params name the stage
    # Times: each stage's span inside the run; no run is shorter than its critical path
    spans = summary["timeline"]
    assert set(spans) == set(summary["stages"]) and all(0 <= start <= end for start, end in spans.values())
    assert summary["stage_seconds"] >= summary["critical_path"]["seconds"] > 0
    assert summary["wall_seconds"] >= summary["critical_path"]["seconds"]
    path = summary["critical_path"]  # a chain from a root of the graph to an evaluation, by these times
    assert path["stages"][0] in ("data", "base", "student_base") and path["stages"][-1].startswith("eval_")
    assert path["seconds"] == pytest.approx(sum(summary["seconds"][name] for name in path["stages"]))


def test_independent_branches_run_at_once_and_no_stage_before_what_it_reads(first_run):
    from flows.recipe import upstream

    _, summary = first_run
    overlapped = check_schedule(summary, at_most=2)
    assert any(a not in upstream(b) and b not in upstream(a) for a, b in overlapped), summary["timeline"]
    assert list(summary["stages"]) == [s for s in STAGE_ORDER if s in summary["stages"]]  # the tables' order


def test_report_published_to_mlflow_and_prefect(first_run):
    from prefect.artifacts import Artifact

    _, summary = first_run
    check_report(summary)
    table = Artifact.get("r1flow-eval")
    assert table is not None and "| r1_zero |" in table.data and "| student |" in table.data


def test_registered_versions_with_aliases_and_lineage(first_run):
    _, summary = first_run
    check_registry(summary)


def test_the_final_rl_trains_on_the_sft_model_and_is_judged_against_it(first_run):
    _, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    children = child_runs(summary)
    sft_key = children["r1_sft"].data.tags["stage_key"]
    assert children["r1_final"].data.params["inputs.model"].endswith(f"/r1_sft/{sft_key}/model")  # from R1 SFT
    assert children["r1_final"].data.metrics["steps"] == load_profile(MICRO).final_rl.max_steps  # its own section
    final = client.get_model_version("r1flow-r1-final", summary["versions"]["r1_final"]["version"])
    sft = summary["versions"]["r1_sft"]
    assert final.tags["parent_model"] == f"{sft['name']}/{sft['version']}" == "r1flow-r1-sft/1"
    assert final.tags["parent_eval_run_id"] == children["eval_r1_sft"].info.run_id  # compared with its evaluation
    assert summary["metrics"]["r1_final"]["pass@1"] == children["eval_r1_final"].data.metrics["pass_at_1"]


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


GRPO_AND_DOWNSTREAM = {"r1_zero", "r1_rl", "rejection_sampling", "r1_sft", "r1_final", "student", "student_no_traces",
                       "eval_r1_zero", "eval_r1_rl", "eval_r1_sft", "eval_r1_final", "eval_student",
                       "eval_student_no_traces"}


def test_a_grpo_change_reruns_grpo_and_downstream_only_and_from_forces_a_stage_on(first_run):
    from flows.pipeline import r1_pipeline

    root, _ = first_run
    changed = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "grpo.learning_rate=4e-5"], root=str(root))
    assert {name for name, cached in changed["stages"].items() if not cached} == GRPO_AND_DOWNSTREAM
    forced = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "grpo.learning_rate=4e-5"], root=str(root),
                         from_stage="rejection_sampling")
    assert {name for name, cached in forced["stages"].items() if not cached} == {
        "rejection_sampling", "r1_sft", "r1_final", "student", "student_no_traces", "eval_r1_sft", "eval_r1_final",
        "eval_student", "eval_student_no_traces"}
    assert forced["metrics"] == changed["metrics"]  # same keys, same seeds: the same results again
    assert not any(v["new"] for v in forced["versions"].values())  # no duplicate versions


def test_only_runs_one_stage_on_cached_inputs_and_names_a_missing_one(first_run):
    from flows.pipeline import stage_flow
    from flows.stages import MissingInput

    root, _ = first_run
    only = stage_flow(stage="cold_start", config=MICRO, overrides=["runtime.device=cpu"], root=str(root), force=True)
    assert only["stages"] == {"cold_start": False}
    with pytest.raises(MissingInput, match="input stage 'cold_start' has no cached output"):  # never trained so
        stage_flow(stage="r1_rl", config=MICRO, overrides=["runtime.device=cpu", "cold_start.max_steps=7"],
                   root=str(root))


def test_a_regressed_model_stays_candidate_with_the_reason_logged(first_run, champions):
    from flows.pipeline import r1_pipeline

    root, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    # R1's SFT made to learn nothing (one step at lr 1e-30: no update a float32 forward pass can see):
    # the same model as its parent, so its evaluation is its parent's, sample for sample. Planted:
    # no CPU's floating-point order can turn that into a gain.
    worse = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "sft.max_steps=1", "sft.learning_rate=1e-30"],
                        root=str(root))
    version = worse["versions"]["r1_sft"]
    assert version["new"] and not version["champion"]
    assert worse["metrics"]["r1_sft"] == worse["metrics"]["base"]
    assert str(client.get_model_version_by_alias("r1flow-r1-sft", "champion").version) == champions["r1flow-r1-sft"]
    reason = client.get_model_version("r1flow-r1-sft", version["version"]).tags["promotion"]
    assert reason.startswith("kept as candidate: beats its parent: +0.000 pass@1")
    assert "beats the champion:" in reason


def test_a_failing_stage_leaves_every_champion_in_place(first_run, champions):
    from flows.pipeline import r1_pipeline
    from flows.stages import StageFailed

    root, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    before = {name: client.get_model_version_by_alias(name, "champion").version for name in REGISTERED}
    with pytest.raises(StageFailed, match="'r1_sft' failed"):
        r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "runtime.stage_python=/bin/false"],
                    root=str(root), from_stage="r1_sft")
    assert {name: client.get_model_version_by_alias(name, "champion").version for name in REGISTERED} == before


def test_bad_traces_stop_the_flow_before_training_on_them(first_run, champions):
    from flows.pipeline import r1_pipeline

    root, summary = first_run
    client = MlflowClient(summary["tracking_uri"])
    before = client.get_model_version_by_alias("r1flow-r1-sft", "champion").version
    r1_runs = len(list((root / ".r1flow" / "stages" / "r1_sft").iterdir()))
    # Two new tokens cannot hold a well-formed trace: rejection sampling keeps nothing.
    with pytest.raises(DataValidationError, match="rejection_sampled"):
        r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "rejection_sampling.max_new_tokens=2"],
                    root=str(root))
    assert len(list((root / ".r1flow" / "stages" / "r1_sft").iterdir())) == r1_runs  # nothing trained
    assert client.get_model_version_by_alias("r1flow-r1-sft", "champion").version == before


def test_rerun_on_a_fresh_clone_restores_the_data_and_reproduces_every_metric(first_run, tmp_path):
    import shutil

    from flows.reproduce import rerun
    from flows.workspace import locate

    root, summary = first_run
    clone = tmp_path / "clone"  # only the DVC remote and the tracking store are shared with the original
    shutil.copytree(root / ".r1flow" / "dvc-remote", clone / ".r1flow" / "dvc-remote")
    place = locate(load_profile(MICRO), clone)  # its own workspace; the run is in the original's store
    reproduced, comparisons, _ = rerun(summary["run_id"], place, summary["tracking_uri"])
    data_key = child_runs(summary)["data"].data.tags["stage_key"]
    for name in ("train", "validation", "test"):
        original = root / ".r1flow" / "stages" / "data" / data_key / f"{name}.jsonl"
        assert (clone / "data" / "prompts" / f"{name}.jsonl").read_bytes() == original.read_bytes()
    assert not any(reproduced["stages"].values())  # nothing cached in the clone: everything ran again
    assert len(comparisons) >= 30 and all(c.matches(0.0) for c in comparisons)  # exact on CPU
    assert reproduced["data_hash"] == summary["data_hash"]  # the traces it made are byte-identical too
    assert not any(v["new"] for v in reproduced["versions"].values())  # same stage keys: no duplicates


def test_a_profile_runs_part_of_the_recipe_and_imported_benchmarks_stay(first_run):
    from flows.pipeline import r1_pipeline

    root, summary = first_run
    imported = root / "data" / "benchmarks" / "countdown.jsonl"  # as `r1flow eval` leaves it
    imported.parent.mkdir(parents=True, exist_ok=True)
    imported.write_text('{"id": "countdown-test-0", "task": "countdown", "question": "q", "answer": "23"}\n')
    part = r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "stages=[eval_base, eval_r1_zero]"],
                       root=str(root))
    assert set(part["stages"]) == {"data", "base", "r1_zero", "eval_base", "eval_r1_zero"}
    assert all(part["stages"].values())  # the same keys as the whole recipe's: cache hits
    assert part["metrics"] == {role: summary["metrics"][role] for role in ("base", "r1_zero")}
    assert set(part["versions"]) == {"r1_zero"} and not part["versions"]["r1_zero"]["new"]
    assert imported.exists() and versioning.remote_status(root) == {}  # kept, and versioned with the run's data
    with pytest.raises(ValueError, match="unknown stage 'eval_nothing'"):
        r1_pipeline(config=MICRO, overrides=["runtime.device=cpu", "stages=[eval_nothing]"], root=str(root))
