"""Benchmark import and decontamination: turn a dataset file into prompt records.

    import_benchmark("gsm8k", "sources/gsm8k/test.jsonl.gz")        # a preset: GSM8K, MATH, Countdown
    import_file("qa.parquet", task="math", columns={"question": "q", "answer": "a"}, answer_format="plain")

Any local file the ``datasets`` library reads is a source: .jsonl, .json, .csv (each also
gzipped), .parquet, .arrow, or a ``save_to_disk`` folder; JSON Lines are read line by line
(``components.jsonl``), the rest by ``datasets``. A column mapping says which column
holds each record field and ``answer_format`` how the gold answer is written: ``hash`` (GSM8K's
``#### N`` ending the worked solution), ``boxed`` (MATH: the answer column, else the solution's
last ``\\boxed{}``) or ``plain``. A record is ``{"id", "task", "question", "answer"}``, plus
``solution`` where there is one (raw material for cold-start traces), ``numbers`` for Countdown and
``level``/``subject`` when mapped. Importers take an explicit path, never a default location.
``decontaminate`` removes training prompts that overlap a test set, so benchmark scores measure
reasoning rather than recall.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from components.jsonl import read_rows

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_CALC = re.compile(r"<<[^>]*>>")  # GSM8K calculator annotations: "<<16-3-4=9>>"
_PUNCT = re.compile(r"[^\w\s]")

# suffix -> the datasets builder that reads it; a folder is read by load_from_disk
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
ACCEPTED = ".jsonl, .json, .csv (each also .gz), .parquet, .arrow, or a save_to_disk folder"

# Record fields a column mapping may fill, per task, and those each answer format needs.
FIELDS = {"text": ("question", "answer", "solution", "id", "level", "subject"),
          "countdown": ("numbers", "target", "id")}
REQUIRED = {"hash": ("question", "answer"), "boxed": ("question", "solution"), "plain": ("question", "answer"),
            "countdown": ("numbers", "target")}
# The shipped formats. A column named by a string must be in the file; a tuple lists candidates,
# the first the file has wins, and the field is left out when it has none (MATH has no answer
# column, MATH-500 has one; Hendrycks' files say "type" where MATH-500 says "subject").
PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {"task": "gsm8k", "answer_format": "hash", "columns": {"question": "question", "answer": "answer"}},
    "math": {"task": "math", "answer_format": "boxed", "columns": {
        "question": "problem", "solution": "solution", "answer": ("answer",), "id": ("unique_id", "idx"),
        "level": ("level",), "subject": ("subject", "type")}},
    "countdown": {"task": "countdown", "answer_format": "plain", "columns": {"numbers": "input", "target": "output"}},
}


def boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` or ``\\fbox{…}``, brace-matched; None if absent."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, start = 0, i + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # skip escaped characters: \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    return None  # unbalanced


def countdown_question(numbers: list[int], target: int | str) -> str:
    """The Countdown prompt text (shared with generators so templates cannot drift apart)."""
    return (
        f"Using the numbers {list(numbers)}, create an equation that equals {target}. "
        "You can use + - * / and each number at most once."
    )


# --- the column mapping ---------------------------------------------------------------------


def check_mapping(task: str, columns: dict[str, Any], answer_format: str | None) -> None:
    """Refuse a mapping the importer cannot use (the profile checks it on load); says what to set."""
    if task not in ("gsm8k", "math", "countdown"):
        raise ValueError(f"task {task!r}: expected gsm8k, math or countdown (which grader its answers get)")
    if task == "countdown":
        if answer_format not in (None, "plain"):
            raise ValueError(f"answer_format {answer_format!r} with task countdown: the target column is the "
                             "answer; drop answer_format")
        allowed, required = FIELDS["countdown"], REQUIRED["countdown"]
    elif answer_format is None:
        raise ValueError(f"task {task!r} needs answer_format: hash (GSM8K's '#### N'), boxed (\\boxed{{}} in the "
                         "solution column) or plain (the answer column as it is)")
    else:
        allowed, required = FIELDS["text"], REQUIRED[answer_format]
        if answer_format == "hash" and "solution" in columns:
            raise ValueError("answer_format hash takes the solution from the answer column (the text before "
                             "'####'); drop columns.solution")
    if unknown := sorted(set(columns) - set(allowed)):
        raise ValueError(f"columns: unknown field(s) {unknown} for task {task!r}; map any of {', '.join(allowed)}")
    if missing := [name for name in required if name not in columns]:
        example = ", ".join(f"{name}: COLUMN" for name in required)
        raise ValueError(f"columns needs {' and '.join(required)} (missing {', '.join(missing)}) for task {task!r}"
                         f"{'' if task == 'countdown' else f' and answer_format {answer_format}'}; e.g. {{{example}}}")


def file_format(path: Path) -> str:
    """The suffix that says how to read ``path`` (``.jsonl`` for data.jsonl.gz too), or ``folder``."""
    path = Path(path)
    if path.is_dir():
        return "folder"
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = suffixes[-1:] == [".gz"]
    suffix = "".join(suffixes[-2:-1] if gzipped else suffixes[-1:])
    if suffix not in FORMATS or gzipped and FORMATS[suffix] not in ("json", "csv"):
        raise ValueError(f"{path}: not a format the importer reads; use {ACCEPTED}")
    return suffix


# --- reading --------------------------------------------------------------------------------


def read_table(path: Path):  # -> datasets.Dataset (imported lazily, so not named here)
    """The whole file as a ``datasets.Dataset`` in memory; errors name the file and what to change."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    kind = file_format(path)
    import datasets  # a second of imports the synthetic source never pays

    datasets.disable_progress_bars()  # stage logs and `r1flow eval`'s terminal need no per-file bars
    if kind == "folder":
        try:
            table = datasets.load_from_disk(str(path), keep_in_memory=True)
        except FileNotFoundError as exc:
            raise ValueError(f"{path}: a folder, but not one save_to_disk wrote ({exc}); point at a dataset "
                             f"file or folder: {ACCEPTED}") from None
        if isinstance(table, datasets.DatasetDict):
            raise ValueError(f"{path}: a DatasetDict with splits {', '.join(table)}; point at one split's folder, "
                             f"e.g. {path / next(iter(table))}")
        return table
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, no rows; a dataset file holds one prompt per row")
    builder = FORMATS[kind]
    try:
        # datasets converts a file to Arrow in a cache folder first: a private one, kept nowhere.
        with tempfile.TemporaryDirectory() as cache:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True)
    # datasets passes its readers' errors on: ArrowInvalid, BadGzipFile, StopIteration (an empty CSV), ...
    except (datasets.exceptions.DatasetsError, ValueError, OSError, StopIteration) as exc:
        reason = exc.__cause__ or exc
        raise ValueError(f"{path}: not readable as {builder} ({str(reason) or type(reason).__name__}); check it "
                         f"is a whole {kind} file, or convert it to one of {ACCEPTED}") from None


