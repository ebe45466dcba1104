"""Data validation gates: Great Expectations suites run on every dataset before a stage uses it.

A training or evaluation stage must never consume a broken dataset silently: duplicate prompts
inflate metrics, ungradeable gold answers turn rewards into noise, and malformed or wrong traces
teach the model the wrong thing. ``validate_records`` builds a pandas frame from JSONL-style
records, adds derived boolean columns for the checks GX has no built-in for (gold answer parses,
trace is in R1 format, trace is correct), runs one GX suite per dataset kind and either returns a
small JSON-able report or raises ``DataValidationError`` naming the failed expectations and the
offending row indices (0-based record positions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from components.jsonl import load_jsonl
from components.rewards import TASKS, extract_answer, gold_parses, grade, well_formed

KINDS = ("prompts", "sft", "rejection_sampled", "eval")
_TRACE_KINDS = ("sft", "rejection_sampled")
_MAX_ROWS_SHOWN = 10
E = gx.expectations


class DataValidationError(ValueError):
    """A dataset failed its suite; ``report`` holds the full per-expectation report."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Bounds:
    """Character-length limits; over-long rows are usually scraping or generation accidents."""

    min_question_chars: int = 1
    max_question_chars: int = 4000
    max_completion_chars: int = 16000


def _required_columns(kind: str) -> list[str]:
    return ["id", "task", "question", "answer"] + (["completion"] if kind in _TRACE_KINDS else [])


def _guarded(check: Callable[[dict], bool]) -> Callable[[dict], bool]:
    # A grader that crashes on a malformed row (None answer, unknown task) marks that row bad
    # instead of aborting validation, so the report still lists every offending row.
    def run(record: dict) -> bool:
        try:
            return bool(check(record))
        except Exception:  # noqa: BLE001 - any grader crash means "bad row"
            return False

    return run


@_guarded
def _parseable(r: dict) -> bool:
    return gold_parses(r["answer"], r["task"], r.get("entry"))


@_guarded
def _well_formed(r: dict) -> bool:
    return well_formed(r["completion"])


@_guarded
def _correct(r: dict) -> bool:
    return grade(extract_answer(r["completion"]), r)


def _frame(records: list[dict], kind: str) -> pd.DataFrame:
    required = _required_columns(kind)
    # An empty list yields a column-less frame; give it the schema so only the row count fails.
    df = pd.DataFrame(records) if records else pd.DataFrame(columns=required)
    present = set(df.columns)
    # Derived columns are computed from the raw dicts (numbers is ragged) and only when their
    # inputs exist; a missing input is reported by expect_column_to_exist, not a KeyError.
    if {"answer", "task"} <= present:
        df["answer_parseable"] = [_parseable(r) for r in records]
    if kind in _TRACE_KINDS and "completion" in present:
        df["trace_well_formed"] = [_well_formed(r) for r in records]
    if kind == "rejection_sampled" and {"answer", "task", "completion"} <= present:
        df["trace_correct"] = [_correct(r) for r in records]
    return df


def _expectations(kind: str, columns: set[str], bounds: Bounds) -> list:
    required = _required_columns(kind)
    out: list = [E.ExpectTableRowCountToBeBetween(min_value=1)]
    out += [E.ExpectColumnToExist(column=c) for c in required]
    has = columns.__contains__
    out += [
        E.ExpectColumnValuesToNotBeNull(column=c) for c in ("id", "question", "answer") if has(c)
    ]
    # Text fields must be strings: a number in `question` would pass the length check unseen.
    out += [E.ExpectColumnValuesToBeOfType(column=c, type_="str") for c in required if has(c)]
    if has("id"):
        out.append(E.ExpectColumnValuesToBeUnique(column="id"))
    if has("question"):
        if kind in ("prompts", "eval"):
            out.append(E.ExpectColumnValuesToBeUnique(column="question"))
        out.append(
            E.ExpectColumnValueLengthsToBeBetween(
                column="question",
                min_value=bounds.min_question_chars,
                max_value=bounds.max_question_chars,
            )
        )
    if has("task"):
        out.append(E.ExpectColumnValuesToBeInSet(column="task", value_set=list(TASKS)))
    if kind in _TRACE_KINDS and has("completion"):
        out.append(E.ExpectColumnValuesToNotBeNull(column="completion"))
        out.append(
            E.ExpectColumnValueLengthsToBeBetween(
                column="completion", max_value=bounds.max_completion_chars
            )
        )
    if kind == "rejection_sampled" and has("question") and has("completion"):
        out.append(E.ExpectCompoundColumnsToBeUnique(column_list=["question", "completion"]))
    # Derived flags must be all True.
    out += [
        E.ExpectColumnValuesToBeInSet(column=c, value_set=[True])
        for c in ("answer_parseable", "trace_well_formed", "trace_correct")
        if has(c)
    ]
    return out


def _run_suite(df: pd.DataFrame, expectations: list, name: str) -> list:
    # A fresh ephemeral context per call costs ~10 ms (measured), so nothing is cached: no name
    # clashes across calls and no suites piling up in a long-lived process.
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_pandas("r1flow")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
    )
    suite = ctx.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    return definition.run(batch_parameters={"dataframe": df}, result_format="COMPLETE").results


def _describe(result: Any, ids: list | None = None) -> tuple[dict, str]:
    """One report entry and the failure text for one expectation result; offending rows are
    named by position and, where the set has them, by id (an imported record's id carries its
    source line, a position in a shuffled split does not)."""
    config, details = result.expectation_config, result.result or {}
    column = config.kwargs.get("column") or ",".join(config.kwargs.get("column_list") or []) or None
    rows = list(details.get("unexpected_index_list") or [])
    entry = {
        "expectation": config.type,
        "column": column,
        "success": bool(result.success),
        "unexpected_count": int(details.get("unexpected_count") or len(rows)),
    }
    if (result.exception_info or {}).get("raised_exception"):
        detail = f"error: {result.exception_info.get('exception_message')}"
    elif rows:
        more = f" (+{len(rows) - _MAX_ROWS_SHOWN} more)" if len(rows) > _MAX_ROWS_SHOWN else ""
        shown = [int(i) for i in rows[:_MAX_ROWS_SHOWN]]
        named = f" (ids {[ids[i] for i in shown]})" if ids is not None else ""
        detail = f"rows {shown}{more}{named}"
    elif config.type == "expect_column_to_exist":
        detail = "column missing"
    else:
        detail = f"observed {details.get('observed_value')!r}"
    return entry, f"{config.type}({column or 'table'}): {detail}"


def validate_records(
    records: list[dict], kind: str, name: str, bounds: Bounds | None = None
) -> dict:
    """Run the suite for ``kind`` on ``records``; return the report or raise DataValidationError."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    df = _frame(records, kind)
    results = _run_suite(df, _expectations(kind, set(df.columns), bounds or Bounds()), kind)
    ids = list(df["id"]) if "id" in df.columns else None
    described = [_describe(r, ids) for r in results]
    failures = [text for entry, text in described if not entry["success"]]
    report = {
        "dataset": name,
        "kind": kind,
        "rows": len(df),
        "success": not failures,
        "expectations": [entry for entry, _ in described],
    }
    if failures:
        raise DataValidationError(
            f"dataset {name!r} ({kind}) failed {len(failures)} expectation(s): "
            + "; ".join(failures),
            report,
        )
    return report


def validate_file(
    path: Path, kind: str, name: str | None = None, bounds: Bounds | None = None
) -> dict:
    """Validate a JSONL file (one JSON object per line; blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    return validate_records(load_jsonl(path), kind, name or path.stem, bounds)
