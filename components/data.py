"""Data stage: prompt sets with verifiable answers, split, decontaminated, plus cold-start traces.

    build_datasets(DataConfig(), seed=0, out=Path("out"))

The default task is synthetic addition: a tiny model rarely adds two-digit numbers in one step,
but often does by working column by column inside ``<think>``, which is what RL should reinforce.
Benchmarks (GSM8K, MATH, Countdown) are imported from their public jsonl files instead.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

from components.benchmarks import decontaminate, import_benchmark, write_jsonl
from components.config import DataConfig

HELD_OUT_SHARE = 10  # one unordered operand pair in this many is reserved for evaluation


def held_out(a: int, b: int) -> bool:
    """Whether ``a + b`` (in either order) is reserved for the test split.

    A fixed partition of the problem space, so the test problems are never trained on: not in the
    train split, and not in the tiny base's pretraining corpus, which is built in another stage.
    """
    low, high = sorted((a, b))
    return zlib.crc32(f"{low}+{high}".encode()) % HELD_OUT_SHARE == 0


def addition_work(a: int, b: int) -> str:
    """Column-by-column addition as a scratchpad a tiny model can follow, one line per column.

    ``478 + 365`` → ``478+365: 8+5=13 3`` / ``47+36: 7+6+1=14 43`` / ``4+3: 4+3+1=8 843``. Each
    line restates what is left of the operands, so the digits to add sit right before ``+`` and
    ``:`` (a local look-up, not a count of lines), adds them with the carry, and prepends the new
    digit to the answer so far; the last column keeps its whole total, so the last line ends with
    the sum.
    """
    lines, carry, partial = [], 0, ""
    da, db = str(a), str(b)
    columns = max(len(da), len(db))
    da, db = da.zfill(columns), db.zfill(columns)
    for i in range(columns):
        rest_a, rest_b = da[: columns - i], db[: columns - i]
        x, y = int(rest_a[-1]), int(rest_b[-1])
        total = x + y + carry
        partial = (str(total) if i == columns - 1 else str(total % 10)) + partial
        lines.append(f"{rest_a}+{rest_b}: {x}+{y}{'+1' if carry else ''}={total} {partial}")
        carry = total // 10
    return "\n".join(lines)


def r1_completion(thought: str, answer: str) -> str:
    """A completion in R1's output format (an empty thought: a direct answer)."""
    return f"<think>\n{thought}\n</think>\n<answer>{answer}</answer>" if thought else \
        f"<think>\n</think>\n<answer>{answer}</answer>"


def addition_question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def _operand(rng: random.Random, cfg: DataConfig) -> int:
    digits = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def synthetic_addition(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test) addition prompts: test pairs come from the held-out partition, train from the rest."""
    rng = random.Random(seed)
    space = sum(9 * 10 ** (d - 1) for d in range(cfg.min_digits, cfg.max_digits + 1)) ** 2
    n_train = cfg.n_train + cfg.n_validation
    # Sampling without replacement stays quick while at most half of each partition is asked for.
    if cfg.n_test > space // HELD_OUT_SHARE // 2 or n_train > space // 2:
        raise ValueError(f"data: {n_train} train and {cfg.n_test} test prompts asked of a space of {space} pairs "
                         f"(1/{HELD_OUT_SHARE} held out for test); widen min_digits/max_digits")
    train: set[tuple[int, int]] = set()
    test: set[tuple[int, int]] = set()
    while len(train) < n_train or len(test) < cfg.n_test:
        a, b = _operand(rng, cfg), _operand(rng, cfg)
        split, wanted = (test, cfg.n_test) if held_out(a, b) else (train, n_train)
        if len(split) < wanted:
            split.add((a, b))
    ordered = sorted(train) + sorted(test)
    rng.shuffle(ordered)  # ids say nothing about the split
    ids = {pair: f"add-{i}" for i, pair in enumerate(ordered)}
    record = lambda a, b: {"id": ids[a, b], "task": "addition", "question": addition_question(a, b),
                           "answer": str(a + b), "a": a, "b": b}
    shuffled = lambda pairs: rng.sample(sorted(pairs), len(pairs))
    return [record(a, b) for a, b in shuffled(train)], [record(a, b) for a, b in shuffled(test)]


def cold_start_trace(record: dict) -> dict | None:
    """A readable long-CoT example for a record, or None when there is no worked solution."""
    if record["task"] == "addition":
        thought = addition_work(record["a"], record["b"])
    elif record.get("solution"):
        thought = record["solution"].strip()
    else:
        return None
    return {**record, "completion": r1_completion(thought, record["answer"])}


def build_datasets(cfg: DataConfig, seed: int, out: Path) -> dict:
    """Write train/validation/test prompts and cold-start traces as jsonl under ``out``."""
    if cfg.source == "synthetic":
        train, test = synthetic_addition(cfg, seed)
    else:
        train = import_benchmark(cfg.source, cfg.train_path, limit=None)
        test = import_benchmark(cfg.source, cfg.test_path, limit=cfg.n_test)
    train, removed = decontaminate(train, test, n=cfg.decontamination_ngram)
    random.Random(seed).shuffle(train)
    validation, train = train[: cfg.n_validation], train[cfg.n_validation :][: cfg.n_train]
    traces = [t for t in map(cold_start_trace, train) if t is not None][: cfg.cold_start_size]
    if not traces:
        raise ValueError(f"data: source {cfg.source!r} has no worked solutions for cold-start traces")
    files = {"train": train, "validation": validation, "test": test, "cold_start": traces}
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(out / f"{name}.jsonl", records)
    report = {"source": cfg.source, "decontaminated": removed, **{name: len(r) for name, r in files.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
