"""The one module that talks to the stage store, an S3 bucket shared by workers (without one,
the workspace alone holds the stages).

    store = Store.at("s3://bucket/prefix")        # fsspec + s3fs
    store.put(folder, "stages/grpo/<key>")        # every file, then the manifest, last
    store.get("stages/grpo/<key>", local)         # downloaded and checked against the manifest
    objects = data_objects("s3://bucket/countdown/", "data.train_path")   # new data: read as one dataset
    fetch_objects(objects, local)                 # each checked against the size and checksum listed

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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

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


# --- data files in the bucket (``data.train_path: s3://...``) --------------------------------
def data_objects(url: str, what: str) -> list[dict]:
    """What a data URL names, in a stable order: that one object, or (a URL ending in ``/``) every
    object under the prefix, sorted by name, so that new data arrives as one more file. Each
    object: its URL, its name relative to the URL, its size and its ETag (the server's checksum).
    Errors name ``what``, the URL and what to change."""
    key, prefix = url.removeprefix("s3://"), url.endswith("/")
    bucket, fs = key.split("/", 1)[0], Store.at(url).fs
    try:
        try:
            found = fs.find(key.rstrip("/"), detail=True) if prefix else {key: fs.info(url)}
        except FileNotFoundError:
            found = {}
        bucket_exists = bool(found) or fs.exists(bucket)
    except PermissionError:
        raise PermissionError(f"{what} {url}: access denied; the keys in AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY must be allowed to list and read it") from None
    if not bucket_exists:
        raise FileNotFoundError(f"{what} {url}: no such bucket {bucket!r}; create it or correct the URL")
    if not prefix and not found:
        raise FileNotFoundError(f"{what} {url}: no such object; upload the file, or end the URL with / to read "
                                "every object under that prefix")
    if not prefix and found[key]["type"] == "directory":
        raise FileNotFoundError(f"{what} {url}: a prefix, not an object; end the URL with / to read every object "
                                "under it")
    start = key if prefix else key.rsplit("/", 1)[0] + "/"
    objects = [{"url": f"s3://{name}", "name": name.removeprefix(start), "size": info["size"],
                "etag": str(info.get("ETag", "")).strip('"')}
               for name, info in sorted(found.items()) if info["type"] == "file"]
    if not objects:
        raise FileNotFoundError(f"{what} {url}: no objects under this prefix; upload a data file there")
    return objects


def objects_key(objects: list[dict]) -> str:
    """The content key of a listing: names, sizes and checksums (no object is downloaded)."""
    listed = [{k: o[k] for k in ("name", "size", "etag")} for o in objects]
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()[:16]


_MD5 = re.compile("^[0-9a-f]{32}$")  # a single-part upload's ETag; a multipart one is "<md5>-<parts>"


def fetch_objects(objects: list[dict], folder: Path) -> list[Path]:
    """Download listed objects into ``folder``, each checked against its listed size and, where
    the ETag is one, its MD5: what is read is what was keyed. Each is saved under its place in
    the listing and its base name (its format is by suffix), never under a name the bucket
    gives: a name holding ``..`` or a leading ``/`` would write outside ``folder``."""
    fs = Store.at(objects[0]["url"]).fs
    paths = [folder / f"{i:05d}-{PurePosixPath(o['name']).name}" for i, o in enumerate(objects)]
    folder.mkdir(parents=True, exist_ok=True)
    fs.get([o["url"] for o in objects], [str(p) for p in paths])
    for o, path in zip(objects, paths, strict=True):
        with path.open("rb") as f:
            md5 = hashlib.file_digest(f, "md5").hexdigest() if _MD5.match(o["etag"]) else o["etag"]
        if path.stat().st_size != o["size"] or md5 != o["etag"]:
            raise CorruptObject(f"{o['url']}: changed or damaged while it was read (size or checksum differs from "
                                "its listing); run again")
    return paths
