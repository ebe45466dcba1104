"""Tests for components.importer: importers, JSONL I/O, decontamination, and real-file graders."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from components.addition import r1_completion
from components.importer import (
    PRESETS,
    boxed_answer,
    check_mapping,
    decontaminate,
    import_benchmark,
    import_file,
    ngrams,
)
from components.jsonl import load_jsonl, write_jsonl
from components.rewards import extract_answer, grade, is_correct

SOURCES = Path(__file__).parents[1] / "sources"  # the public files the project ships (gzipped)
MATH500 = SOURCES / "math500/test.jsonl.gz"
GSM8K_TEST = SOURCES / "gsm8k/test.jsonl.gz"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- the shipped formats --------------------------------------------------------------------

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
    records = import_benchmark("gsm8k", path)
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
    assert len(import_benchmark("gsm8k", path, limit=2)) == 2
    assert import_benchmark("gsm8k", path, limit=1) == records[:1]
    gzipped = tmp_path / "test.jsonl.gz"  # the shipped files' form: the same records, the same ids
    gzipped.write_bytes(gzip.compress(path.read_bytes()))
    assert import_benchmark("gsm8k", gzipped) == records


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
    records = import_benchmark("math", _jsonl(tmp_path / "test.jsonl", MATH_ROWS))
    assert [r["answer"] for r in records] == ["\\frac{1}{2}", "2"]  # last box, nested braces
    assert [r["id"] for r in records] == ["math-7", "math-8"]
    assert records[0]["task"] == "math" and records[0]["question"] == MATH_ROWS[0]["problem"]
    assert records[0]["solution"] == MATH_ROWS[0]["solution"]
    assert (records[0]["level"], records[0]["subject"]) == (1, "Prealgebra")


def test_import_math500_uses_answer_field(tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", MATH500_ROWS)
    records = import_benchmark("math", path)
    assert records[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert records[0]["id"] == "math-test/precalculus/807.json"
    assert (records[0]["level"], records[0]["subject"]) == (2, "Precalculus")
    assert len(import_benchmark("math", path, limit=1)) == 1 and import_benchmark("math", path, limit=0) == []


def test_import_math_falls_back_to_row_index(tmp_path):
    row = {"problem": "p", "solution": "$\\boxed{5}$"}
    record = import_benchmark("math", _jsonl(tmp_path / "extra.jsonl", [row]))[0]
    assert record["id"] == "math-extra-0" and "level" not in record and "subject" not in record


def test_import_countdown(tmp_path):
    path = _jsonl(
        tmp_path / "countdown_cd3_test.jsonl",
        [{"input": "30,100,93", "output": "23"}, {"input": "83,18,75", "output": "10"}],
    )
    records = import_benchmark("countdown", path)
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


# --- any file datasets reads, with a column mapping -------------------------------------------

QA = {"q": ["What is 2 + 3?", "What is 10 + 4?"], "final": [5, 14], "work": ["2+3=5", "10+4=14"],
      "key": ["a", "b"]}
QA_MAPPING = {"task": "gsm8k", "columns": {"question": "q", "answer": "final", "solution": "work", "id": "key"},
              "answer_format": "plain"}
QA_RECORDS = [{"id": "gsm8k-a", "task": "gsm8k", "question": "What is 2 + 3?", "answer": "5", "solution": "2+3=5"},
              {"id": "gsm8k-b", "task": "gsm8k", "question": "What is 10 + 4?", "answer": "14",
               "solution": "10+4=14"}]


def _write(kind: str, folder: Path) -> Path:
    frame = pd.DataFrame(QA)
    if kind == "parquet":
        frame.to_parquet(folder / "qa.parquet")
        return folder / "qa.parquet"
    if kind == "csv":
        frame.to_csv(folder / "qa.csv", index=False)
        return folder / "qa.csv"
    from datasets import Dataset

    Dataset.from_pandas(frame).save_to_disk(str(folder / "qa"))
    if kind == "arrow":
        return next((folder / "qa").glob("*.arrow"))
    return folder / "qa"


@pytest.mark.parametrize("kind", ["parquet", "csv", "save_to_disk", "arrow"])
def test_import_file_with_a_column_mapping(tmp_path, kind):
    path = _write(kind, tmp_path)
    assert import_file(path, **QA_MAPPING) == QA_RECORDS  # integer answers become text
    assert import_file(path, **QA_MAPPING, limit=1) == QA_RECORDS[:1]
    without_ids = import_file(path, "math", {"question": "q", "answer": "final"}, "plain")
    assert [r["id"] for r in without_ids] == [f"math-{path.name.split('.')[0]}-{i}" for i in (0, 1)]
    assert "solution" not in without_ids[0]


def test_import_file_answer_formats(tmp_path):
    frame = pd.DataFrame({"problem": ["Add 1 and 2.", "Double 4."], "gold": [None, "8"],
                          "hashed": ["1+2=<<1+2=3>>3\n#### 3", "4*2=8\n#### 8"],
                          "boxed": ["So $\\boxed{3}$.", "It is $\\boxed{2 \\cdot 4}$."]})
    path = tmp_path / "f.parquet"
    frame.to_parquet(path)
    hashed = import_file(path, "gsm8k", {"question": "problem", "answer": "hashed"}, "hash")
    assert [(r["answer"], r["solution"]) for r in hashed] == [("3", "1+2=3"), ("8", "4*2=8")]
    boxed = import_file(path, "math", {"question": "problem", "solution": "boxed"}, "boxed")
    assert [r["answer"] for r in boxed] == ["3", "2 \\cdot 4"] and boxed[0]["solution"] == "So $\\boxed{3}$."
    # The answer column where it has a value, the solution's box where it has none.
    both = import_file(path, "math", {"question": "problem", "solution": "boxed", "answer": "gold"}, "boxed")
    assert [r["answer"] for r in both] == ["3", "8"]
    countdown = pd.DataFrame({"nums": [[3, 4, 5]], "goal": [12]})
    countdown.to_parquet(tmp_path / "cd.parquet")
    record = import_file(tmp_path / "cd.parquet", "countdown", {"numbers": "nums", "target": "goal"}, None)[0]
    assert (record["id"], record["numbers"], record["answer"]) == ("countdown-cd-0", [3, 4, 5], "12")


@pytest.mark.parametrize(("task", "columns", "answer_format", "message"), [
    ("gsm8k", {"question": "q"}, "plain", "columns needs question and answer (missing answer)"),
    ("math", {"question": "q", "answer": "a"}, "boxed", "columns needs question and solution"),
    ("gsm8k", {"question": "q", "answer": "a", "hint": "h"}, "plain", "unknown field(s) ['hint']"),
    ("gsm8k", {"question": "q", "answer": "a"}, None, "needs answer_format: hash"),
    ("gsm8k", {"question": "q", "answer": "a", "solution": "s"}, "hash", "drop columns.solution"),
    ("countdown", {"numbers": "n", "target": "t"}, "boxed", "the target column is the answer"),
    ("aime", {"question": "q", "answer": "a"}, "plain", "expected gsm8k, math or countdown"),
])
def test_a_mapping_that_cannot_work_says_what_to_set(task, columns, answer_format, message):
    with pytest.raises(ValueError) as err:
        check_mapping(task, columns, answer_format)
    assert message in str(err.value)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, rows, column",
    [
        ("gsm8k", [GSM8K_ROWS[0], {"question": "q"}], "answer"),
        ("math", [MATH_ROWS[0], {"solution": "$\\boxed{1}$"}], "problem"),
        ("math", [MATH500_ROWS[0], {"problem": "p", "answer": "1"}], "solution"),
        ("countdown", [{"input": "1,2,3", "output": "6"}, {"output": "6"}], "input"),
    ],
)
def test_an_empty_cell_names_path_row_and_column(tmp_path, kind, rows, column):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as err:
        import_benchmark(kind, path)
    assert str(err.value).startswith(f"{path}, line 2: missing required field {column!r}; add it to the line")


def test_a_missing_column_names_the_columns_the_file_has(tmp_path):
    path = _write("parquet", tmp_path)
    with pytest.raises(ValueError) as err:
        import_file(path, "gsm8k", {"question": "question", "answer": "final"}, "plain")
    assert str(err.value) == (f"{path}: no column 'question' (columns.question); the file has q, final, work, key; "
                              "map question to one of them")


def test_bad_rows_name_the_file_and_row(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], {"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: field 'answer' has no '#### N' final answer"):
        import_benchmark("gsm8k", path)
    pd.DataFrame({"q": ["a", "b", "c"], "final": ["1", "2", "1"], "id": ["x", "y", "x"]}).to_parquet(
        tmp_path / "dup.parquet")
    columns = {"question": "q", "answer": "final", "id": "id"}
    with pytest.raises(ValueError, match=r"dup.parquet, row 3: duplicate prompt \(same id 'gsm8k-x' as row 1\)"):
        import_file(tmp_path / "dup.parquet", "gsm8k", columns, "plain")
    pd.DataFrame({"q": ["a", "b", "a"], "final": ["1", "2", "3"]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match=r"dup.csv, row 3: duplicate prompt \(same question as row 1\)"):
        import_file(tmp_path / "dup.csv", "gsm8k", {"question": "q", "answer": "final"}, "plain")
    pd.DataFrame({"q": ["a"], "final": [[1, 2]]}).to_parquet(tmp_path / "list.parquet")
    with pytest.raises(ValueError, match="list.parquet, row 1: column 'final' must be text or a number, got a list"):
        import_file(tmp_path / "list.parquet", "gsm8k", {"question": "q", "answer": "final"}, "plain")
    _jsonl(tmp_path / "cd.jsonl", [{"input": "1,x", "output": "3"}])
    with pytest.raises(ValueError, match="cd.jsonl, line 1: bad countdown numbers/target"):
        import_benchmark("countdown", tmp_path / "cd.jsonl")


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"input": "1,2", "output": "3"}\n\n{"input": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value)
    with pytest.raises(ValueError, match="line 3: invalid JSON"):  # JSON Lines are read by load_jsonl's reader
        import_benchmark("countdown", path)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.jsonl", b"", "no rows (empty, or blank lines only)"),
    ("blank.jsonl", b"\n\n", "no rows (empty, or blank lines only)"),
    ("header.csv", b"q,final\n", "not readable as csv"),
    ("bad.parquet", b"not parquet", "not readable as parquet"),
    ("bad.jsonl.gz", b"not gzip", "not a readable gzip file"),
    ("data.txt", b"q\n", "not a format the importer reads; use .jsonl, .json, .csv (each also .gz), .parquet"),
    ("data.parquet.gz", b"q\n", "not a format the importer reads"),
    ("data", b"q\n", "not a format the importer reads"),
])
def test_unreadable_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        import_benchmark("gsm8k", path)
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_folders_that_are_not_one_dataset_say_where_to_point(tmp_path):
    from datasets import Dataset, DatasetDict

    split = Dataset.from_dict(QA)
    DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=f"DatasetDict with splits train, test; point at one split's folder, "
                                         f"e.g. {tmp_path / 'dict' / 'train'}"):
        import_file(tmp_path / "dict", **QA_MAPPING)
    assert import_file(tmp_path / "dict" / "test", **QA_MAPPING) == QA_RECORDS
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="a folder, but not one save_to_disk wrote"):
        import_file(tmp_path / "plain", **QA_MAPPING)


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(missing)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        import_benchmark("gsm8k", missing)


def test_unknown_kind_names_allowed_kinds(tmp_path):
    with pytest.raises(ValueError) as err:
        import_benchmark("aime", tmp_path / "x.jsonl")
    assert all(kind in str(err.value) for kind in PRESETS)


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
    records = import_benchmark("math", MATH500)
    assert len(records) == 500
    for record in records:
        solution = record["solution"]
        # The whole worked solution as the answer (math-verify finds its last box), and the solution
        # as an R1-format completion: what `r1flow eval` grades.
        assert is_correct(solution, record["answer"], "math"), record["id"]
        assert grade(extract_answer(r1_completion(solution, boxed_answer(solution))), record), record["id"]

    # A wrong answer (the next problem's) must grade wrong whenever the two really differ.
    checked = 0
    for record, other in zip(records, records[1:] + records[:1]):
        if is_correct(record["answer"], other["answer"], "math"):
            continue  # equivalent answers (e.g. "7" and "7", "x=5" and "5")
        checked += 1
        assert not is_correct(other["answer"], record["answer"], "math"), (record["id"], other["answer"])
        assert not grade(extract_answer(r1_completion(other["solution"], other["answer"])), record), record["id"]
    assert checked >= 490


def test_gsm8k_grader_accepts_every_final_answer_and_rejects_wrong_ones():
    records = import_benchmark("gsm8k", GSM8K_TEST)
    raw = load_jsonl(GSM8K_TEST)
    assert len(records) == len(raw) == 1319
    for record, row in zip(records, raw):
        final = row["answer"].rpartition("####")[2].strip()  # as written: "1,234" keeps its comma
        assert grade(extract_answer(r1_completion(record["solution"], final)), record), record["id"]
        assert is_correct(final, record["answer"], "gsm8k"), record["id"]
        wrong = str(int(record["answer"]) + 1)
        assert not grade(extract_answer(r1_completion(record["solution"], wrong)), record), record["id"]
        assert not is_correct(wrong, record["answer"], "gsm8k"), record["id"]


def test_countdown_source_imports_every_problem():
    records = import_benchmark("countdown", SOURCES / "countdown/countdown_cd3_test.jsonl.gz")
    assert len(records) == 256 and all(len(r["numbers"]) == 3 for r in records)
    assert records[0]["id"] == "countdown-countdown_cd3_test-0"  # ids do not depend on the compression
