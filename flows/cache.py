"""A keyed stage folder's whole life: scratch → install → publish; fetch; discard.

A stage's output lives in ``<workspace>/stages/<name>/<key>``. It is written in a scratch folder
and renamed into place when complete, so a folder that exists is whole; its ``manifest.json``
(each file's size and sha256) is checked whenever it is reused, and a damaged folder is discarded,
never used. With a stage store (``profile.store``: an S3 bucket shared by workers on other
machines), every completed folder is published to ``stages/<name>/<key>/`` with its manifest
written last, and the workspace is this worker's cache of it: a folder found in the store is
fetched once, checked against its manifest, and reused. Checkpoints of an unfinished stage live
beside its folders, and in the store while it trains, so a stage killed on one worker resumes on
another.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from components.config import Profile
from components.store import MANIFEST, Store, damage, write_manifest


def stage_folder(workspace: Path, name: str, key: str) -> Path:
    return workspace / "stages" / name / key


def checkpoint_folder(workspace: Path, name: str, key: str) -> Path:
    """Complete checkpoints of an unfinished stage, kept across attempts until it completes."""
    return workspace / "stages" / name / f".checkpoints-{key}"


def store_of(profile: Profile) -> Store | None:
    """The profile's shared stage store; None when the workspace alone holds the stages."""
    return Store.at(profile.store) if profile.store else None


def checkpoint_url(store: Store | None, name: str, key: str) -> str | None:
    return store.path(f"checkpoints/{name}/{key}") if store is not None else None


def fetch(store: Store | None, workspace: Path, name: str, key: str) -> bool:
    """Make a stage's complete keyed folder present in the workspace: already here and whole, or
    downloaded from the store and checked against its manifest. False: neither has it."""
    final = stage_folder(workspace, name, key)
    if (final / "result.json").exists():
        if (problem := damage(final)) is None:
            return True
        print(f"{name}: {problem}; the cached folder is discarded", flush=True)  # fetched again, or rerun
        discard(final)
    if store is None:
        return False
    tmp = scratch_folder(final)
    if not store.get(f"stages/{name}/{key}", tmp):
        return False
    install(tmp, final)
    print(f"{name}: fetched from {store.path(f'stages/{name}/{key}')}", flush=True)
    return True


def publish(store: Store | None, folder: Path, name: str, key: str, missing_only: bool = False) -> None:
    """Upload a completed stage folder and drop its checkpoints from the store. ``missing_only``:
    a folder reused from this disk that the store lacks (its worker was killed between finishing
    and uploading)."""
    relative = f"stages/{name}/{key}"
    if store is None or (missing_only and store.manifest(relative) is not None):
        return
    store.put(folder, relative)
    for checkpoint in store.folders(f"checkpoints/{name}/{key}"):
        store.remove(f"checkpoints/{name}/{key}/{checkpoint}")


def build(workspace: Path, name: str, key: str, make: Callable[[Path], object]) -> Path:
    """A stage's keyed folder made by ``make(scratch)`` in this process and installed; nothing is
    left if it fails."""
    final = stage_folder(workspace, name, key)
    tmp = scratch_folder(final)
    try:
        make(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install(tmp, final)
    return final


def scratch_folder(final: Path) -> Path:
    """This process's temporary folder for ``final``, after removing any that a killed process
    left (its pid is gone): a crash leaves nothing half-written behind once the stage runs again."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".*-{final.name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def install(tmp: Path, final: Path) -> None:
    """Rename a completed folder into place (atomic: the keyed folder appears only when whole),
    with the manifest of its files' sha256 that every later use checks; a forced rerun's old
    folder steps aside first."""
    if not (tmp / MANIFEST).exists():
        write_manifest(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def discard(final: Path) -> None:
    """Remove a keyed folder: renamed aside first, so no reader ever sees it half-deleted."""
    aside = final.parent / f".old-{final.name}-{os.getpid()}"
    os.replace(final, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return True
