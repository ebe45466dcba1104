"""The one module that talks to MLflow: runs, step metrics, artifacts, the model registry.

Runs are addressed by id through ``MlflowClient`` (not the thread-local active-run stack), so
Prefect tasks on any thread can log to the pipeline's parent run and their own child run.
Default store: SQLite plus a local artifact folder inside the workspace. What the rest of r1flow
gets back are plain records (``RunRecord``, ``VersionRecord``), never MLflow's own types, so no
other module imports ``mlflow`` (``tests/test_boundaries.py`` checks it).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.stage_io import read_metrics

PRIMARY_METRIC = "pass_at_1"


class NotFound(LookupError):
    """A run or registered version that the tracking store does not hold; the message names it."""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    status: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None  # wall time, once finished


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: str
    run_id: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # as the registry read it (search results may leave them out)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


def metric_name(key: str) -> str:
    """MLflow metric names allow ``[/\\w.\\- :]``: ``pass@1`` becomes ``pass_at_1``."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


class Tracker:
    """A pipeline's view of one MLflow experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        # Two processes opening a new SQLite store at once would both migrate it ("duplicate
        # column name"): one at a time, under a lock file beside the database.
        database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        with FileLock(f"{database}.lock") if database else nullcontext():
            self.client = MlflowClient(uri)
            self.experiment_id = self._experiment(experiment, artifact_root)

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = artifact_root.resolve().as_uri() if artifact_root and self.uri.startswith("sqlite") else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            if (found := self.client.get_experiment_by_name(name)) is None:
                raise
            return found.experiment_id

    # --- runs -----------------------------------------------------------------------------
    def start_run(self, name: str, parent: str | None = None, tags: dict | None = None) -> str:
        tags = {**{k: str(v) for k, v in (tags or {}).items()}, "mlflow.runName": name,
                **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    @contextmanager
    def child_run(self, name: str, parent: str | None, tags: dict | None = None,
                  run_id: str | None = None) -> Iterator[str]:
        """A stage's MLflow run (``run_id``: one made earlier, e.g. before a stage is sent to a
        worker): finished on success, marked failed on any exception, Ctrl-C included."""
        run_id = run_id or self.start_run(name, parent, tags)
        try:
            yield run_id
        except BaseException:
            self.finish(run_id, ok=False)
            raise
        self.finish(run_id)

    # --- queries --------------------------------------------------------------------------
    def run(self, run_id: str) -> RunRecord:
        try:
            return _record(self.client.get_run(run_id))
        except MlflowException:
            raise NotFound(f"no MLflow run {run_id!r} in {self.uri}") from None

    def child_runs(self, parent: str) -> dict[str, RunRecord]:
        """A pipeline run's stage runs by name, in the order they started."""
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                                       order_by=["attributes.start_time ASC"], max_results=1000)
        return {r.info.run_name: _record(r) for r in runs}

    def computed_run(self, stage_key: str) -> RunRecord | None:
        """The finished stage run that computed the output with this key (not one that reused it)."""
        if not _SAFE_NAME.fullmatch(stage_key):
            raise ValueError(f"stage key with unexpected characters: {stage_key!r}")
        runs = self.client.search_runs([self.experiment_id], f"tags.stage_key = '{stage_key}' and tags.cached = "
                                       "'False' and attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time ASC"], max_results=1)
        return _record(runs[0]) if runs else None

    def pipeline_runs(self, limit: int = 10) -> list[RunRecord]:
        """The newest finished pipeline (parent) runs, newest first: not a stage's child run, nor
        an ``r1flow eval`` run (tagged ``benchmark``)."""
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'FINISHED'",
                                       order_by=["attributes.start_time DESC"], max_results=1000)
        return [_record(r) for r in runs if not {"mlflow.parentRunId", "benchmark"} & set(r.data.tags)][:limit]

    def benchmark_runs(self, benchmark: str) -> list[RunRecord]:
        """The finished ``r1flow eval`` runs on a benchmark, newest first."""
        runs = self.client.search_runs([self.experiment_id], f"tags.benchmark = '{benchmark}' and "
                                       "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
        return [_record(r) for r in runs]

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(run_id, metric_name(key)))

    def read_artifact(self, run_id: str, path: str) -> str:
        """The text of one file logged on a run."""
        with tempfile.TemporaryDirectory() as folder:
            try:
                return Path(self.client.download_artifacts(run_id, path, folder)).read_text()
            except (MlflowException, OSError):
                raise NotFound(f"run {run_id} has no artifact {path!r}") from None

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        items = [Metric(metric_name(k), float(v), _now_ms(), step) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_metrics_file(self, run_id: str, path: Path) -> int:
        """Replay a stage's ``metrics.jsonl`` as step metrics (training curves); returns rows."""
        rows = read_metrics(path, finished=True)
        now = _now_ms()  # replayed after the stage: the UI's time axis shows when it was logged
        items = [Metric(metric_name(k), float(v), now, int(row["step"]))
                 for row in rows for k, v in row.items() if k != "step" and isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])
        return len(rows)

    def log_dict(self, run_id: str, values: dict, artifact_file: str) -> None:
        self.client.log_dict(run_id, values, artifact_file)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    # --- registry -------------------------------------------------------------------------
    def register(self, run_id: str, model_dir: Path, name: str, tags: dict) -> str:
        """Log a Hugging Face folder under the run's ``model/`` and register it as a new version.

        The version's source is the folder itself, so ``models:/<name>@champion`` downloads
        something ``AutoModelForCausalLM.from_pretrained`` and vLLM load directly.
        """
        self.client.log_artifacts(run_id, str(model_dir), "model")
        if not self.client.search_registered_models(f"name = '{name}'"):
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/model"
        version = self.client.create_model_version(
            name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}).version
        self.client.set_registered_model_alias(name, "candidate", version)
        return str(version)

    def version(self, name: str, version: str) -> VersionRecord:
        """``NAME/VERSION`` (a number) or ``NAME@ALIAS``, as a record; NotFound names what is missing."""
        if not _SAFE_NAME.fullmatch(name) or not _SAFE_NAME.fullmatch(version):
            raise NotFound(f"{name!r}/{version!r}: a registered model name and version are letters, digits, "
                           "'.', '-' and '_'")
        try:
            found = (self.client.get_model_version(name, version) if version.isdigit()
                     else self.client.get_model_version_by_alias(name, version))
        except MlflowException:
            raise NotFound(f"no registered model version {name}{'/' if version.isdigit() else '@'}{version} "
                           f"in {self.uri}") from None
        return _version(found)

    def version_by_stage_key(self, name: str, stage_key: str) -> VersionRecord | None:
        """The version registered for a stage output (its key), if any: one version per output."""
        if not _SAFE_NAME.fullmatch(name) or not _SAFE_NAME.fullmatch(stage_key):
            raise ValueError(f"registry name or stage key with unexpected characters: {name!r}, {stage_key!r}")
        found = self.client.search_model_versions(f"name = '{name}' and tags.stage_key = '{stage_key}'")
        return _version(found[0]) if found else None

    def complete_registration(self, version: VersionRecord) -> None:
        """Give ``candidate`` to the newest version when it has no alias yet: a run killed between
        creating a version and aliasing it leaves exactly that, and its rerun finds the version
        by stage key instead of registering it again."""
        newest = max(int(v.version) for v in self.client.search_model_versions(f"name = '{version.name}'"))
        if int(version.version) == newest and not self.client.get_model_version(version.name, version.version).aliases:
            self.client.set_registered_model_alias(version.name, "candidate", version.version)

    def versions(self, name: str) -> list[VersionRecord]:
        """Every version of a registered model, oldest first; NotFound when there is none."""
        if not _SAFE_NAME.fullmatch(name):
            raise NotFound(f"{name!r}: a registered model name is letters, digits, '.', '-' and '_'")
        found = self.client.search_model_versions(f"name = '{name}'")
        if not found:
            raise NotFound(f"no registered model {name!r} in {self.uri}")
        return sorted((_version(v) for v in found), key=lambda v: int(v.version))

    def champion(self, name: str) -> VersionRecord | None:
        """The version holding ``champion``, or None."""
        try:
            return self.version(name, "champion")
        except NotFound:
            return None

    def download_model(self, version: VersionRecord, target: Path) -> Path:
        """A registered version's Hugging Face folder, downloaded once to ``target``."""
        if not (target / "config.json").exists():
            tmp = target.parent / f".{target.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.client.download_artifacts(version.run_id, "model", str(tmp))
            shutil.rmtree(target, ignore_errors=True)
            (tmp / "model").rename(target)
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def tag_version(self, name: str, version: str, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, str(value))


_SAFE_NAME = re.compile(r"\w[\w.\-]*")  # what r1flow's names and keys are made of: safe inside a filter string


def _record(run) -> RunRecord:
    info = run.info
    seconds = (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None
    return RunRecord(info.run_id, info.run_name, info.status, dict(run.data.tags), dict(run.data.params),
                     dict(run.data.metrics), seconds)


def _version(found) -> VersionRecord:
    return VersionRecord(found.name, str(found.version), found.run_id, found.source, dict(found.tags),
                         tuple(found.aliases or ()))


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)
