"""Promotion gates: a model becomes champion only if it beats the champion and is healthy."""

import math

from components.config import PromotionConfig
from components.promotion import gate_checks, training_health, verdict

GATE = PromotionConfig(margin=0.02, min_format_rate=0.9, patience=3)
GOOD = {"pass_at_1": "0.60", "format_rate": "0.98", "eval_key": "k", "data_validation": "passed",
        "training_health": "ok"}
CHAMPION = {**GOOD, "pass_at_1": "0.50"}


def failed(candidate, champion=CHAMPION):
    return {c.name for c in gate_checks(candidate, champion, GATE) if not c.passed}


def test_a_better_healthy_model_passes_every_gate():
    assert failed(GOOD) == set()
    assert failed(GOOD, champion=None) == set()  # the first model of a name
    assert verdict(gate_checks(GOOD, CHAMPION, GATE)) == "promoted to champion"


def test_a_regressed_or_unhealthy_model_stays_candidate_with_the_reason():
    assert failed({**GOOD, "pass_at_1": "0.45"}) == {"primary metric"}  # worse
    assert failed({**GOOD, "pass_at_1": "0.51"}) == {"primary metric"}  # better, but within the margin
    assert failed({**GOOD, "format_rate": "0.5"}) == {"format rate"}
    assert failed({**GOOD, "data_validation": "failed"}) == {"data validation"}
    assert failed({**GOOD, "training_health": "non-finite loss at step 3"}) == {"training health"}
    assert failed({**GOOD, "eval_key": "other"}) == {"primary metric"}  # scores not comparable
    older = {k: v for k, v in GOOD.items() if k not in ("format_rate", "training_health")}
    assert failed(older) == {"format rate", "training health"}  # a version from before the gates
    reason = verdict(gate_checks({**GOOD, "pass_at_1": "0.45"}, CHAMPION, GATE))
    assert reason.startswith("kept as candidate: primary metric: pass@1 0.450 vs champion 0.500")


def test_training_health_flags_nan_loss_and_sustained_collapse_only():
    healthy = [{"step": s, "loss": 0.5, "entropy": 0.8, "frac_reward_zero_std": 0.3} for s in range(10)]
    assert training_health(healthy, GATE) == []
    assert training_health([*healthy, {"step": 10, "loss": math.nan}], GATE) == ["non-finite loss at step 10"]
    blip = healthy[:3] + [{"step": 3, "entropy": 0.001}, {"step": 4, "entropy": 0.001}] + healthy[5:]
    assert training_health(blip, GATE) == []  # two steps: below patience
    collapsed = healthy[:5] + [{"step": s, "entropy": 0.001, "frac_reward_zero_std": 1.0} for s in range(5, 9)]
    problems = training_health(collapsed, GATE)
    assert any(p.startswith("entropy < 0.02 for 3 logged steps") for p in problems)
    assert any(p.startswith("frac_reward_zero_std > 0.95") for p in problems)
