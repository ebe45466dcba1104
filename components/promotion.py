"""Promotion: when a registered model version may take the ``champion`` alias, and moving it.

    checks = review(tracker, version, PromotionConfig())   # tags the version with the verdict
    if passed(checks): crown(tracker, version)

A version takes ``champion`` only with evidence: on the same evaluation (protocol and test set),
it beats its parent in the lineage and the current champion by a paired bootstrap over the
per-prompt scores both evaluations kept (a difference inside the noise of the test set is not a
promotion), its samples are well-formed, its data passed validation, and its training was
healthy. The pipeline's ``register`` and ``r1flow promote`` both decide here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from statistics import mean

import numpy as np

from components.sections import PromotionConfig
from components.tracking import NotFound, Tracker, VersionRecord

# Collapse signals TRL's GRPOTrainer logs, and which side of the threshold is bad.
COLLAPSE_SIGNALS = {
    "kl": ("max_kl", ">"),  # the policy ran far from where it started
    "frac_reward_zero_std": ("max_zero_std_share", ">"),  # groups with no reward spread: no learning signal
    "completions/clipped_ratio": ("max_clipped_ratio", ">"),  # completions cut at the length limit
    "entropy": ("min_entropy", "<"),  # the policy stopped exploring
}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Paired:
    """Candidate minus reference pass@1 on the prompts both evaluated, with its bootstrap interval."""

    difference: float
    low: float
    high: float
    prompts: int
    level: float

    @property
    def significant_gain(self) -> bool:
        return self.low > 0

    def __str__(self) -> str:
        return (f"{self.difference:+.3f} pass@1, {self.level:.0%} interval [{self.low:+.3f}, {self.high:+.3f}] "
                f"(paired bootstrap over {self.prompts} prompts)")


def per_prompt(samples: list[dict]) -> dict[str, float]:
    """Each prompt's mean correctness over its k samples, from an evaluation's ``samples.jsonl``."""
    by_prompt: dict[str, list[bool]] = {}
    for row in samples:
        by_prompt.setdefault(str(row["id"]), []).append(bool(row["correct"]))
    return {prompt: mean(values) for prompt, values in by_prompt.items()}


def paired_bootstrap(candidate: dict[str, float], reference: dict[str, float], gate: PromotionConfig) -> Paired:
    """Resample prompts with replacement; the interval is the percentile interval of the mean
    paired difference. Seeded, so the same evaluations always give the same verdict."""
    prompts = sorted(candidate)
    diffs = np.array([candidate[p] - reference[p] for p in prompts])
    rng = np.random.default_rng(0)
    means = diffs[rng.integers(0, len(diffs), size=(gate.resamples, len(diffs)))].mean(axis=1)
    alpha = gate.significance
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Paired(float(diffs.mean()), float(low), float(high), len(prompts), 1 - alpha)


def training_health(rows: list[dict], gate: PromotionConfig) -> list[str]:
    """Problems in a stage's logged training curve; empty: healthy.

    - a non-finite loss or gradient norm, at any step;
    - a reward never above 0 at any logged step: GRPO had no advantage to learn from, so any
      evaluation gain is noise (and with no reward spread the collapse signals stay quiet);
    - a collapse signal beyond its threshold for ``gate.patience`` logged steps in a row *while
      the reward did not rise*: the streak's mean reward is less than ``gate.min_reward_gain``
      above the first ``patience`` logged steps'. A policy that converged (entropy near zero,
      every group right) with a rising reward is not a collapse; one that stopped exploring with
      its reward stalled or falling is.
    """
    problems = []
    broken = [row["step"] for row in rows for key in ("loss", "grad_norm")
              if isinstance(row.get(key), float) and not math.isfinite(row[key])]
    if broken:
        problems.append(f"non-finite loss at step {broken[0]}")
    rewards = [row["reward"] for row in rows if isinstance(row.get("reward"), (int, float))]
    if rewards and max(rewards) <= 0:
        problems.append(f"reward never above 0 in {len(rewards)} logged steps: no learning signal")
    start = mean(rewards[: gate.patience]) if rewards else None
    for signal, (field, side) in COLLAPSE_SIGNALS.items():
        limit, streak = getattr(gate, field), []
        for row in rows:
            if signal not in row:
                continue
            beyond = row[signal] > limit if side == ">" else row[signal] < limit
            streak = [*streak, row] if beyond else []
            if len(streak) < gate.patience:
                continue
            recent = [r["reward"] for r in streak[-gate.patience:] if "reward" in r]
            if start is not None and recent and mean(recent) >= start + gate.min_reward_gain:
                continue  # converging: the reward rose while the signal held
            trend = f"reward {mean(recent):.3f} vs {start:.3f} at the start" if recent and start is not None else \
                "no reward logged"
            problems.append(f"{signal} {side} {limit} for {gate.patience} logged steps (to step {row['step']}) "
                            f"with the reward stalled or falling ({trend})")
            break
    return problems


@dataclass(frozen=True)
class Evidence:
    """A model's evaluation as its registered version (or its parent's record) keeps it."""

    label: str  # how the verdict names it: a version ``NAME/N``, or ``base (stage KEY)``
    eval_key: str | None
    scores: dict[str, float]  # per-prompt pass@1


def evidence(tracker: Tracker, label: str, eval_run_id: str | None, eval_key: str | None) -> Evidence | None:
    """Per-prompt scores from an evaluation run's ``samples.jsonl``; None when none was kept."""
    if not eval_run_id:
        return None
    try:
        text = tracker.read_artifact(eval_run_id, "samples.jsonl")
    except NotFound:
        return None
    return Evidence(label, eval_key, per_prompt([json.loads(line) for line in text.splitlines() if line.strip()]))