class Words(NamedTuple):
    """How errors name a place and a value: in a JSON Lines file's own terms (line N, field, JSON
    types), the line an editor jumps to; in a table's (row N, column)."""

    row: str
    cell: str
    kinds: dict[type, str]  # a value's type, as the file writes it
    text: str  # how to write text there
    missing: str  # a cell with no value, and what to do about it


LINES = Words("line", "field", {bool: "a JSON boolean", int: "a JSON number", float: "a JSON number",
                                list: "a JSON array", dict: "a JSON object"},
              "a JSON string", "missing required field {!r}; add it to the line")
ROWS = Words("row", "column", {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                               dict: "a mapping"}, "text", "column {!r} is empty; fill it in or remove the row")


def _read(path: Path, limit: int | None) -> tuple[list[tuple[int, dict]], list[str], Words]:
    """A file's first ``limit`` rows as (position from 1, row), the file's columns, and its words.

    JSON Lines go through ``read_rows``, not ``datasets``: it names the line of bad JSON or of
    bytes that are not UTF-8, and refuses an overlong line after reading 1 MiB of it (datasets
    would load the whole file first, and name no line).
    """
    path = Path(path)
    if path.exists() and file_format(path) == ".jsonl":  # a missing file: read_table says so
        rows = list(read_rows(path))
        if not rows:
            raise ValueError(f"{path}: no rows (empty, or blank lines only); a JSON Lines file holds one JSON "
                             "object per line")
        # The columns: every key a line has, in order of first appearance, as datasets reads them.
        return rows[:limit], list(dict.fromkeys(key for _, row in rows for key in row)), LINES
    table = read_table(path)
    if len(table) == 0:
        raise ValueError(f"{path}: no rows; a dataset file holds one prompt per row")
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    return list(enumerate(table.to_list(), 1)), table.column_names, ROWS


