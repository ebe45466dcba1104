"""The one module that talks to DVC: ``data/`` is tracked by ``data.dvc`` and pushed to a remote.

    stage_datasets(data_dir, {"prompts/train.jsonl": path, ...})   # then version_data(root)
    restore_data_stage(data_dir, folder)                           # r1flow rerun

The remote is a folder in the workspace by default, ``dvc/`` in the stage store's bucket with
one. The repository is initialised on first use, so a fresh clone needs no ``dvc init``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import yaml

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from dvc.exceptions import DvcException
from dvc.repo import Repo

from components.stage_io import split_ref

# Where each dataset of a run lives in the DVC-versioned data folder: path -> "stage/file".
DATASETS = {"prompts/train.jsonl": "data/train", "prompts/validation.jsonl": "data/validation",
            "prompts/test.jsonl": "data/test", "traces/cold_start.jsonl": "data/cold_start",
            "traces/rejection_sampled.jsonl": "rejection_sampling/train"}


def stage_datasets(data_dir: Path, files: dict[str, Path]) -> None:
    """Make ``data_dir`` hold exactly this run's datasets (``files``: path inside it -> source),
    keeping ``benchmarks/`` (``r1flow eval``'s imports). Built aside and swapped in whole."""
    staging = data_dir.parent / f".{data_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if (data_dir / "benchmarks").is_dir():
        shutil.copytree(data_dir / "benchmarks", staging / "benchmarks")
    for relative, source in files.items():
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staging / relative)
    shutil.rmtree(data_dir, ignore_errors=True)
    os.replace(staging, data_dir)


def restore_data_stage(data_dir: Path, out: Path) -> dict:
    """The data stage's files, byte for byte, from a data folder DVC restored; returns its result."""
    out.mkdir(parents=True)
    result = {"source": "dvc", "restored_from": str(data_dir)}
    for relative, ref in DATASETS.items():
        stage, name = split_ref(ref)
        if stage == "data":
            shutil.copyfile(data_dir / relative, out / f"{name}.jsonl")
            result[name] = len((out / f"{name}.jsonl").read_text().splitlines())
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def remote_url(store: str | None, workspace: Path) -> str:
    """The DVC remote: ``dvc/`` in the stage store's bucket (dvc-s3; endpoint and credentials
    from the environment), else a folder in the workspace."""
    return f"{store.rstrip('/')}/dvc" if store else str((workspace / "dvc-remote").resolve())


def ensure_repo(root: Path, remote: str) -> None:
    """Initialise DVC in ``root`` if needed and make ``remote`` its default remote, in this
    checkout's own config (``.dvc/config.local``, never committed): each machine names its own."""
    if not (root / ".dvc").is_dir():
        Repo.init(str(root), no_scm=not (root / ".git").exists())
    repo = Repo(str(root))
    try:
        if repo.config["core"].get("remote") != "store" or repo.config["remote"]["store"]["url"] != remote:
            with repo.config.edit("local") as conf:
                conf["remote"]["store"] = {"url": remote}
                conf["core"]["remote"] = "store"
    finally:
        repo.close()


def version_data(root: Path, data_dir: str = "data") -> str:
    """``dvc add`` the data folder, push it to the remote, and return its content hash."""
    repo = Repo(str(root))  # a fresh Repo each time: a reused one fails after cache changes
    try:
        repo.add(str(root / data_dir))
        repo.push()
    finally:
        repo.close()
    return data_hash(root, data_dir)


def data_hash(root: Path, data_dir: str = "data") -> str:
    pointer = yaml.safe_load((root / f"{data_dir}.dvc").read_text())
    return pointer["outs"][0]["md5"]


def remote_status(root: Path) -> dict:
    """What ``dvc status -c`` reports: empty when the remote holds everything tracked."""
    repo = Repo(str(root))
    try:
        return repo.status(cloud=True)
    finally:
        repo.close()


def restore(root: Path, pointer: str, remote: str, data_dir: str = "data") -> str:
    """Check out the data version a ``.dvc`` pointer names, pulled from the remote byte for byte
    (DVC verifies every file's hash); returns its hash. For reruns on a fresh clone."""
    (root / f"{data_dir}.dvc").write_text(pointer)
    ensure_repo(root, remote)
    repo = Repo(str(root))
    try:
        try:
            repo.pull(targets=[str(root / f"{data_dir}.dvc")], force=True)
        except DvcException as error:
            raise ValueError(f"{remote}: dvc pull of data version {data_hash(root, data_dir)} failed: "
                             f"{' '.join(str(error).split())}") from None
        check_restored(repo, root / data_dir, data_hash(root, data_dir), remote)
    finally:
        repo.close()
    return data_hash(root, data_dir)


def check_restored(repo: Repo, folder: Path, version: str, remote: str) -> None:
    """Every restored file against the md5 its data version lists. DVC does not re-hash what it
    downloads unless a remote says ``verify``, and then fails without naming the file: a truncated
    object in the remote was restored silently (measured, dvc 3 on a local remote)."""
    listing = Path(repo.cache.local.oid_to_path(version))
    try:
        entries = json.loads(listing.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{remote}: the listing of data version {version} is missing or damaged "
                         f"({listing}); push that version again from a machine that has it") from None
    for entry in entries:
        path, md5 = folder / entry["relpath"], entry["md5"]
        if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != md5:
            Path(repo.cache.local.oid_to_path(md5)).unlink(missing_ok=True)  # so a mended remote is pulled again
            raise ValueError(f"{path}: the DVC remote's object {remote}/files/md5/{md5[:2]}/{md5[2:]} is damaged "
                             f"(its md5 differs from data version {version}); push it again from a machine "
                             "that has the data")