def versus(candidate: Evidence | None, reference: Evidence | None, what: str, gate: PromotionConfig) -> Check:
    """``beats WHAT``: a significant paired gain on the same evaluation, or the reason there is none."""
    name = f"beats {what}"
    if candidate is None or reference is None or not reference.scores:
        missing = "the candidate" if candidate is None else reference.label if reference else what
        return Check(name, False, f"no per-prompt evaluation of {missing} kept; compare by hand")
    if candidate.eval_key != reference.eval_key or set(candidate.scores) != set(reference.scores):
        return Check(name, False, f"{reference.label} was evaluated under another protocol or test set")
    paired = paired_bootstrap(candidate.scores, reference.scores, gate)
    return Check(name, paired.significant_gain, f"{paired} vs {reference.label}")


def gate_checks(tags: dict[str, str], candidate: Evidence | None, parent: Evidence | None,
                champion: Evidence | None, gate: PromotionConfig) -> list[Check]:
    """Every check a version must pass to become champion; ``tags`` are the version's own."""
    fmt = float(tags["format_rate"]) if "format_rate" in tags else None
    health = tags.get("training_health", "")
    checks = [versus(candidate, parent, "its parent", gate)]
    if champion is not None:
        checks.append(versus(candidate, champion, "the champion", gate))
    return [
        *checks,
        Check("format rate", fmt is not None and fmt >= gate.min_format_rate,
              f"{'not recorded' if fmt is None else f'{fmt:.3f}'} (needs {gate.min_format_rate:.3f})"),
        Check("data validation", tags.get("data_validation") == "passed",
              f"Great Expectations: {tags.get('data_validation', 'not recorded')}"),
        Check("training health", health == "ok", health or "not recorded"),
    ]


def lineage(*, stage_key: str, code_version: str, config_hash: str, commit: dict, data_hash: str, data_key: str,
            eval_run_id: str, eval_key: str, metrics: dict, parent: str, parent_eval_run_id: str | None,
            health: list[str]) -> dict[str, str]:
    """The tags a registered version carries: where it came from (stage key, code, config, commit,
    data: its DVC version and the data stage's key, parent), how it scored and where its evaluation
    lives, and whether it trained healthily."""
    return {
        "stage_key": stage_key, "code_version": code_version, "config_hash": config_hash, **commit,
        "data_hash": data_hash, "data_key": data_key, "eval_run_id": eval_run_id, "eval_key": eval_key,
        "parent_model": parent, "parent_eval_run_id": parent_eval_run_id or "",
        "pass_at_1": metrics["pass@1"], "format_rate": metrics["format_rate"],
        "data_validation": "passed",  # every suite passed, or the flow would have stopped before
        "training_health": "; ".join(health) or "ok",
    }


def passed(checks: list[Check]) -> bool:
    return all(c.passed for c in checks)


def verdict(checks: list[Check]) -> str:
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    gains = [f"{c.name}: {c.detail}" for c in checks if c.passed and c.name.startswith("beats")]
    return ("promoted to champion; " + "; ".join(gains)) if not failed else "kept as candidate: " + "; ".join(failed)


def review(tracker: Tracker, version: VersionRecord, gate: PromotionConfig) -> list[Check]:
    """The checks for a registered version against its parent and the champion of its name, as
    its tags record them (``eval_run_id``, ``parent_eval_run_id``, …); tags it with the verdict."""
    tags = version.tags
    champion = tracker.champion(version.name)
    candidate = evidence(tracker, version.ref, tags.get("eval_run_id"), tags.get("eval_key"))
    parent = evidence(tracker, tags.get("parent_model", "its parent"), tags.get("parent_eval_run_id"),
                      tags.get("eval_key"))
    best = None
    if champion is not None and champion.version != version.version:
        best = evidence(tracker, f"champion {champion.ref}", champion.tags.get("eval_run_id"),
                        champion.tags.get("eval_key")) or Evidence(f"champion {champion.ref}", None, {})
    checks = gate_checks(tags, candidate, parent, best, gate)
    tracker.tag_version(version.name, version.version, {"promotion": verdict(checks)})
    return checks


def crown(tracker: Tracker, version: VersionRecord, by_hand: str | None = None) -> None:
    """Move ``champion`` to a version (``by_hand``: why a person overrode the checks)."""
    tracker.set_alias(version.name, "champion", version.version)
    if by_hand:
        tracker.tag_version(version.name, version.version, {"promotion": f"promoted by hand; {by_hand}"})


def history(tracker: Tracker, name: str) -> list[dict[str, str]]:
    """A registered model's versions, oldest first, as the nights made them: the run that trained
    each, its data version, its parent, its pass@1, the gate's verdict, and whether it is champion."""
    champion = tracker.champion(name)
    rows = []
    for version in tracker.versions(name):
        tags, stage_run = version.tags, tracker.run(version.run_id)
        rows.append({"version": version.version, "night": stage_run.tags.get("mlflow.parentRunId", version.run_id),
                     "data": tags.get("data_hash", ""), "parent": tags.get("parent_model", ""),
                     "pass@1": tags.get("pass_at_1", ""), "verdict": tags.get("promotion", "not reviewed"),
                     "champion": "yes" if champion and champion.version == version.version else ""})
    return rows