def _columns(path: Path, columns: dict[str, Any], present: list[str], words: Words) -> dict[str, str]:
    """Record field -> the file's column it is read from."""
    found = {}
    for name, column in columns.items():
        if isinstance(column, tuple):  # a preset's candidates, the field left out when none is there
            column = next((c for c in column if c in present), None)
            if column is None:
                continue
        elif column not in present:
            raise ValueError(f"{path}: no {words.cell} {column!r} (columns.{name}); the file has "
                             f"{', '.join(present)}; map {name} to one of them")
        found[name] = column
    return found


# --- one row, one record --------------------------------------------------------------------


def _kind(value: Any, words: Words) -> str:
    return words.kinds.get(type(value), f"a {type(value).__name__}")


def _value(row: dict, column: str, where: str, words: Words) -> Any:
    if row.get(column) is None:
        raise ValueError(f"{where}: {words.missing.format(column)}")
    return row[column]


def _text(row: dict, column: str, where: str, words: Words) -> str:
    # A number or a list where text belongs would crash later (``.strip()``) or pass as a prompt.
    value = _value(row, column, where, words)
    if not isinstance(value, str) or not value.strip():
        got = "empty text" if isinstance(value, str) else _kind(value, words)
        raise ValueError(f"{where}: {words.cell} {column!r} must be non-empty text, got {got}; "
                         f"write it as {words.text}")
    return value


def _scalar(row: dict, column: str, where: str, words: Words, optional: bool) -> str | None:
    """A plain answer as text: a number counts (a CSV or parquet column of integers)."""
    value = row.get(column)
    if isinstance(value, (bool, list, dict)):
        # ValueError, not TypeError: to callers this is bad input, like an empty cell.
        raise ValueError(  # noqa: TRY004
            f"{where}: {words.cell} {column!r} must be text or a number, got {_kind(value, words)}; "
            f"write it as {words.text}"
        )
    text = "" if value is None else str(value).strip()
    if not text and not optional:
        raise ValueError(f"{where}: {words.missing.format(column)}")
    return text or None


def _answer(row: dict, cols: dict[str, str], answer_format: str, where: str,
            words: Words) -> tuple[str, str | None]:
    """(gold answer, worked solution or None), as the answer format writes them."""
    if answer_format == "hash":
        column = cols["answer"]
        solution, sep, final = _text(row, column, where, words).rpartition("####")
        if not sep or not final.strip():
            raise ValueError(f"{where}: {words.cell} {column!r} has no '#### N' final answer; end it with "
                             "'#### ' and the number")
        return final.strip().replace(",", ""), _CALC.sub("", solution).strip()
    solution = _text(row, cols["solution"], where, words).strip() if "solution" in cols else None
    answer = (_scalar(row, cols["answer"], where, words, optional=answer_format == "boxed")
              if "answer" in cols else None)
    if answer is None:  # boxed: the solution's last box stands in for a missing answer
        answer = boxed_answer(solution)
        if answer is None:
            column = f" in {words.cell} {cols['answer']!r}" if "answer" in cols else ""
            raise ValueError(f"{where}: no answer{column} and no \\boxed{{}} in {words.cell} "
                             f"{cols['solution']!r}; box the final answer")
    return answer, solution


def _level(value: Any) -> int | None:
    # MATH says "Level 3", MATH-500 says 3: store an int so mixed sets have one column type.
    if isinstance(value, int):
        return value
    found = re.search(r"\d+", str(value))
    return int(found.group()) if found else None


