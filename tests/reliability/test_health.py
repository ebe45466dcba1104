"""Training health at promotion: a stage whose curve went wrong is registered but never crowned,
however well it evaluates. Each case goes through the pipeline's own ``register`` task against a
real MLflow registry (SQLite), with a healthy champion crowned first by the same path."""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import pytest

from components.config import load_profile
from components.tracking import Tracker
from flows.keys import StageOutput
from flows.pipeline import Context
from flows.registry import register
from flows.workspace import locate

MICRO = Path(__file__).parents[2] / "configs" / "micro.yaml"
PROMPTS = [f"p{i}" for i in range(200)]


def curve(steps: int = 4, **values) -> list[dict]:
    """A GRPO curve logged every step: healthy unless ``values`` says otherwise."""
    healthy = {"loss": 0.1, "grad_norm": 0.5, "reward": 0.6, "frac_reward_zero_std": 0.2, "kl": 0.01,
               "entropy": 0.5}
    return [{"step": step, **healthy, **values} for step in range(1, steps + 1)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow store; ``run(prefix, key, rows, correct)`` registers an ``r1_zero`` stage output
    (its ``metrics.jsonl`` and run metrics are ``rows``; its evaluation got ``correct`` of 200 prompts
    right, its parent 100) through ``flows.registry.register`` and returns what it reports."""
    tmp = tmp_path_factory.mktemp("health")
    tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}", "r1flow", tmp / "artifacts")

    def evaluation(correct: int) -> str:
        run_id = tracker.start_run("eval")
        path = tmp / "samples.jsonl"
        path.write_text("".join(json.dumps({"id": p, "sample": i, "correct": n < correct}) + "\n"
                                for n, p in enumerate(PROMPTS) for i in range(2)))
        tracker.log_artifact(run_id, path)
        tracker.finish(run_id)
        return run_id

    def stage(key: str, rows: list[dict]) -> StageOutput:
        folder = tmp / "stages" / secrets.token_hex(4) / key
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text("{}")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        run_id = tracker.start_run("r1_zero")
        tracker.log_metrics_file(run_id, folder / "metrics.jsonl")  # as the pipeline records a stage
        tracker.finish(run_id)
        return StageOutput("r1_zero", folder, key, False, run_id)

    def run(prefix: str, key: str, rows: list[dict], correct: int) -> dict:
        profile = load_profile(MICRO, [f"tracking.registry_prefix={prefix}"])
        ctx = Context(profile, locate(profile, tmp), tracker, None, {})
        metrics = {"pass@1": correct / 200, "format_rate": 1.0}
        (tmp / "data").mkdir(exist_ok=True)
        (tmp / "data" / "test.jsonl").write_text("".join(json.dumps({"id": p}) + "\n" for p in PROMPTS))
        outputs = {"data": StageOutput("data", tmp / "data", "d0", True),
                   "base": StageOutput("base", tmp / "base", "b0", True),
                   "eval_base": StageOutput("eval_base", tmp, "e0", True, evaluation(100)),
                   "r1_zero": stage(key, rows),
                   "eval_r1_zero": StageOutput("eval_r1_zero", tmp, f"e{key}", False, evaluation(correct),
                                               {"metrics": metrics})}
        return register.fn(ctx, outputs, "data0")["r1_zero"]

    return tracker, run


def champions(tracker: Tracker) -> dict[str, str]:
    """Every registered model's champion version, as the registry has it."""
    models = tracker.client.search_registered_models()
    return {m.name: str(m.aliases["champion"]) for m in models if "champion" in m.aliases}


def test_nan_loss_blocks_a_better_candidate_and_keeps_the_champion(registry):
    """A candidate that beats the champion on the same evaluation but logged a NaN loss is
    registered, not crowned; the champion stays, and the version's tags record the NaN."""
    tracker, run = registry
    first = run("nan", "k1", curve(), correct=150)
    assert first["champion"] and first["version"] == "1"  # the healthy path crowns
    before = champions(tracker)
    nan = curve()
    nan[2]["loss"] = math.nan
    candidate = run("nan", "k2", nan, correct=195)
    assert candidate["new"] and not candidate["champion"]
    assert champions(tracker) == before and before["nan-r1-zero"] == "1"
    history = tracker.metric_history(tracker.version("nan-r1-zero", candidate["version"]).run_id, "loss")
    assert any(math.isnan(value) for _, value in history)  # the run itself logged the NaN
    tags = tracker.version("nan-r1-zero", candidate["version"]).tags
    assert tags["training_health"] == "non-finite loss at step 3"
    assert tags["promotion"] == "kept as candidate: training health: non-finite loss at step 3"


def test_all_zero_rewards_block_promotion_and_the_tag_names_the_gate(registry):
    """A candidate whose reward was 0 at every logged step is kept as candidate, even under the micro
    profile's lenient collapse thresholds, and its ``promotion`` tag names the training-health gate."""
    tracker, run = registry
    assert run("zero", "k1", curve(), correct=150)["champion"]
    before = champions(tracker)
    flat = curve(reward=0.0, frac_reward_zero_std=1.0, loss=0.0, grad_norm=0.0)
    candidate = run("zero", "k2", flat, correct=195)
    assert not candidate["champion"] and champions(tracker) == before
    reason = tracker.version("zero-r1-zero", candidate["version"]).tags["promotion"]
    assert reason == ("kept as candidate: training health: reward never above 0 in 4 logged steps: "
                      "no learning signal")
