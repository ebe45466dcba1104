"""Great Expectations data gates: good sets pass, planted bad rows fail with their exact indices."""

from __future__ import annotations

import json
import re

import pytest

from components.validate import Bounds, DataValidationError, validate_file, validate_records


def _prompt(i: int, **overrides) -> dict:
    a, b = 100 + i, 1000 + 7 * i
    record = {
        "id": f"add-{i}",
        "task": "addition",
        "question": f"What is {a} + {b}?",
        "answer": str(a + b),
    }
    return record | overrides


def _prompts(n: int = 6) -> list[dict]:
    return [_prompt(i) for i in range(n)] + [
        {
            "id": "math-0",
            "task": "math",
            "question": "What is 1/2 as a fraction?",
            "answer": "\\frac{1}{2}",
        }
    ]


def _trace(record: dict, answer: str | None = None) -> dict:
    said = record["answer"] if answer is None else answer
    return record | {
        "completion": f"<think>add the digits column by column</think>\n<answer>{said}</answer>"
    }


def _failure(records: list[dict], kind: str, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as caught:
        validate_records(records, kind, "synthetic/test", **kwargs)
    return caught.value


def _failed(error: DataValidationError) -> list[tuple[str, str | None]]:
    return [
        (e["expectation"], e["column"]) for e in error.report["expectations"] if not e["success"]
    ]


def test_good_prompts_pass_with_report():
    report = validate_records(_prompts(), "prompts", "synthetic/prompts")
    assert report["success"] and report["rows"] == 7
    assert report["dataset"] == "synthetic/prompts" and report["kind"] == "prompts"
    listed = {(e["expectation"], e["column"]) for e in report["expectations"]}
    assert {
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_values_to_be_unique", "question"),
        ("expect_column_values_to_be_in_set", "answer_parseable"),
    } <= listed
    assert all(e["success"] and e["unexpected_count"] == 0 for e in report["expectations"])
    json.dumps(report)  # JSON-able, ready to log as an artifact


def test_good_traces_pass_for_sft_and_rejection_sampled():
    traces = [_trace(r) for r in _prompts()]
    assert validate_records(traces, "sft", "synthetic/sft")["success"]
    assert validate_records(traces, "rejection_sampled", "synthetic/rs")["success"]


def test_duplicate_question_names_rows():
    records = _prompts()
    records[3] = _prompt(3, question=records[1]["question"])
    error = _failure(records, "eval")
    assert _failed(error) == [("expect_column_values_to_be_unique", "question")]
    assert "dataset 'synthetic/test' (eval) failed 1 expectation(s)" in str(error)
    assert "expect_column_values_to_be_unique(question): rows [1, 3]" in str(error)


def test_unparseable_answer_names_row():
    records = _prompts()
    records[4] = _prompt(4, answer="abc")
    error = _failure(records, "prompts")
    assert _failed(error) == [("expect_column_values_to_be_in_set", "answer_parseable")]
    assert "expect_column_values_to_be_in_set(answer_parseable): rows [4]" in str(error)


def test_several_failures_reported_together():
    records = _prompts()
    records[2] = _prompt(2, task="chess", answer="e4")
    records[5] = _prompt(5, id="add-0")
    records[6] = records[6] | {"question": 12345}
    message = str(_failure(records, "prompts"))
    assert "failed 4 expectation(s)" in message
    assert "expect_column_values_to_be_of_type(question): rows [6]" in message
    assert "expect_column_values_to_be_unique(id): rows [0, 5]" in message
    assert "expect_column_values_to_be_in_set(task): rows [2]" in message
    assert "expect_column_values_to_be_in_set(answer_parseable): rows [2]" in message


def test_empty_dataset_fails_row_count():
    error = _failure([], "prompts")
    assert _failed(error) == [("expect_table_row_count_to_be_between", None)]
    assert "expect_table_row_count_to_be_between(table)" in str(error)
    assert error.report["rows"] == 0


def test_missing_column_is_named_not_a_key_error():
    records = [{k: v for k, v in r.items() if k != "answer"} for r in _prompts()]
    error = _failure(records, "prompts")
    assert ("expect_column_to_exist", "answer") in _failed(error)
    assert "expect_column_to_exist(answer): column missing" in str(error)


def test_malformed_sft_trace_names_row():
    traces = [_trace(r) for r in _prompts()]
    traces[2]["completion"] = "<think>forgot to close the thought <answer>1116</answer>"
    error = _failure(traces, "sft")
    assert _failed(error) == [("expect_column_values_to_be_in_set", "trace_well_formed")]
    assert "expect_column_values_to_be_in_set(trace_well_formed): rows [2]" in str(error)


def test_wrong_answer_in_rejection_sampled_names_row():
    traces = [_trace(r) for r in _prompts()]
    traces[1] = _trace(_prompts()[1], answer="9999")
    traces[6] = _trace(_prompts()[6], answer="\\frac{1}{3}")
    error = _failure(traces, "rejection_sampled")
    assert _failed(error) == [("expect_column_values_to_be_in_set", "trace_correct")]
    assert "expect_column_values_to_be_in_set(trace_correct): rows [1, 6]" in str(error)
    # The same wrong trace is acceptable as an SFT trace: only its format is checked there.
    assert validate_records(traces, "sft", "synthetic/sft")["success"]


def test_duplicate_trace_pair_in_rejection_sampled():
    traces = [_trace(r) for r in _prompts()]
    traces.append(traces[0] | {"id": "add-0-copy"})
    error = _failure(traces, "rejection_sampled")
    assert _failed(error) == [("expect_compound_columns_to_be_unique", "question,completion")]
    assert "rows [0, 7]" in str(error)


def test_over_long_question_names_row():
    records = _prompts()
    records[5] = _prompt(5, question="What is 105 + 1035? " + "x" * 100)
    error = _failure(records, "prompts", bounds=Bounds(max_question_chars=80))
    assert _failed(error) == [("expect_column_value_lengths_to_be_between", "question")]
    assert "expect_column_value_lengths_to_be_between(question): rows [5]" in str(error)


def test_unknown_kind_lists_allowed_kinds():
    with pytest.raises(
        ValueError, match=re.escape("('prompts', 'sft', 'rejection_sampled', 'eval')")
    ):
        validate_records(_prompts(), "pretraining", "synthetic/test")


def test_validate_file_reads_jsonl_and_names_missing_path(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _prompts()))
    report = validate_file(path, "prompts")
    assert report["dataset"] == "prompts" and report["rows"] == 7
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        validate_file(missing, "prompts")