def _record(row: dict, cols: dict[str, str], task: str, answer_format: str | None, where: str,
            words: Words, fallback_id: str) -> dict:
    key = row.get(cols.get("id"))  # an empty id cell falls back as a missing id column does
    record = {"id": f"{task}-{fallback_id if key in (None, '') else key}", "task": task}
    if task == "countdown":
        raw = _value(row, cols["numbers"], where, words)
        target = str(_value(row, cols["target"], where, words)).strip()
        try:
            numbers = [int(x) for x in (raw.split(",") if isinstance(raw, str) else raw)]
            int(target)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: bad countdown numbers/target ({exc}); write the numbers as '30,100,93' "
                             "or a list of integers and the target as an integer") from None
        return {**record, "question": countdown_question(numbers, target), "answer": target, "numbers": numbers}
    record["question"] = _text(row, cols["question"], where, words).strip()
    record["answer"], solution = _answer(row, cols, answer_format, where, words)
    if solution is not None:
        record["solution"] = solution
    if row.get(cols.get("level")) is not None:
        record["level"] = _level(row[cols["level"]])
    if row.get(cols.get("subject")) is not None:
        record["subject"] = row[cols["subject"]]
    return record


def _stem(path: Path) -> str:
    """``test`` for test.jsonl and test.jsonl.gz alike: ids do not depend on the compression."""
    return path.name.split(".")[0]


def import_file(path: Path, task: str, columns: dict[str, Any], answer_format: str | None,
                limit: int | None = None) -> list[dict]:
    """The first ``limit`` rows of a dataset file (all: None) as prompt records.

    ``columns`` maps record fields to the file's columns; a record's id is ``TASK-`` and its id
    cell, else ``TASK-STEM-INDEX`` (the 0-based record: ``gsm8k-test-0``). Errors name the file and
    the line (JSON Lines) or row (counted from 1); two rows with one question or id are refused,
    naming both: the data suites demand both unique, and a duplicate could slip past them by landing
    in the split a suite does not check.
    """
    check_mapping(task, columns, answer_format)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(path)
    rows, present, words = _read(path, limit)
    cols = _columns(path, columns, present, words)
    records, seen = [], {}
    for index, (n, row) in enumerate(rows):
        where = f"{path}, {words.row} {n}"
        record = _record(row, cols, task, answer_format, where, words, f"{_stem(path)}-{index}")
        for key in ("question", "id"):
            first = seen.setdefault((key, record[key]), n)
            if first != n:
                what = "same question" if key == "question" else f"same id {record['id']!r}"
                raise ValueError(f"{where}: duplicate prompt ({what} as {words.row} {first}); remove one of "
                                 f"the two {words.row}s")
        records.append(record)
    return records


def import_benchmark(kind: str, path: Path, limit: int | None = None) -> list[dict]:
    """A file in one of the shipped formats: a key of ``PRESETS`` (gsm8k, math, countdown)."""
    if kind not in PRESETS:
        raise ValueError(f"unknown benchmark kind {kind!r}; expected one of {sorted(PRESETS)}")
    return import_file(path, **PRESETS[kind], limit=limit)


# --- decontamination ------------------------------------------------------------------------


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Word n-grams of normalised text (lowercase, punctuation removed, whitespace-split).

    A text shorter than ``n`` words yields its whole word tuple, so short prompts can still
    match (exactly) instead of escaping decontamination with no grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = _PUNCT.sub("", text.lower()).split()
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _countdown_key(record: dict) -> tuple | None:
    # Countdown prompts share a long template, so n-grams would match every pair; the problem's
    # identity is its multiset of numbers and its target instead.
    if record.get("task") == "countdown" and record.get("numbers") is not None:
        return tuple(sorted(int(x) for x in record["numbers"])), str(record["answer"]).strip()
    return None


def decontaminate(train: list[dict], test: list[dict], n: int = 8) -> tuple[list[dict], int]:
    """Drop train records overlapping any test question; return (kept train, removed count).

    Only the train side is filtered: the test set stays intact so scores remain comparable with
    published numbers. Text prompts overlap when they share a normalised word n-gram; Countdown
    prompts when they pose the same numbers and target.
    """
    test_grams: set[tuple[str, ...]] = set()
    test_keys: set[tuple] = set()
    for record in test:
        key = _countdown_key(record)
        if key is not None:
            test_keys.add(key)
        else:
            test_grams |= ngrams(record.get("question", ""), n)
    kept = []
    for record in train:
        key = _countdown_key(record)
        if key is not None:
            clean = key not in test_keys
        else:
            clean = test_grams.isdisjoint(ngrams(record.get("question", ""), n))
        if clean:
            kept.append(record)
    return kept, len(train) - len(kept)
