"""Promotion with evidence: a version becomes champion only with a significant paired gain over its
parent and the champion on the same evaluation, well-formed samples, valid data and healthy
training. Outcomes are planted (forged per-sample records, logged curves), never hoped for."""

import json
import math
from pathlib import Path

import pytest

from components.promotion import (
    Evidence,
    crown,
    gate_checks,
    paired_bootstrap,
    passed,
    review,
    training_health,
    verdict,
)
from components.sections import PromotionConfig
from components.tracking import Tracker

GATE = PromotionConfig(min_format_rate=0.9, patience=3, min_entropy=0.02)
OK_TAGS = {"format_rate": "0.98", "data_validation": "passed", "training_health": "ok"}
PROMPTS = [f"p{i}" for i in range(200)]
CURVES = Path(__file__).parent / "data"


def scores(correct: int, offset: int = 0) -> dict[str, float]:
    """200 prompts, ``correct`` of them right (starting at prompt ``offset``), all k samples alike."""
    right = set(PROMPTS[offset: offset + correct])
    return {p: float(p in right) for p in PROMPTS}


def test_a_gain_inside_the_noise_of_200_prompts_is_not_significant():
    # +0.01 pass@1: three more prompts right, one lost.
    paired = paired_bootstrap(scores(102, offset=1), scores(100), GATE)
    assert paired.difference == pytest.approx(0.01) and paired.low < 0 < paired.high
    assert not paired.significant_gain
    clear = paired_bootstrap(scores(130), scores(100), GATE)  # 30 more prompts right, none lost
    assert clear.difference == pytest.approx(0.15) and clear.low >= 0.1 and clear.significant_gain


