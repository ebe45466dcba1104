"""Data stage: prompt sets with verifiable answers, split, decontaminated, plus cold-start traces.

    python -m components.data --spec SPEC.json
    build_datasets(DataConfig(), seed=0, out=Path("out"))

The default task is synthetic addition: a tiny model rarely adds two-digit numbers in one step,
but often does by working column by column inside ``<think>``, which is what RL should reinforce.
Benchmarks (GSM8K, MATH, Countdown) and any file ``datasets`` reads are imported instead
(``components.importer``), or reasoning-gym generates the tasks (``components.gym``), each
graded by its own verifier.
"""

from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path

from components.addition import (
    HELD_OUT_SHARE,
    addition_question,
    addition_work,
    held_out,
    r1_completion,
)
from components.gym import gym_splits
from components.importer import PRESETS, decontaminate, import_file
from components.jsonl import write_jsonl
from components.sections import DataConfig
from components.stage_io import StageSpec, main, write_result
from components.store import data_objects, fetch_objects, objects_key


def _operand(rng: random.Random, cfg: DataConfig) -> int:
    digits = rng.randint(cfg.min_digits, cfg.max_digits)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def synthetic_addition(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) addition prompts: train pairs come from the open partition;
    validation and test (disjoint) from the held-out one, so the held-out curve during RL and the
    final evaluation both measure problems no stage ever trained on."""
    rng = random.Random(seed)
    space = sum(9 * 10 ** (d - 1) for d in range(cfg.min_digits, cfg.max_digits + 1)) ** 2
    n_held = cfg.n_test + cfg.n_validation
    # Sampling without replacement stays quick while at most half of each partition is asked for.
    if n_held > space // HELD_OUT_SHARE // 2 or cfg.n_train > space // 2:
        raise ValueError(f"data: {cfg.n_train} train and {n_held} validation + test prompts asked of a space of "
                         f"{space} pairs (1/{HELD_OUT_SHARE} held out); widen min_digits/max_digits")
    train: set[tuple[int, int]] = set()
    held: dict[tuple[int, int], None] = {}  # insertion-ordered: the first n_test are the test split
    while len(train) < cfg.n_train or len(held) < n_held:
        a, b = _operand(rng, cfg), _operand(rng, cfg)
        if held_out(a, b):
            if len(held) < n_held and (b, a) not in held:
                held[a, b] = None
        elif len(train) < cfg.n_train and (b, a) not in train:
            train.add((a, b))
    held_pairs = list(held)
    test, validation = set(held_pairs[: cfg.n_test]), set(held_pairs[cfg.n_test :])
    ordered = sorted(train) + sorted(validation) + sorted(test)
    rng.shuffle(ordered)  # ids say nothing about the split
    ids = {pair: f"add-{i}" for i, pair in enumerate(ordered)}
    record = lambda a, b: {"id": ids[a, b], "task": "addition", "question": addition_question(a, b),
                           "answer": str(a + b), "a": a, "b": b}
    shuffled = lambda pairs: [record(a, b) for a, b in rng.sample(sorted(pairs), len(pairs))]
    return shuffled(train), shuffled(validation), shuffled(test)


def carries(record: dict) -> bool:
    """Whether an addition's column work carries into a later column (a line adds ``+1``)."""
    return re.search(r": \d\+\d\+1=", addition_work(record["a"], record["b"])) is not None


def cold_start_trace(record: dict) -> dict | None:
    """A readable long-CoT example for a record, or None when there is no worked solution."""
    if record["task"] == "addition":
        thought = addition_work(record["a"], record["b"])
    elif record.get("solution"):
        thought = record["solution"].strip()
    else:
        return None
    return {**record, "completion": r1_completion(thought, record["answer"])}


def data_seed(cfg: DataConfig, seed: int) -> int:
    """The generators' and shuffle's seed: the data section's own, else the profile's."""
    return seed if cfg.seed is None else cfg.seed


