"""One writer at a time for what two runs may both want to make: a stage's keyed output, the
registry's versions of one profile.

Two runs of one profile at once (a nightly schedule firing during a manual run) each reach a stage
with the same key; the first trains it, the other waits and then finds it cached. With a Prefect
server (``PREFECT_API_URL``) the lock is a Prefect global concurrency limit of 1 named after what
it guards, so runs on other machines that share the server wait too; a lease that its holder
stops renewing (the process was killed) expires after ``LEASE`` seconds. Without one, it is a file
lock in the workspace, released by the kernel when its holder dies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LEASE = 60.0  # seconds a killed holder keeps a Prefect slot before others may take it


@contextmanager
def exclusive(name: str, folder: Path, waiting: str = "") -> Iterator[None]:
    """Hold the lock ``name`` (a Prefect limit, else ``folder/.lock-<name>``); ``waiting`` is
    printed when another holder makes this one wait."""
    name = re.sub(r"[^\w.-]", "-", name)
    if os.environ.get("PREFECT_API_URL"):
        with _prefect_limit(f"r1flow-{name}", waiting):
            yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f".lock-{name}")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(waiting)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _prefect_limit(name: str, waiting: str) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    if _held(name):
        _say(waiting)
    with concurrency(name, lease_duration=LEASE, strict=True):
        yield


def _held(name: str) -> bool:
    """Whether the limit's slot is taken now, creating the limit (of 1) on first use."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).active_slots > 0
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
            return False


def _say(waiting: str) -> None:
    if waiting:
        print(waiting, flush=True)
