"""JSONL files, the format every dataset between stages is written in.

    records = load_jsonl(path)        # errors name the file and the line
    write_jsonl(path, records)        # atomic: readers never see half a file

Its own module so that a stage's code key changes only when the code it runs changes: every
stage reads JSONL, but few import benchmark parsing.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file (or .jsonl.gz)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    # Public sources ship gzipped (sources/*.jsonl.gz); the content is the same either way.
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                # ValueError, not TypeError: to callers this is just another malformed line.
                kind = type(row).__name__
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {kind}")  # noqa: TRY004
            yield lineno, row


def load_jsonl(path: Path) -> list[dict]:
    """All records of a JSONL file; errors name the file and the offending line."""
    return [row for _, row in read_rows(path)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write records atomically: readers (and DVC) never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp file must live in the same directory for os.replace to be an atomic rename.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