def no_traces(cfg: DataConfig) -> str:
    """Why a data section gave no cold-start traces, and what to change."""
    where = (f"data.tasks ({', '.join(cfg.tasks)}): no item states its expression" if cfg.source == "reasoning_gym"
             else f"data.source {cfg.source!r}: no training record has a worked solution")
    return (f"{where}, so there are no cold-start traces; add a task or file that has them "
            "(reasoning-gym: chain_sum, basic_arithmetic, products), or run R1-Zero alone (stages: [eval_r1_zero])")


def read_source(path: str, what: str, mapping: dict, limit: int | None, planned: str | None) -> list[dict]:
    """A file source's records: a local file, or what an ``s3://`` URL names, its objects read as
    one dataset in name order and checked against the listing the stage's key was made from."""
    if not path.startswith("s3://"):
        return import_file(Path(path), **mapping, limit=limit)
    objects = data_objects(path, what)
    if planned is not None and objects_key(objects) != planned:
        raise ValueError(f"{what} {path}: objects changed there after the run computed its keys; run again")
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for obj, file in zip(objects, fetch_objects(objects, Path(tmp)), strict=True):
            if limit is not None and len(records) >= limit:
                break
            try:  # the importer names the file it read: name the object instead
                records += import_file(file, **mapping, limit=None if limit is None else limit - len(records))
            except (ValueError, FileNotFoundError) as error:
                raise ValueError(str(error).replace(str(file), obj["url"])) from None
    return records


def build_datasets(cfg: DataConfig, seed: int, out: Path, planned: dict[str, str] | None = None) -> dict:
    """Write train/validation/test prompts and cold-start traces as jsonl under ``out``; returns
    what was written (counts, and the training prompts decontamination removed). ``planned``: the
    content keys of the files the run planned to read (a bucket's listing may change meanwhile)."""
    planned = planned or {}
    seed = data_seed(cfg, seed)
    if cfg.source == "synthetic":
        train, validation, test = synthetic_addition(cfg, seed)
        removed = 0  # the partition keeps test problems out of train, in either operand order
    elif cfg.source == "reasoning_gym":
        train, validation, test, removed = gym_splits(cfg.tasks, seed, cfg.n_train, cfg.n_validation, cfg.n_test)
    else:  # a benchmark's own format (gsm8k, math, countdown) or any file as the profile maps it
        mapping = PRESETS.get(cfg.source) or {"task": cfg.task, "columns": cfg.columns,
                                              "answer_format": cfg.answer_format}
        train = read_source(cfg.train_path, "data.train_path", mapping, None, planned.get("train"))
        test = read_source(cfg.test_path, "data.test_path", mapping, cfg.n_test, planned.get("test"))
        train, removed = decontaminate(train, test, n=cfg.decontamination_ngram)
        if not train:
            raise ValueError(f"data: every prompt of {cfg.train_path} overlaps {cfg.test_path} "
                             "(decontamination removed them all); train on other problems")
        random.Random(seed).shuffle(train)
        validation, train = train[: cfg.n_validation], train[cfg.n_validation :][: cfg.n_train]
    # none where no record has a worked solution: R1-Zero needs none, the cold start refuses to run
    narrow = cfg.source == "synthetic" and not cfg.cold_start_carries
    traces = [t for t in map(cold_start_trace, train) if t is not None and not (narrow and carries(t))]
    traces = traces[: cfg.cold_start_size]
    files = {"train": train, "validation": validation, "test": test, "cold_start": traces}
    out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_jsonl(out / f"{name}.jsonl", records)
    return {"source": cfg.source, "decontaminated": removed, **{name: len(r) for name, r in files.items()}}


def run(spec: StageSpec) -> dict:
    report = build_datasets(DataConfig(**spec.config), spec.seed, spec.output, spec.input_keys)
    write_result(spec.output, report)
    return report


if __name__ == "__main__":
    main(run)
