"""What a completed pipeline run must leave in MLflow, whichever store tracks it: the same
assertions run against the local SQLite store (test_pipeline) and an MLflow server (test_servers)."""

from __future__ import annotations

import mlflow
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

STAGES = {"data", "base", "r1_zero", "cold_start", "r1_rl", "rejection_sampling", "r1_sft", "r1_final",
          "student_base", "student", "student_no_traces"}
MODELS = {"base", "cold_start", "r1_zero", "r1_rl", "r1_sft", "r1_final", "student_base", "student",
          "student_no_traces"}
EVALS = {f"eval_{m}" for m in MODELS}
REGISTERED = ["r1flow-cold-start", "r1flow-r1-zero", "r1flow-r1-rl", "r1flow-r1-sft", "r1flow-r1-final",
              "r1flow-student"]
LINEAGE_TAGS = {"config_hash", "code_version", "git_commit", "parent_model", "parent_eval_run_id", "eval_run_id",
                "eval_key", "pass_at_1", "stage_key", "format_rate", "data_validation", "training_health", "data_hash",
                "promotion"}


def child_runs(summary: dict) -> dict:
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    return {c.info.run_name: c for c in children}


def check_runs(summary: dict) -> None:
    """One parent run, one finished child run per stage, curves and samples logged."""
    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["data_hash"] == summary["data_hash"]
    children = child_runs(summary)
    assert set(children) == STAGES | EVALS
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert len(client.get_metric_history(children["r1_zero"].info.run_id, "reward")) >= 2  # a training curve
    evaluation = children["eval_r1_sft"]
    assert evaluation.data.metrics["pass_at_1"] == summary["metrics"]["r1_sft"]["pass@1"]
    assert "samples.jsonl" in {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert set(summary["metrics"]) == MODELS
    # pass@1 on the held-out validation prompts at step 0 and the last step: R1's figure-2 curve
    for grpo in ("r1_zero", "r1_final"):
        heldout = sorted(m.step for m in client.get_metric_history(children[grpo].info.run_id, "heldout/pass_at_1"))
        assert heldout[0] == 0 and heldout[-1] == children[grpo].data.metrics["steps"]


def check_report(summary: dict) -> None:
    client = MlflowClient(summary["tracking_uri"])
    report = {a.path for a in client.list_artifacts(summary["run_id"], "report")}
    assert {f"report/{name}" for name in ("eval_table.md", "reward.png", "accuracy.png", "kl.png",
                                          "completion_length.png", "heldout_pass.png")} <= report


def check_registry(summary: dict) -> None:
    """Each trained model registered once as candidate, with lineage and a promotion verdict that
    compared it with its parent; champion exactly where the verdict says so; loadable by transformers."""
    client = MlflowClient(summary["tracking_uri"])
    for name in REGISTERED:
        candidate = client.get_model_version_by_alias(name, "candidate")
        assert str(candidate.version) == "1"
        assert LINEAGE_TAGS <= set(candidate.tags) and candidate.tags["data_hash"] == summary["data_hash"]
        verdict = candidate.tags["promotion"]
        assert "beats its parent" in verdict  # the first version of a name needs evidence too
        champion = {v.version for v in client.search_model_versions(f"name = '{name}'") if "champion" in v.aliases}
        assert champion == ({"1"} if verdict.startswith("promoted to champion") else set())
    r1_rl = client.get_model_version_by_alias("r1flow-r1-rl", "candidate")
    assert r1_rl.tags["parent_model"] == "r1flow-cold-start/1"  # lineage names the parent's version
    r1_final = client.get_model_version_by_alias("r1flow-r1-final", "candidate")
    assert r1_final.tags["parent_model"] == "r1flow-r1-sft/1"  # the final RL starts from the SFT on the traces
    source = r1_final.source  # file:// or the server's store
    folder = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=summary["tracking_uri"])
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0
