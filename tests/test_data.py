import json
import re

import pytest

from components.addition import addition_question, addition_work, held_out
from components.data import build_datasets, carries, synthetic_addition
from components.rewards import format_reward
from components.sections import DataConfig


def test_addition_work_carries_column_by_column():
    assert addition_work(478, 365) == "478+365: 8+5=13 3\n47+36: 7+6+1=14 43\n4+3: 4+3+1=8 843"
    assert addition_work(95, 7) == "95+07: 5+7=12 2\n9+0: 9+0+1=10 102"
    for a, b in ((0, 0), (9999, 1), (123, 4567), (5005, 5995)):
        assert addition_work(a, b).split()[-1] == str(a + b)  # the last line holds the sum


def test_synthetic_splits_are_disjoint_and_reproducible():
    cfg = DataConfig(n_train=300, n_validation=20, n_test=50)
    train, validation, test = synthetic_addition(cfg, seed=1)
    unordered = lambda records: {frozenset((r["a"], r["b"])) for r in records}
    assert len(unordered(train)) == 300 and len(unordered(validation)) == 20 and len(unordered(test)) == 50
    for one, other in ((train, test), (train, validation), (validation, test)):
        assert unordered(one).isdisjoint(unordered(other))  # not even as b + a
    # validation and test are both held-out problems: never trained on, not even in pretraining
    assert all(held_out(r["a"], r["b"]) for r in test + validation) and not any(held_out(r["a"], r["b"]) for r in train)
    assert len({r["id"] for r in train + validation + test}) == 370
    assert all(int(r["answer"]) == r["a"] + r["b"] for r in train + validation + test)
    assert synthetic_addition(cfg, seed=1) == (train, validation, test)
    assert synthetic_addition(cfg, seed=2) != (train, validation, test)


def test_too_many_prompts_for_the_digit_range_is_an_error():
    with pytest.raises(ValueError, match="widen"):
        synthetic_addition(DataConfig(n_train=5000, n_test=10, min_digits=1, max_digits=1), seed=0)


def test_build_datasets_writes_splits_and_cold_start_traces(tmp_path):
    report = build_datasets(DataConfig(n_train=100, n_validation=10, n_test=20, cold_start_size=30), 0, tmp_path)
    assert report == {"source": "synthetic", "decontaminated": 0, "train": 100, "validation": 10, "test": 20,
                      "cold_start": 30}
    traces = [json.loads(line) for line in (tmp_path / "cold_start.jsonl").read_text().splitlines()]
    assert format_reward([t["completion"] for t in traces]) == [1.0] * 30
    assert all(t["completion"].endswith(f"<answer>{t['answer']}</answer>") for t in traces)


def test_a_narrow_cold_start_leaves_the_carries_to_rl(tmp_path):
    assert carries({"a": 15, "b": 27}) and carries({"a": 478, "b": 365})
    assert not carries({"a": 15, "b": 23})
    assert not carries({"a": 95, "b": 13})  # the last column's 9+1=10 carries into no other column
    cfg = DataConfig(n_train=200, n_validation=10, n_test=20, cold_start_size=40)
    build_datasets(cfg, 0, tmp_path / "wide")
    build_datasets(cfg.model_copy(update={"cold_start_carries": False}), 0, tmp_path / "narrow")
    read = lambda run, name: [json.loads(line) for line in (tmp_path / run / f"{name}.jsonl").read_text().splitlines()]
    assert any(carries(t) for t in read("wide", "cold_start"))
    narrow = read("narrow", "cold_start")
    assert len(narrow) == 40 and not any(re.search(r"\d\+\d\+1=", t["completion"]) for t in narrow)
    assert read("narrow", "train") == read("wide", "train") and any(carries(r) for r in read("narrow", "train"))


def test_build_datasets_imports_a_benchmark_and_decontaminates(tmp_path):
    question = "Tom has twelve apples and gives away three of them to his friend Sam today. How many are left?"
    train = [{"question": question, "answer": "Tom has 12 - 3 = <<12-3=9>>9.\n#### 9"},
             {"question": "A box holds 4 pens. How many pens are in 2 boxes?", "answer": "4*2=8\n#### 8"}]
    test = [{"question": question.replace("Sam", "Ann"), "answer": "#### 9"}]
    for name, rows in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="gsm8k", train_path=tmp_path / "train.jsonl", test_path=tmp_path / "test.jsonl",
                     n_validation=0)
    report = build_datasets(cfg, 0, tmp_path / "out")
    assert report["decontaminated"] == 1 and report["train"] == 1 and report["test"] == 1
    trace = json.loads((tmp_path / "out" / "cold_start.jsonl").read_text())
    assert trace["completion"] == "<think>\n4*2=8\n</think>\n<answer>8</answer>"


def test_build_datasets_reads_any_file_through_a_column_mapping(tmp_path):
    import pandas as pd

    pairs = [(a, b) for a in range(10, 16) for b in range(20, 23)]
    rows = lambda chosen: pd.DataFrame({"prompt": [addition_question(a, b) for a, b in chosen],
                                        "sum": [a + b for a, b in chosen],
                                        "work": [addition_work(a, b) for a, b in chosen]})
    rows(pairs[:-3]).to_parquet(tmp_path / "train.parquet")
    rows(pairs[-3:] + pairs[:1]).to_csv(tmp_path / "test.csv", index=False)  # one test problem also in train
    cfg = DataConfig(source="file", task="gsm8k", answer_format="plain", train_path=tmp_path / "train.parquet",
                     test_path=tmp_path / "test.csv",
                     columns={"question": "prompt", "answer": "sum", "solution": "work"},
                     n_validation=2, cold_start_size=5)
    report = build_datasets(cfg, 0, tmp_path / "out")
    assert report == {"source": "file", "decontaminated": 1, "train": 12, "validation": 2, "test": 4, "cold_start": 5}
    test = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert test[0] == {"id": "gsm8k-test-0", "task": "gsm8k", "question": addition_question(*pairs[-3]),
                       "answer": str(sum(pairs[-3])), "solution": addition_work(*pairs[-3])}
    trace = json.loads((tmp_path / "out" / "cold_start.jsonl").read_text().splitlines()[0])
    assert trace["completion"].endswith(f"</think>\n<answer>{trace['answer']}</answer>")
