"""Tests for components.benchmarks: importers, JSONL I/O, decontamination, and real-file graders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.addition import r1_completion
from components.benchmarks import (
    IMPORTERS,
    boxed_answer,
    decontaminate,
    import_benchmark,
    import_countdown,
    import_gsm8k,
    import_math,
    ngrams,
)
from components.evaluate import grade
from components.jsonl import load_jsonl, write_jsonl
from components.rewards import is_correct

SOURCES = Path(__file__).parents[1] / "sources"  # the public files the project ships (gzipped)
MATH500 = SOURCES / "math500/test.jsonl.gz"
GSM8K_TEST = SOURCES / "gsm8k/test.jsonl.gz"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- importers ------------------------------------------------------------------------------

GSM8K_ROWS = [
    {
        "question": "Janet has 16 eggs and eats 3. How many are left?",
        "answer": "She has 16 - 3 = <<16-3=13>>13 eggs left.\n#### 13",
    },
    {
        "question": "A house costs $1,000 plus $234 in fees. What is the total?",
        "answer": "1,000+234=<<1000+234=1234>>1,234\n#### 1,234",
    },
    {"question": "Three?", "answer": "#### 3"},
]


def test_import_gsm8k(tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", GSM8K_ROWS)
    records = import_gsm8k(path)
    assert [r["id"] for r in records] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]
    assert [r["answer"] for r in records] == ["13", "1234", "3"]
    assert records[0] == {
        "id": "gsm8k-test-0",
        "task": "gsm8k",
        "question": GSM8K_ROWS[0]["question"],
        "answer": "13",
        "solution": "She has 16 - 3 = 13 eggs left.",
    }
    assert "<<" not in records[1]["solution"] and "####" not in records[1]["solution"]
    assert len(import_gsm8k(path, limit=2)) == 2
    assert import_benchmark("gsm8k", path, limit=1) == records[:1]


MATH_ROWS = [
    {
        "problem": "Compute $\\frac{2}{4}$.",
        "level": "Level 1",
        "type": "Prealgebra",
        "solution": "We have $\\boxed{3}$ wrong, then $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
        "idx": 7,
    },
    {
        "problem": "Solve $x+1=3$.",
        "level": "Level 2",
        "type": "Algebra",
        "solution": "So $x = \\boxed{ 2 }$.",
        "idx": 8,
    },
]
MATH500_ROWS = [
    {
        "problem": "Convert $(0,3)$ to polar.",
        "solution": "Thus $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is $1+1$?",
        "solution": "It is $\\boxed{2}$.",
        "answer": "2",
        "subject": "Algebra",
        "level": 1,
        "unique_id": "test/algebra/1.json",
    },
]


def test_import_math_hendrycks(tmp_path):
    records = import_math(_jsonl(tmp_path / "test.jsonl", MATH_ROWS))
    assert [r["answer"] for r in records] == ["\\frac{1}{2}", "2"]  # last box, nested braces
    assert [r["id"] for r in records] == ["math-7", "math-8"]
    assert records[0]["task"] == "math" and records[0]["question"] == MATH_ROWS[0]["problem"]
    assert records[0]["solution"] == MATH_ROWS[0]["solution"]
    assert (records[0]["level"], records[0]["subject"]) == (1, "Prealgebra")


def test_import_math500_uses_answer_field(tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", MATH500_ROWS)
    records = import_benchmark("math500", path)
    assert records[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert records[0]["id"] == "math-test/precalculus/807.json"
    assert (records[0]["level"], records[0]["subject"]) == (2, "Precalculus")
    assert len(import_math(path, limit=1)) == 1 and import_math(path, limit=0) == []


def test_import_math_falls_back_to_line_index(tmp_path):
    row = {"problem": "p", "solution": "$\\boxed{5}$"}
    record = import_math(_jsonl(tmp_path / "extra.jsonl", [row]))[0]
    assert record["id"] == "math-extra-0" and "level" not in record and "subject" not in record


def test_import_countdown(tmp_path):
    path = _jsonl(
        tmp_path / "countdown_cd3_test.jsonl",
        [{"input": "30,100,93", "output": "23"}, {"input": "83,18,75", "output": "10"}],
    )
    records = import_countdown(path)
    assert records[0] == {
        "id": "countdown-countdown_cd3_test-0",
        "task": "countdown",
        "question": "Using the numbers [30, 100, 93], create an equation that equals 23. "
        "You can use + - * / and each number at most once.",
        "answer": "23",
        "numbers": [30, 100, 93],
    }
    assert records[1]["numbers"] == [83, 18, 75] and records[1]["answer"] == "10"
    assert import_benchmark("countdown", path, limit=1) == records[:1]
    # The imported gold is gradable: a real solution passes the Countdown grader.
    assert is_correct("100 - 93 + 30", "23", "countdown", records[0]["numbers"]) is False
    assert is_correct("93 - (100 - 30)", "23", "countdown", records[0]["numbers"]) is True


def test_boxed_answer():
    assert boxed_answer("a $\\boxed{1}$ b $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert boxed_answer("$\\fbox{x^{2}}$") == "x^{2}"
    assert boxed_answer("$\\boxed{\\{1, 2\\}}$") == "\\{1, 2\\}"  # escaped braces are literal
    assert boxed_answer("no box here") is None
    assert boxed_answer("$\\boxed{\\frac{1}{2}$") is None  # unbalanced


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, rows, field",
    [
        ("gsm8k", [GSM8K_ROWS[0], {"question": "q"}], "answer"),
        ("math", [MATH_ROWS[0], {"solution": "$\\boxed{1}$"}], "problem"),
        ("math500", [MATH500_ROWS[0], {"problem": "p", "answer": "1"}], "solution"),
        ("countdown", [{"input": "1,2,3", "output": "6"}, {"output": "6"}], "input"),
    ],
)
def test_missing_field_names_path_line_and_field(tmp_path, kind, rows, field):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        import_benchmark(kind, path)
    assert (
        str(path) in str(err.value) and "line 2" in str(err.value) and repr(field) in str(err.value)
    )


def test_gsm8k_without_final_answer_is_rejected(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match="line 1.*####"):
        import_gsm8k(path)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"input": "1,2", "output": "3"}\n\n{"input": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)
    with pytest.raises(ValueError, match="line 3"):
        import_countdown(path)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(missing)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        import_benchmark("gsm8k", missing)


def test_unknown_kind_names_allowed_kinds(tmp_path):
    with pytest.raises(ValueError) as err:
        import_benchmark("aime", tmp_path / "x.jsonl")
    assert all(kind in str(err.value) for kind in IMPORTERS)


def test_write_jsonl_roundtrip_is_atomic(tmp_path):
    path = tmp_path / "out" / "data.jsonl"
    records = [{"id": "a", "question": "Janet’s ducks", "numbers": [1, 2]}, {"id": "b"}]
    write_jsonl(path, records)
    assert load_jsonl(path) == records
    write_jsonl(path, records[:1])  # overwrite in place
    assert load_jsonl(path) == records[:1]
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]  # no temp files left

    with pytest.raises(TypeError):
        write_jsonl(path, [{"id": "c"}, {"bad": object()}])
    assert load_jsonl(path) == records[:1]  # old content survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]


# --- decontamination ------------------------------------------------------------------------


def _rec(i: str, question: str) -> dict:
    return {"id": i, "task": "math", "question": question, "answer": "1"}


def test_ngrams_normalise_and_short_texts():
    assert ngrams("The Cat, sat!", n=8) == {("the", "cat", "sat")}
    assert ngrams("a b c d", n=2) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert ngrams("?!", n=8) == set()
    with pytest.raises(ValueError):
        ngrams("a", n=0)


def test_decontaminate_eight_vs_seven_word_overlap():
    test = [_rec("t0", "alpha beta gamma delta epsilon zeta eta theta iota kappa")]
    shares8 = _rec("r8", "Prefix words: Alpha beta gamma delta, epsilon zeta eta theta; suffix.")
    shares7 = _rec("r7", "prefix alpha beta gamma delta epsilon zeta eta suffix words here")
    unrelated = _rec("u", "completely different question about apples and oranges today")
    kept, removed = decontaminate([shares8, shares7, unrelated], test)
    assert removed == 1
    assert [r["id"] for r in kept] == ["r7", "u"]
    assert test == [
        _rec("t0", "alpha beta gamma delta epsilon zeta eta theta iota kappa")
    ]  # intact


def test_decontaminate_short_identical_prompts():
    test = [_rec("t", "What is 2+2?")]
    train = [_rec("same", "what is 22"), _rec("other", "What is 3+3?")]
    kept, removed = decontaminate(train, test)
    assert removed == 1 and [r["id"] for r in kept] == ["other"]


def test_decontaminate_invariant_no_shared_ngram():
    test = [
        _rec(f"t{i}", q)
        for i, q in enumerate(
            [
                "Natalia sold clips to 48 of her friends in April and then half as many in May",
                "How many vertical asymptotes does the graph of y equal two over x squared have",
                "Short one",
            ]
        )
    ]
    train = [
        _rec(f"r{i}", q)
        for i, q in enumerate(
            [
                "In April Natalia sold clips to 48 of her friends in April and then some",
                "Weng earns 12 dollars an hour for babysitting and did 50 minutes yesterday",
                "short ONE.",
                "How many vertical asymptotes does the graph of y equal three have",
                "A clip costs 48 cents; how many friends bought clips in April and May",
            ]
        )
    ]
    kept, removed = decontaminate(train, test)
    test_grams = set().union(*(ngrams(t["question"]) for t in test))
    assert all(ngrams(r["question"]).isdisjoint(test_grams) for r in kept)
    assert removed == len(train) - len(kept) == 3


def test_decontaminate_countdown_by_problem_not_template():
    # Every Countdown prompt shares the template's 8-grams; identity is numbers + target.
    test = [
        {
            "id": "t",
            "task": "countdown",
            "question": "Using the numbers [30, 100, 93], ...",
            "answer": "23",
            "numbers": [30, 100, 93],
        }
    ]
    same = {
        "id": "same",
        "task": "countdown",
        "answer": "23",
        "numbers": [93, 30, 100],
        "question": "Using the numbers [93, 30, 100], create an equation that equals 23. "
        "You can use + - * / and each number at most once.",
    }
    other = {
        **same,
        "id": "other",
        "numbers": [31, 100, 93],
        "question": same["question"].replace("93, 30", "93, 31"),
    }
    kept, removed = decontaminate([same, other], test)
    assert removed == 1 and [r["id"] for r in kept] == ["other"]


# --- real benchmark files: the grader agrees with the gold answers --------------------------

def test_math500_grader_accepts_every_gold_solution_and_rejects_wrong_answers():
    records = import_benchmark("math500", MATH500)
    assert len(records) == 500
    for record in records:
        solution = record["solution"]
        # The whole worked solution as the answer (math-verify finds its last box), and the solution
        # as an R1-format completion: what `r1flow eval` grades.
        assert is_correct(solution, record["answer"], "math"), record["id"]
        assert grade(record, r1_completion(solution, boxed_answer(solution))), record["id"]

    # A wrong answer (the next problem's) must grade wrong whenever the two really differ.
    checked = 0
    for record, other in zip(records, records[1:] + records[:1]):
        if is_correct(record["answer"], other["answer"], "math"):
            continue  # equivalent answers (e.g. "7" and "7", "x=5" and "5")
        checked += 1
        assert not is_correct(other["answer"], record["answer"], "math"), (record["id"], other["answer"])
        assert not grade(record, r1_completion(other["solution"], other["answer"])), record["id"]
    assert checked >= 490


def test_gsm8k_grader_accepts_every_final_answer_and_rejects_wrong_ones():
    records = import_benchmark("gsm8k", GSM8K_TEST)
    raw = load_jsonl(GSM8K_TEST)
    assert len(records) == len(raw) == 1319
    for record, row in zip(records, raw):
        final = row["answer"].rpartition("####")[2].strip()  # as written: "1,234" keeps its comma
        assert grade(record, r1_completion(record["solution"], final)), record["id"]
        assert is_correct(final, record["answer"], "gsm8k"), record["id"]
        wrong = str(int(record["answer"]) + 1)
        assert not grade(record, r1_completion(record["solution"], wrong)), record["id"]
        assert not is_correct(wrong, record["answer"], "gsm8k"), record["id"]


def test_countdown_source_imports_every_problem():
    records = import_benchmark("countdown", SOURCES / "countdown/countdown_cd3_test.jsonl.gz")
    assert len(records) == 256 and all(len(r["numbers"]) == 3 for r in records)
    assert records[0]["id"] == "countdown-countdown_cd3_test-0"  # ids do not depend on the compression