def test_the_checks_need_a_gain_over_the_parent_and_the_champion_on_the_same_evaluation():
    good, parent, champion = (Evidence(label, "k", s) for label, s in
                              (("m/2", scores(150)), ("base", scores(100)), ("m/1", scores(120))))
    assert passed(gate_checks(OK_TAGS, good, parent, champion, GATE))
    assert passed(gate_checks(OK_TAGS, good, parent, None, GATE))  # the first version of a name
    worse_than_parent = Evidence("m/1", "k", scores(90))
    failed = [c.name for c in gate_checks(OK_TAGS, worse_than_parent, parent, None, GATE) if not c.passed]
    assert failed == ["beats its parent"]
    other_test_set = Evidence("m/1", "other", scores(120))
    assert not passed(gate_checks(OK_TAGS, good, parent, other_test_set, GATE))
    assert [c.name for c in gate_checks({**OK_TAGS, "format_rate": "0.5", "training_health": "nan"}, good, parent,
                                        champion, GATE) if not c.passed] == ["format rate", "training health"]
    reason = verdict(gate_checks(OK_TAGS, worse_than_parent, parent, None, GATE))
    assert reason.startswith("kept as candidate: beats its parent: -0.050 pass@1, 95% interval [")
    assert "(paired bootstrap over 200 prompts) vs base" in reason


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow store (one per module: a new store migrates for seconds); ``version(name, correct)``
    registers a version whose evaluation run kept per-sample records with ``correct`` of 200 prompts
    right (k=2 samples each)."""
    tmp_path = tmp_path_factory.mktemp("registry")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "r1flow", tmp_path / "artifacts")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def evaluation(correct: int, offset: int = 0) -> str:
        run_id = tracker.start_run("eval")
        path = tmp_path / "samples.jsonl"
        path.write_text("".join(json.dumps({"id": p, "sample": i, "correct": bool(s)}) + "\n"
                                for p, s in scores(correct, offset).items() for i in range(2)))
        tracker.log_artifact(run_id, path)
        tracker.finish(run_id)
        return run_id

    def version(name: str, correct: int, parent_correct: int, offset: int = 0, **tags):
        run_id = tracker.start_run("stage")
        all_tags = {**OK_TAGS, "eval_key": "k", "eval_run_id": evaluation(correct, offset),
                    "parent_model": "base (stage b)", "parent_eval_run_id": evaluation(parent_correct), **tags}
        return tracker.version(name, tracker.register(run_id, model, name, all_tags))

    return tracker, version


def test_a_first_version_worse_than_its_parent_stays_candidate(registry):
    tracker, version = registry
    first = version("r1flow-r1-zero", correct=80, parent_correct=100)
    checks = review(tracker, first, GATE)
    assert not passed(checks) and tracker.champion("r1flow-r1-zero") is None
    assert tracker.version("r1flow-r1-zero", "1").tags["promotion"].startswith("kept as candidate: beats its parent")


def test_a_clear_paired_gain_is_promoted_and_plus_one_point_is_not(registry):
    tracker, version = registry
    first = version("r1flow-r1-sft", correct=140, parent_correct=100)
    assert passed(review(tracker, first, GATE))
    crown(tracker, first)
    assert tracker.champion("r1flow-r1-sft").version == "1"
    assert tracker.version("r1flow-r1-sft", "1").tags["promotion"].startswith("promoted to champion; beats its parent")

    # +0.01 over the champion on the same 200 prompts (and far above its parent): noise.
    noise = version("r1flow-r1-sft", correct=142, parent_correct=100, offset=1)
    checks = review(tracker, noise, GATE)
    assert [c.name for c in checks if not c.passed] == ["beats the champion"]
    assert tracker.champion("r1flow-r1-sft").version == "1"
    reason = tracker.version("r1flow-r1-sft", noise.version).tags["promotion"]
    assert reason.startswith("kept as candidate: beats the champion: +0.010 pass@1")
    assert "vs champion r1flow-r1-sft/1" in reason

    clear = version("r1flow-r1-sft", correct=175, parent_correct=100)
    assert passed(review(tracker, clear, GATE))


def _curve(name: str) -> list[dict]:
    return [json.loads(line) for line in (CURVES / name).read_text().splitlines()]


def test_logged_collapses_are_blocked_and_logged_convergence_passes():
    """Real curves of the default profile's GRPO (seed 0): collapses planted with a learning rate
    far too high (test pass@1 0.000 and 0.001), and two healthy runs (0.777 and 0.953) whose entropy
    was low, whose reward groups were mostly all right, and whose reward rose or stayed high."""
    default = PromotionConfig()
    for collapsed in ("grpo-collapse-lr2e-3.jsonl", "grpo-collapse-lr5e-4.jsonl"):
        problems = training_health(_curve(collapsed), default)
        assert len(problems) == 1 and problems[0].startswith("kl > 0.3 for 3 logged steps"), collapsed
    for healthy in ("grpo-healthy-r1_zero.jsonl", "grpo-healthy-r1_rl.jsonl"):
        assert training_health(_curve(healthy), default) == [], healthy
    # The gate as it was (entropy < 0.02, whatever the reward did) blocked the run's best model.
    before = PromotionConfig(min_entropy=0.02, min_reward_gain=10)
    assert training_health(_curve("grpo-healthy-r1_rl.jsonl"), before)[0].startswith("entropy < 0.02")


def test_training_health_flags_nan_loss_and_a_collapse_with_a_stalled_reward():
    healthy = [{"step": s, "loss": 0.5, "entropy": 0.8, "frac_reward_zero_std": 0.3, "reward": 0.5} for s in range(10)]
    assert training_health(healthy, GATE) == []
    assert training_health([*healthy, {"step": 10, "loss": math.nan}], GATE) == ["non-finite loss at step 10"]
    blip = healthy[:3] + [{**healthy[3], "entropy": 0.001}, {**healthy[4], "entropy": 0.001}] + healthy[5:]
    assert training_health(blip, GATE) == []  # two steps: below patience
    stalled = healthy[:5] + [{"step": s, "entropy": 0.001, "frac_reward_zero_std": 1.0, "reward": 0.5}
                             for s in range(5, 9)]
    problems = training_health(stalled, GATE)
    assert any(p.startswith("entropy < 0.02 for 3 logged steps") for p in problems)
    assert any(p.startswith("frac_reward_zero_std > 0.95") for p in problems)
    converged = healthy[:5] + [{"step": s, "entropy": 0.001, "frac_reward_zero_std": 1.0, "reward": 1.2}
                               for s in range(5, 9)]
    assert training_health(converged, GATE) == []  # every group right, the reward up: not a collapse
