"""The one module that talks to the stage store, an S3 bucket shared by workers (without one,
the workspace alone holds the stages).

    store = Store.at("s3://bucket/prefix")        # fsspec + s3fs
    store.put(folder, "stages/grpo/<key>")        # every file, then the manifest, last
    store.get("stages/grpo/<key>", local)         # downloaded and checked against the manifest

S3 has no atomic folder rename, so a folder in the store is complete if and only if its
``manifest.json`` (file list, sizes, sha256) exists, and the manifest is written after every file
it lists. Readers check each byte they download against it. Credentials and the endpoint come from
the environment only (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3``),
never from a profile, so no URL or spec here ever holds one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.digest import file_sha256

MANIFEST = "manifest.json"


class CorruptObject(ValueError):
    """A downloaded file differs from what its manifest says; the message names it."""


def manifest_of(folder: Path) -> dict:
    """Every file under ``folder`` (the manifest aside), with its size and sha256."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                      for p in files}}


def write_manifest(folder: Path) -> dict:
    manifest = manifest_of(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def damage(folder: Path) -> str | None:
    """The first file of a local folder that differs from its manifest (size, then sha256), named;
    None when all match. A folder from before manifests gets one now."""
    if not (folder / MANIFEST).exists():
        write_manifest(folder)
        return None
    for name, expected in json.loads((folder / MANIFEST).read_text())["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            return f"{path}: differs from its manifest (missing, size or sha256)"
    return None


def endpoint() -> str | None:
    """The S3 endpoint of a non-AWS server (SeaweedFS, MinIO), from the environment."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@functools.cache
def _s3(endpoint_url: str | None, access_key: str | None):
    """One S3 client per endpoint and key in a process: a new client and its first request took
    0.11 s here (SeaweedFS on loopback), a request on a kept one 0.006 s. No listings cache:
    another worker's upload must be seen at once."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint_url, use_listings_cache=False, skip_instance_cache=True)


@dataclass(frozen=True)
class Store:
    url: str  # s3://bucket/prefix

    @classmethod
    def at(cls, url: str) -> Store:
        return cls(url.rstrip("/"))

    @property
    def fs(self):
        return _s3(endpoint(), os.environ.get("AWS_ACCESS_KEY_ID"))

    def path(self, relative: str) -> str:
        relative = relative.lstrip("/")  # "" is the store's own prefix: its files are "/<name>" under it
        return f"{self.url}/{relative}" if relative else self.url

    def manifest(self, relative: str) -> dict | None:
        """The manifest of a complete folder; None while it is incomplete or absent."""
        try:
            return json.loads(self.fs.cat_file(self.path(f"{relative}/{MANIFEST}")))
        except FileNotFoundError:
            return None

    def put(self, folder: Path, relative: str) -> dict:
        """Upload a complete local folder: every file, then its manifest (what marks it complete).
        A folder uploaded again (a forced rerun) is incomplete while its files are replaced."""
        self._unmark(self.fs, relative)
        manifest = self.put_files(folder, relative)
        self.mark_complete(relative, manifest)
        return manifest

    def put_files(self, folder: Path, relative: str) -> dict:
        """Upload a local folder's files, not yet marked complete (several machines may each put
        their part of one folder); returns their manifest."""
        manifest = manifest_of(folder)
        names = list(manifest["files"])
        if names:  # one call for all files: s3fs sends them concurrently
            self.fs.put([str(folder / n) for n in names], [self.path(f"{relative}/{n}") for n in names])
        return manifest

    def mark_complete(self, relative: str, manifest: dict) -> None:
        self.fs.pipe_file(self.path(f"{relative}/{MANIFEST}"), json.dumps(manifest, indent=1).encode())

    def get(self, relative: str, destination: Path, part: str = "") -> bool:
        """Download a complete folder into ``destination`` (which must not exist yet), each file
        checked against the manifest; False when the store holds no complete folder there.
        ``part``: only the files under that subfolder (one machine's share), without its name."""
        manifest = self.manifest(relative)
        if manifest is None:
            return False
        prefix = f"{part}/" if part else ""
        files = {name.removeprefix(prefix): expected for name, expected in manifest["files"].items()
                 if name.startswith(prefix)}
        fs = self.fs
        destination.mkdir(parents=True)
        try:
            for name in files:
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
            if files:
                fs.get([self.path(f"{relative}/{prefix}{n}") for n in files], [str(destination / n) for n in files])
            for name, expected in files.items():
                target = destination / name
                if target.stat().st_size != expected["size"] or file_sha256(target) != expected["sha256"]:
                    raise CorruptObject(f"{self.path(f'{relative}/{prefix}{name}')}: differs from its manifest "
                                        "(size or sha256); delete the folder's manifest.json to have it rebuilt")
        except BaseException:
            shutil.rmtree(destination, ignore_errors=True)
            raise
        (destination / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        return True

    def write_text(self, relative: str, text: str) -> None:
        """One small object (a note between machines); a reader sees all of it or none."""
        self.fs.pipe_file(self.path(relative), text.encode())

    def read_text(self, relative: str) -> str | None:
        try:
            return self.fs.cat_file(self.path(relative)).decode()
        except FileNotFoundError:
            return None

    def folders(self, relative: str) -> list[str]:
        """The names of the folders directly under ``relative`` (complete or not)."""
        try:
            entries = self.fs.ls(self.path(relative), detail=True)
        except FileNotFoundError:
            return []
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]

    def remove(self, relative: str) -> None:
        """Delete a folder: the manifest first, so that no reader ever takes a half-deleted one."""
        fs = self.fs
        self._unmark(fs, relative)
        if fs.exists(self.path(relative)):
            fs.rm(self.path(relative), recursive=True)

    def _unmark(self, fs, relative: str) -> None:
        try:
            fs.rm_file(self.path(f"{relative}/{MANIFEST}"))
        except FileNotFoundError:
            pass


def stored_folder_key(url: str, what: str) -> str:
    """A folder uploaded to an ``s3://`` URL with its manifest (``r1flow upload``), keyed by the
    manifest's content: the sha256 of every file, without downloading one."""
    manifest = Store.at(url).manifest("")
    if manifest is None:
        raise no_folder(url, what)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def no_folder(url: str, what: str) -> FileNotFoundError:
    """The error for an ``s3://`` folder that was never (completely) uploaded: how to upload it."""
    return FileNotFoundError(f"{what} {url}: no complete folder there (no manifest.json); upload it with "
                             f"`r1flow upload FOLDER {url}`, which lists every file's size and sha256")
