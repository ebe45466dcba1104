"""The whole micro pipeline on prompts from a parquet file the test writes: any dataset file a
profile maps (``data.source: file``) feeds every stage, as the synthetic source does."""

from pathlib import Path

import pytest
from helpers import EVALS, check_runs

from components.addition import addition_work
from components.config import load_profile
from components.data import synthetic_addition
from components.jsonl import load_jsonl

MICRO = str(Path(__file__).parents[1] / "configs" / "micro.yaml")

pytestmark = pytest.mark.slow


def _additions(path: Path, records: list[dict]) -> Path:
    """Additions as a table with a question, an answer and a worked-solution column."""
    import pandas as pd

    pd.DataFrame({"question": [r["question"] for r in records], "answer": [int(r["answer"]) for r in records],
                  "work": [addition_work(r["a"], r["b"]) for r in records]}).to_parquet(path)
    return path


def test_the_micro_pipeline_trains_and_evaluates_on_a_parquet_file(tmp_path):
    from flows.pipeline import r1_pipeline

    # The micro profile's own problems, written out: a micro model learns these (1- and 2-digit
    # operands; on 2-digit ones alone rejection sampling kept none of 800 samples). The test file
    # holds the held-out ones; the train file the 200 + 8 the profile splits into train and validation.
    train, validation, test = synthetic_addition(load_profile(MICRO).data, seed=0)
    train_file = _additions(tmp_path / "train.parquet", train + validation)
    test_file = _additions(tmp_path / "test.parquet", test)
    root = tmp_path / "project"
    summary = r1_pipeline(config=MICRO, root=str(root), overrides=[
        "runtime.device=cpu", "data.source=file", "data.task=gsm8k", "data.answer_format=plain",
        "data.columns={question: question, answer: answer, solution: work}",
        f"data.train_path={train_file}", f"data.test_path={test_file}"])

    check_runs(summary)  # every stage and every model's evaluation ran and finished in MLflow
    prompts = root / "data" / "prompts"
    assert [r["id"] for r in load_jsonl(prompts / "test.jsonl")] == [f"gsm8k-test-{i}" for i in range(24)]
    assert len(load_jsonl(prompts / "train.jsonl")) == 200 and len(load_jsonl(root / "data" / "traces" /
                                                                               "cold_start.jsonl")) == 64
    for name in EVALS:  # each evaluation graded the file's test prompts
        (samples,) = (root / ".r1flow" / "stages" / name).glob("*/samples.jsonl")
        assert {s["id"] for s in load_jsonl(samples)} == {f"gsm8k-test-{i}" for i in range(24)}, name


def test_the_micro_pipeline_trains_and_evaluates_on_a_reasoning_gym_task(tmp_path):
    from flows.pipeline import r1_pipeline

    root = tmp_path / "project"
    summary = r1_pipeline(config=MICRO, root=str(root), overrides=[
        "runtime.device=cpu", "data.source=reasoning_gym", "data.n_train=120",
        "data.tasks={chain_sum: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}"])

    check_runs(summary)
    prompts = root / "data" / "prompts"
    test = load_jsonl(prompts / "test.jsonl")
    assert len(test) == 24 and {r["gym_task"] for r in test} == {"chain_sum"}
    trained = {r["question"] for r in load_jsonl(prompts / "train.jsonl") + load_jsonl(prompts / "validation.jsonl")}
    assert trained.isdisjoint(r["question"] for r in test)  # whole problems held out
    for name in EVALS:  # each evaluation graded the generated test problems by the task's verifier
        (samples,) = (root / ".r1flow" / "stages" / name).glob("*/samples.jsonl")
        assert {s["id"] for s in load_jsonl(samples)} == {r["id"] for r in test}, name
