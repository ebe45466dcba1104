"""reasoning-gym: procedurally generated tasks, each with its own exact verifier.

    train, validation, test, dropped = gym_splits({"chain_sum": {"min_terms": 2}}, seed=7, n_train=800, ...)
    score("9", entry)                    # the item's task's own score_answer, 1.0 when right

reasoning-gym generates item ``i`` of a dataset seeded ``s`` from ``Random(s + i)``, so one dataset
read in order gives every split its own seeds: test items come first (their set does not change
when ``n_train`` does), then validation, then train. Splits hold whole problems: an item whose
question an earlier split already holds is skipped (decontamination by exact question: n-grams
would match every pair, the tasks' wording being shared), so no test question is trained on.

A record keeps the generated item as ``entry`` (JSON text: question, answer, metadata), since a
task's ``score_answer`` reads the metadata; datasets columns stay one type across tasks that way.
"""

from __future__ import annotations

import functools
import json
from typing import Any

TASK = "reasoning_gym"  # the records' ``task``; the generator's own name is ``gym_task``
# Draws allowed per wanted item: a space too small to hold the splits fails fast, not forever.
DRAWS_PER_ITEM = 20


def _dataset(name: str, config: dict[str, Any], seed: int, size: int):
    import reasoning_gym  # imported here: a second or two, and only gym profiles need it

    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **config)
    except (KeyError, TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"data.tasks.{name}: reasoning-gym refused the task or its config ({error}); "
                         "see reasoning_gym's config class for the task") from None


@functools.cache
def _scorer(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


def score(prediction: str, entry: str | dict) -> float:
    """The verdict of the item's own task on a prediction, 0.0 to 1.0."""
    item = json.loads(entry) if isinstance(entry, str) else entry
    return float(_scorer(item["metadata"]["source_dataset"])(prediction, item))


def _record(name: str, item: dict, seed: int) -> dict:
    record = {"id": f"{name}-{seed}", "task": TASK, "gym_task": name, "question": item["question"].strip(),
              "answer": str(item["answer"]).strip(), "entry": json.dumps(item, sort_keys=True, default=str)}
    expression = item.get("metadata", {}).get("expression")
    if expression:  # arithmetic tasks state their expression: a worked line for cold-start traces
        record["solution"] = f"{expression} = {record['answer']}"
    return record


def task_splits(name: str, config: dict[str, Any], seed: int, sizes: list[int]) -> tuple[list[list[dict]], int]:
    """Splits of distinct problems of one task, in order (test first), from consecutive item seeds;
    and how many draws were dropped because an earlier split (a held-out one) holds the question."""
    wanted = sum(sizes)
    if not wanted:  # fewer prompts than tasks: this one gets none (reasoning-gym refuses a size of 0)
        return [[] for _ in sizes], 0
    dataset = _dataset(name, config, seed, wanted * DRAWS_PER_ITEM)
    split_of: dict[str, int] = {}
    splits: list[list[dict]] = [[] for _ in sizes]
    current, index, held_out = 0, 0, 0
    while current < len(sizes):
        if len(splits[current]) == sizes[current]:
            current += 1
            continue
        if index == len(dataset):
            made = sum(map(len, splits))
            raise ValueError(f"data.tasks.{name}: only {made} distinct problems in {index} draws, {wanted} "
                             "wanted; widen the task's config (more terms or digits) or ask for fewer prompts")
        item = dataset[index]
        if item["question"] not in split_of:
            split_of[item["question"]] = current
            splits[current].append(_record(name, item, seed + index))
        elif split_of[item["question"]] < current:
            held_out += 1
        index += 1
    return splits, held_out


def gym_splits(tasks: dict[str, dict[str, Any]], seed: int, n_train: int, n_validation: int,
               n_test: int) -> tuple[list[dict], list[dict], list[dict], int]:
    """(train, validation, test, draws dropped as held-out problems) over the tasks, each split
    shared out evenly between them."""
    def share(n: int, i: int) -> int:
        return n // len(tasks) + (i < n % len(tasks))

    train, validation, test, dropped = [], [], [], 0
    for i, (name, config) in enumerate(tasks.items()):
        (t, v, tr), held_out = task_splits(name, config or {}, seed, [share(n_test, i), share(n_validation, i),
                                                                        share(n_train, i)])
        test += t
        validation += v
        train += tr
        dropped += held_out
    return train, validation, test, dropped
