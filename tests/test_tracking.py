from pathlib import Path

import pytest

from components.stage_io import read_metrics
from components.tracking import Tracker, flatten, metric_name
from flows.workspace import default_uri


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    return Tracker(default_uri(tmp_path), "test", tmp_path / "artifacts")


def test_child_runs_metrics_and_params(tracker, tmp_path):
    parent = tracker.start_run("pipeline")
    child = tracker.start_run("grpo", parent)
    tracker.log_params(child, {"grpo": {"learning_rate": 3e-5, "rewards": {"accuracy": 1.0}}})
    (tmp_path / "m.jsonl").write_text('{"step": 1, "reward": 0.1}\n{"step": 2, "reward": 0.4, "kl": 0.0}\n')
    assert tracker.log_metrics_file(child, tmp_path / "m.jsonl") == 2
    tracker.finish(child)
    run = tracker.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["grpo.rewards.accuracy"] == "1.0"
    assert [m.value for m in tracker.client.get_metric_history(child, "reward")] == [0.1, 0.4]
    assert run.info.status == "FINISHED"
    tracker.finish(parent)
    tracker.finish(tracker.start_run("eval gsm8k: m", tags={"benchmark": "gsm8k"}))  # newer, not a pipeline run
    assert [r.run_id for r in tracker.pipeline_runs()] == [parent]


def test_register_sets_candidate_and_keeps_the_folder_loadable(tracker, random_model):
    run = tracker.start_run("r1")
    v1 = tracker.register(run, random_model, "r1flow-test", {"pass_at_1": 0.4, "data_hash": "abc"})
    tracker.set_alias("r1flow-test", "champion", v1)
    v2 = tracker.register(run, random_model, "r1flow-test", {"pass_at_1": 0.2})
    assert str(tracker.champion("r1flow-test").version) == v1  # registering never moves champion
    assert str(tracker.client.get_model_version_by_alias("r1flow-test", "candidate").version) == v2
    tracker.tag_version("r1flow-test", v2, {"promotion": "kept as candidate: x"})
    assert tracker.client.get_model_version("r1flow-test", v2).tags["promotion"] == "kept as candidate: x"
    assert tracker.client.get_model_version("r1flow-test", v1).tags["data_hash"] == "abc"
    source = tracker.client.get_model_version("r1flow-test", v1).source
    assert (Path(source.removeprefix("file://")) / "model.safetensors").exists()


def test_names_and_flattening():
    assert metric_name("pass@1") == "pass_at_1"
    assert metric_name("rewards/format_reward/mean") == "rewards/format_reward/mean"
    assert flatten({"a": {"b": 1, "c": {}}, "d": 2}) == {"a.b": 1, "a.c": {}, "d": 2}


def test_a_metrics_log_stops_at_a_line_being_written_and_a_finished_one_refuses_a_damaged_line(tracker, tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [row["step"] for row in read_metrics(log)] == [1, 2]  # a running stage: its last line is half-written
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 4 is not JSON"):
        tracker.log_metrics_file(tracker.start_run("sft"), log)  # an ended stage's log: damaged, never half-recorded
    assert read_metrics(tmp_path / "absent.jsonl") == []
