"""sha256 of a file or a folder: what stage keys, manifests, pinned GGUF files and uploaded code
are identified by.

    file_sha256(Path("model.gguf"))       # streamed: a file may be gigabytes
    tree_sha256(Path("model"))            # each file's relative name and content, in sorted order
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def file_sha256(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_sha256(folder: Path, names: Iterable[str] | None = None) -> str:
    """One digest of a folder's files (``names``, relative; default every file under it): a file
    renamed or changed changes it."""
    folder = Path(folder)
    if names is None:
        names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}\0{file_sha256(folder / name)}\0".encode())
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """A file's sha256, or a folder's (a ``save_to_disk`` dataset, a model folder)."""
    return tree_sha256(path) if Path(path).is_dir() else file_sha256(path)
