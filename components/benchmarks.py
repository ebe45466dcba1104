"""Benchmark import and decontamination: turn public reasoning datasets into prompt records.

A prompt record is ``{"id", "task", "question", "answer"}``; Countdown adds ``numbers`` and
sources with worked solutions add ``solution`` (raw material for cold-start traces). Importers
take an explicit path, never a default location, so the project does not depend on any data
folder at run time. ``decontaminate`` removes training prompts that overlap a test set, so
benchmark scores measure reasoning rather than recall.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from components.jsonl import read_rows

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_CALC = re.compile(r"<<[^>]*>>")  # GSM8K calculator annotations: "<<16-3-4=9>>"
_PUNCT = re.compile(r"[^\w\s]")


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


def _stem(path: Path) -> str:
    """``test`` for test.jsonl and test.jsonl.gz alike: ids do not depend on the compression."""
    return path.name.split(".")[0]


def _field(row: dict, name: str, path: Path, lineno: int) -> Any:
    if row.get(name) is None:
        raise ValueError(
            f"{path}, line {lineno}: missing required field {name!r}; add it to the line"
        )
    return row[name]


def _text(row: dict, name: str, path: Path, lineno: int) -> str:
    # A number or a list where text belongs would crash later (``.strip()``) or pass as a prompt.
    value = _field(row, name, path, lineno)
    if not isinstance(value, str) or not value.strip():
        got = "empty text" if isinstance(value, str) else f"a JSON {_json_type(value)}"
        raise ValueError(
            f"{path}, line {lineno}: field {name!r} must be non-empty text, got {got}; "
            "write it as a JSON string"
        )
    return value


def _json_type(value: Any) -> str:
    kinds = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return kinds.get(type(value), type(value).__name__)


def _take(path: Path, limit: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    count = 0
    for item in read_rows(path):
        if limit is not None and count >= limit:
            return
        count += 1
        yield item
    if count == 0:
        raise ValueError(
            f"{path}: no rows (empty, or blank lines only); a benchmark file holds one JSON "
            "object per line"
        )


Rows = Iterator[tuple[int, dict]]


def _importer(rows: Callable[[Path, int | None], Rows]) -> Callable[..., list[dict]]:
    """An importer from a generator of (line, record): the file's records, refused when two share
    an id or a question. The data suites demand both unique; here the lines are named, and a
    duplicate cannot slip past them by landing in the split a suite does not check."""

    @functools.wraps(rows)
    def run(path: Path, limit: int | None = None) -> list[dict]:
        path, records, seen = Path(path), [], {}
        for lineno, record in rows(path, limit):
            for key in ("question", "id"):
                first = seen.setdefault((key, record[key]), lineno)
                if first != lineno:
                    what = "same question" if key == "question" else f"same id {record['id']!r}"
                    raise ValueError(f"{path}, line {lineno}: duplicate prompt ({what} as line "
                                     f"{first}); remove one of the two lines")
            records.append(record)
        return records

    return run


@_importer
def import_gsm8k(path: Path, limit: int | None = None) -> Rows:
    """GSM8K: gold answer is the number after ``####``; the text before it is the solution."""
    for lineno, row in _take(path, limit):
        question, full = _text(row, "question", path, lineno), _text(row, "answer", path, lineno)
        solution, sep, final = full.rpartition("####")
        if not sep or not final.strip():
            raise ValueError(f"{path}, line {lineno}: field 'answer' has no '#### N' final answer; "
                             "end it with '#### ' and the number")
        yield lineno, {
            "id": f"gsm8k-{_stem(path)}-{lineno - 1}",
            "task": "gsm8k",
            "question": question.strip(),
            "answer": final.strip().replace(",", ""),
            "solution": _CALC.sub("", solution).strip(),
        }


def _level(value: Any) -> int | None:
    # MATH says "Level 3", MATH-500 says 3: store an int so mixed sets have one column type.
    if isinstance(value, int):
        return value
    found = re.search(r"\d+", str(value))
    return int(found.group()) if found else None


@_importer
def import_math(path: Path, limit: int | None = None) -> Rows:
    """Hendrycks MATH or MATH-500: ``answer`` field when present, else the solution's last box."""
    for lineno, row in _take(path, limit):
        problem = _text(row, "problem", path, lineno)
        solution = _text(row, "solution", path, lineno)
        answer = row.get("answer")
        if isinstance(answer, (bool, list, dict)):
            # ValueError, not TypeError: to callers this is bad input, like a missing field.
            raise ValueError(  # noqa: TRY004
                f"{path}, line {lineno}: field 'answer' must be text or a number, got a JSON "
                f"{_json_type(answer)}; write it as a JSON string"
            )
        if answer is None:
            answer = boxed_answer(solution)
            if answer is None:
                raise ValueError(
                    f"{path}, line {lineno}: no 'answer' field and no \\boxed{{}} in 'solution'"
                )
        key = row.get("unique_id", row.get("idx", f"{_stem(path)}-{lineno - 1}"))
        record = {
            "id": f"math-{key}",
            "task": "math",
            "question": problem.strip(),
            "answer": str(answer).strip(),
            "solution": solution.strip(),
        }
        if row.get("level") is not None:
            record["level"] = _level(row["level"])
        subject = row.get("subject", row.get("type"))
        if subject is not None:
            record["subject"] = subject
        yield lineno, record


def countdown_question(numbers: list[int], target: int | str) -> str:
    """The Countdown prompt text (shared with generators so templates cannot drift apart)."""
    return (
        f"Using the numbers {list(numbers)}, create an equation that equals {target}. "
        "You can use + - * / and each number at most once."
    )


@_importer
def import_countdown(path: Path, limit: int | None = None) -> Rows:
    """Countdown: ``input`` is "30,100,93" (or a list), ``output`` the target."""
    for lineno, row in _take(path, limit):
        raw = _field(row, "input", path, lineno)
        target = str(_field(row, "output", path, lineno)).strip()
        try:
            numbers = [int(x) for x in (raw.split(",") if isinstance(raw, str) else raw)]
            int(target)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}, line {lineno}: bad countdown input/output ({exc})") from exc
        yield lineno, {
            "id": f"countdown-{_stem(path)}-{lineno - 1}",
            "task": "countdown",
            "question": countdown_question(numbers, target),
            "answer": target,
            "numbers": numbers,
        }


IMPORTERS: dict[str, Callable[..., list[dict]]] = {
    "gsm8k": import_gsm8k,
    "math": import_math,
    "math500": import_math,
    "countdown": import_countdown,
}


def import_benchmark(kind: str, path: Path, limit: int | None = None) -> list[dict]:
    """Import a benchmark file of the given kind (a key of ``IMPORTERS``)."""
    if kind not in IMPORTERS:
        raise ValueError(f"unknown benchmark kind {kind!r}; expected one of {sorted(IMPORTERS)}")
    return IMPORTERS[kind](Path(path), limit)


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
