from pathlib import Path

import pytest

from components.tracking import Tracker, default_uri, flatten, metric_name


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


def test_register_sets_candidate_and_moves_champion_only_on_a_better_score(tracker, random_model):
    run = tracker.start_run("r1")
    v1 = tracker.register(run, random_model, "r1flow-test", {"pass_at_1": 0.4, "data_hash": "abc"})
    assert tracker.promote_if_best("r1flow-test", v1, 0.4)
    v2 = tracker.register(run, random_model, "r1flow-test", {"pass_at_1": 0.2})
    assert not tracker.promote_if_best("r1flow-test", v2, 0.2)
    client = tracker.client
    assert str(client.get_model_version_by_alias("r1flow-test", "champion").version) == v1
    assert str(client.get_model_version_by_alias("r1flow-test", "candidate").version) == v2
    assert client.get_model_version("r1flow-test", v1).tags["data_hash"] == "abc"
    source = client.get_model_version("r1flow-test", v1).source
    assert (Path(source.removeprefix("file://")) / "model.safetensors").exists()


def test_champion_is_not_replaced_by_a_score_from_another_evaluation(tracker, random_model):
    run = tracker.start_run("r1")
    v1 = tracker.register(run, random_model, "r1flow-eval", {"pass_at_1": 0.4, "eval_key": "k=4"})
    assert tracker.promote_if_best("r1flow-eval", v1, 0.4, "k=4")
    v2 = tracker.register(run, random_model, "r1flow-eval", {"pass_at_1": 0.9, "eval_key": "easier"})
    assert not tracker.promote_if_best("r1flow-eval", v2, 0.9, "easier")  # higher, but not comparable
    v3 = tracker.register(run, random_model, "r1flow-eval", {"pass_at_1": 0.5, "eval_key": "k=4"})
    assert tracker.promote_if_best("r1flow-eval", v3, 0.5, "k=4")
    assert str(tracker.client.get_model_version_by_alias("r1flow-eval", "champion").version) == v3


def test_names_and_flattening():
    assert metric_name("pass@1") == "pass_at_1" and metric_name("rewards/format_reward/mean") == "rewards/format_reward/mean"
    assert flatten({"a": {"b": 1, "c": {}}, "d": 2}) == {"a.b": 1, "a.c": {}, "d": 2}
