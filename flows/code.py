"""The code a worker on another machine runs: this checkout's files, uploaded to the stage store
under their content hash, and a Prefect pull step that fetches them into each flow run's folder.
A worker then needs no checkout of its own, at any path: only the project's environment.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from components.digest import tree_sha256
from components.store import Store

SKIPPED = (".git", ".venv", ".r1flow", "data", "__pycache__", ".pytest_cache", ".ruff_cache")


def code_files(root: Path) -> list[str]:
    """What git tracks, plus untracked files it does not ignore; without git, every file outside
    generated folders."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                                capture_output=True, check=True).stdout.decode().split("\0")
        return sorted(f for f in listed if f and (root / f).is_file())
    except (OSError, subprocess.CalledProcessError):
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                      if p.is_file() and not set(p.relative_to(root).parts) & set(SKIPPED))


def upload_code(root: Path, store: str) -> str:
    """Upload the checkout's files to ``<store>/code/<hash>`` (once per content); returns the URL."""
    files = code_files(root)
    relative, remote = f"code/{tree_sha256(root, files)[:16]}", Store.at(store)
    if remote.manifest(relative) is None:
        with tempfile.TemporaryDirectory() as scratch:
            for name in files:
                (Path(scratch) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, Path(scratch) / name)
            remote.put(Path(scratch), relative)
    return remote.path(relative)


def with_pull_step(prefect_file: Path, store: str, root: Path) -> tuple[Path, str]:
    """A copy of ``prefect_file`` whose deployments pull the uploaded code (written beside it, so
    entrypoints resolve alike); returns (that file, the code's URL)."""
    url = upload_code(root, store)
    spec = yaml.safe_load(prefect_file.read_text())
    spec["pull"] = [{"prefect.deployments.steps.pull_from_remote_storage": {"url": url}}]
    pulled = prefect_file.with_name(f".{prefect_file.stem}-pull.yaml")
    pulled.write_text(yaml.safe_dump(spec, sort_keys=False))
    return pulled, url
