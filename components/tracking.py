"""The one module that talks to MLflow: runs, step metrics, artifacts, the model registry.

Runs are addressed by id through ``MlflowClient`` (not the thread-local active-run stack), so
Prefect tasks on any thread can log to the pipeline's parent run and their own child run.
Default store: SQLite plus a local artifact folder inside the workspace.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

PRIMARY_METRIC = "pass_at_1"


def default_uri(workspace: Path) -> str:
    return f"sqlite:///{(workspace / 'mlflow.db').resolve()}"


def metric_name(key: str) -> str:
    """MLflow metric names allow ``[/\\w.\\- :]``: ``pass@1`` becomes ``pass_at_1``."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


class Tracker:
    """A pipeline's view of one MLflow experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = artifact_root.resolve().as_uri() if artifact_root and uri.startswith("sqlite") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id

    # --- runs -----------------------------------------------------------------------------
    def start_run(self, name: str, parent: str | None = None, tags: dict | None = None) -> str:
        tags = {**{k: str(v) for k, v in (tags or {}).items()}, "mlflow.runName": name,
                **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        items = [Metric(metric_name(k), float(v), _now_ms(), step) for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000])

    def log_metrics_file(self, run_id: str, path: Path) -> int:
        """Replay a stage's ``metrics.jsonl`` as step metrics (training curves); returns rows."""
        if not path.exists():
            return 0
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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

    def champion(self, name: str):
        """The version holding ``champion``, or None."""
        try:
            return self.client.get_model_version_by_alias(name, "champion")
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def tag_version(self, name: str, version: str, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, str(value))


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
