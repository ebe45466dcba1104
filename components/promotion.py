"""Promotion gates: when a registered model may take the ``champion`` alias.

    checks = gate_checks(candidate, champion, PromotionConfig())
    promote = all(c.passed for c in checks)

A candidate is described by what its registered version records (the tags ``tracking.register``
writes): its score, format rate, eval key, data validation and training health. Pure functions,
so the pipeline and ``r1flow promote`` show a person exactly the same checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.config import PromotionConfig

# Collapse signals TRL's GRPOTrainer logs, and which side of the threshold is bad.
COLLAPSE_SIGNALS = {
    "frac_reward_zero_std": ("max_zero_std_share", ">"),  # groups with no reward spread: no learning signal
    "completions/clipped_ratio": ("max_clipped_ratio", ">"),  # completions cut at the length limit
    "entropy": ("min_entropy", "<"),  # the policy stopped exploring
}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def training_health(rows: list[dict], gate: PromotionConfig) -> list[str]:
    """Problems in a stage's logged training curve: a non-finite loss, or a collapse signal
    beyond its threshold for ``gate.patience`` logged steps in a row. Empty: healthy."""
    problems = []
    broken = [row["step"] for row in rows for key in ("loss", "grad_norm")
              if isinstance(row.get(key), float) and not math.isfinite(row[key])]
    if broken:
        problems.append(f"non-finite loss at step {broken[0]}")
    for signal, (field, side) in COLLAPSE_SIGNALS.items():
        limit, streak = getattr(gate, field), 0
        for row in rows:
            if signal not in row:
                continue
            beyond = row[signal] > limit if side == ">" else row[signal] < limit
            streak = streak + 1 if beyond else 0
            if streak >= gate.patience:
                problems.append(f"{signal} {side} {limit} for {gate.patience} logged steps (to step {row['step']})")
                break
    return problems


def gate_checks(candidate: dict, champion: dict | None, gate: PromotionConfig) -> list[Check]:
    """The checks a candidate must pass to become champion.

    ``candidate`` and ``champion`` are version tags: ``pass_at_1``, ``format_rate``, ``eval_key``,
    ``data_validation`` and ``training_health`` (``ok`` or the problems found).
    """
    score, fmt = _number(candidate, "pass_at_1"), _number(candidate, "format_rate")
    best = _number(champion, "pass_at_1") if champion is not None else None
    if champion is None:
        beats = Check("primary metric", score is not None, f"pass@1 {_shown(score)}; no champion yet")
    elif champion.get("eval_key") != candidate.get("eval_key") or best is None or score is None:
        beats = Check("primary metric", False, "the champion was evaluated under another protocol or test set; "
                      "compare by hand (r1flow promote)")
    else:
        beats = Check("primary metric", score >= best + gate.margin,
                      f"pass@1 {score:.3f} vs champion {best:.3f} (needs +{gate.margin:.3f})")
    health = candidate.get("training_health", "")
    return [
        beats,
        Check("format rate", fmt is not None and fmt >= gate.min_format_rate,
              f"{_shown(fmt)} (needs {gate.min_format_rate:.3f})"),
        Check("data validation", candidate.get("data_validation") == "passed",
              f"Great Expectations: {candidate.get('data_validation', 'not recorded')}"),
        Check("training health", health == "ok", health or "not recorded"),
    ]


def _number(tags: dict, key: str) -> float | None:
    """A score from version tags; None when the version predates the tag (a check then fails)."""
    return float(tags[key]) if key in tags else None


def _shown(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.3f}"


def verdict(checks: list[Check]) -> str:
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    return "promoted to champion" if not failed else "kept as candidate: " + "; ".join(failed)
