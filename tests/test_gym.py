"""reasoning-gym as a data source (``components.gym``): held-out splits, each item graded by its own
task's verifier, and a problem space too small to hold out named."""

import json
import re

import pytest

from components.data import build_datasets, no_traces
from components.gym import gym_splits, score
from components.jsonl import load_jsonl
from components.rewards import accuracy_reward, gold_parses
from components.sections import DataConfig
from components.validate import validate_records

SUMS = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}}


def test_splits_hold_out_whole_problems_and_the_test_set_is_stable():
    train, validation, test, dropped = gym_splits(SUMS, seed=5, n_train=300, n_validation=20, n_test=50)
    assert (len(train), len(validation), len(test)) == (300, 20, 50)
    questions = [r["question"] for r in train + validation + test]
    assert len(set(questions)) == len(questions)  # no problem in two splits, none twice
    assert dropped > 0  # draws of held-out problems were skipped for training (1-digit sums recur)
    # test items are drawn first: asking for more training prompts changes no test problem
    assert gym_splits(SUMS, seed=5, n_train=600, n_validation=20, n_test=50)[2] == test
    assert gym_splits(SUMS, seed=6, n_train=300, n_validation=20, n_test=50)[2] != test
    # tasks share each split evenly
    both = {**SUMS, "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    mixed = gym_splits(both, seed=5, n_train=10, n_validation=0, n_test=5)[2]
    assert sorted(r["gym_task"] for r in mixed) == ["basic_arithmetic"] * 2 + ["chain_sum"] * 3
    # fewer prompts than tasks: a task may get none in a split
    assert [r["gym_task"] for r in gym_splits(both, seed=5, n_train=1, n_validation=0, n_test=1)[2]] == ["chain_sum"]


def test_a_problem_space_too_small_to_hold_out_is_named(tmp_path):
    tiny = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}  # ~200 problems
    too_few = r"data.tasks.chain_sum: only \d+ distinct problems .* widen the task's config"
    with pytest.raises(ValueError, match=too_few):
        gym_splits(tiny, seed=0, n_train=400, n_validation=0, n_test=200)
    with pytest.raises(ValueError, match="data.tasks.chain_sum: reasoning-gym refused the task or its config"):
        gym_splits({"chain_sum": {"min_terms": 3, "max_terms": 2}}, seed=0, n_train=1, n_validation=0, n_test=1)
    with pytest.raises(ValueError, match="needs tasks"):
        DataConfig(source="reasoning_gym")
    gcd = DataConfig(source="reasoning_gym", tasks={"gcd": {}}, n_train=8, n_validation=0, n_test=4)
    assert build_datasets(gcd, 0, tmp_path)["cold_start"] == 0  # R1-Zero needs none; the cold start is refused
    assert re.match(r"data.tasks \(gcd\): no item states its expression.*add a task", no_traces(gcd))


def test_each_item_is_graded_by_its_own_tasks_verifier(tmp_path):
    report = build_datasets(DataConfig(source="reasoning_gym", tasks=SUMS, n_train=40, n_validation=4, n_test=8,
                                       cold_start_size=4), seed=3, out=tmp_path)
    assert report["train"] == 40 and report["cold_start"] == 4 and report["decontaminated"] >= 0
    records = load_jsonl(tmp_path / "test.jsonl")
    record = records[0]
    gold, entry = record["answer"], record["entry"]
    assert score(gold, entry) == 1.0 and score(str(int(gold) + 1), entry) == 0.0
    assert gold_parses(gold, "reasoning_gym", entry) and not gold_parses(gold, "reasoning_gym", None)
    right, wrong = f"<think>ok</think><answer>{gold}</answer>", f"<think>ok</think><answer>{int(gold) + 1}</answer>"
    assert accuracy_reward([right, wrong, f"{gold}"], answer=[gold] * 3, task=["reasoning_gym"] * 3,
                           entry=[entry] * 3) == [1.0, 0.0, 0.0]
    # the data stage's suites pass on every split, traces included
    for name, kind in (("train", "prompts"), ("validation", "prompts"), ("test", "eval"), ("cold_start", "sft")):
        assert validate_records(load_jsonl(tmp_path / f"{name}.jsonl"), kind, name)["success"]
    broken = [{**r, "entry": json.dumps({**json.loads(r["entry"]), "answer": "x"})} for r in records]
    with pytest.raises(ValueError, match="answer_parseable"):  # a gold its own verifier rejects
        validate_records(broken, "eval", "test")
