"""Where a run's state is: the one answer every command asks for.

    place = locate(profile)            # root, workspace, tracking URI, experiment

The root is ``root`` when a command passes one, else ``$R1FLOW_ROOT``, else the working
directory; the workspace (stage folders, the SQLite MLflow store, Prefect's home, the DVC
remote) is the profile's ``workspace`` under it, and the data folder its ``data_dir``. The
tracking URI is the profile's, else the SQLite store in the workspace. ``r1flow run`` with
``R1FLOW_ROOT`` set, then ``promote``, ``rerun``, ``eval`` or ``ui`` from anywhere, all open
the same store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from components.config import Profile


@dataclass(frozen=True)
class Place:
    root: Path  # holds the workspace and the DVC-versioned data folder
    workspace: Path
    tracking_uri: str
    experiment: str

    @property
    def artifacts(self) -> Path:
        """Where MLflow puts artifacts of runs this process creates in a local store."""
        return self.workspace / "mlartifacts"


def locate(profile: Profile, root: str | Path | None = None) -> Place:
    base = Path(root or os.environ.get("R1FLOW_ROOT") or ".").resolve()
    workspace = base / profile.workspace
    return Place(base, workspace, profile.tracking.tracking_uri or default_uri(workspace), profile.tracking.experiment)


def default_uri(workspace: Path) -> str:
    """The MLflow store of a run without a tracking server: SQLite in the workspace."""
    return f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
