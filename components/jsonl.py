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
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A record is a prompt or a trace: kilobytes. A longer line is a broken export or the wrong file,
# and reading it whole would take its size in memory before json could even refuse it.
MAX_LINE_BYTES = 1 << 20


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file (or .jsonl.gz).

    Every error names the file and the line: invalid JSON, a non-object, bytes that are not UTF-8,
    a line over ``MAX_LINE_BYTES`` (refused after reading at most that much of it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    # Public sources ship gzipped (sources/*.jsonl.gz); the content is the same either way.
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as fh:
        lineno = 0
        while raw := _readline(fh, path):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}, line {lineno}: longer than {MAX_LINE_BYTES} bytes, the "
                                 "limit for one record; put one record per line")
            row = _parse(raw, path, lineno)
            if row is not None:
                yield lineno, row


def _readline(fh, path: Path) -> bytes:
    # One byte over the cap is enough to know the line is too long.
    try:
        return fh.readline(MAX_LINE_BYTES + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        # No line number: gzip decompresses ahead of the line being read.
        raise ValueError(f"{path}: not a readable gzip file ({exc}); recompress it or drop the "
                         ".gz suffix") from None


def _parse(raw: bytes, path: Path, lineno: int) -> dict[str, Any] | None:
    """One line's object; None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"byte {raw[exc.start]:#04x} at offset {exc.start}"
        raise ValueError(
            f"{path}, line {lineno}: not UTF-8 ({where}); save the file as UTF-8"
        ) from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                         "each line must be one JSON object") from exc
    if not isinstance(row, dict):
        # ValueError, not TypeError: to callers this is just another malformed line.
        kind = type(row).__name__
        raise ValueError(  # noqa: TRY004
            f"{path}, line {lineno}: expected a JSON object, got {kind}"
        )
    return row


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
