"""``r1flow rerun RUN_ID``: reproduce a past pipeline run from what MLflow recorded.

The run's parent MLflow run holds the whole profile (``profile.json``), the git commit of the code
and the DVC pointer of its datasets (``data.dvc``). A rerun checks the datasets out of the DVC
remote byte for byte, runs the recipe on them with that profile, and compares every evaluation
metric with the recorded one. On CPU with the same seeds they match exactly (every stage seeds
its RNGs and runs deterministic kernels), so the default tolerance is 0; across machines or on
GPUs, floating-point order differs and a tolerance is the honest comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from components import versioning
from components.config import Profile
from components.tracking import Tracker, metric_name
from flows.pipeline import code_commit, r1_pipeline
from flows.workspace import Place, locate


@dataclass
class Comparison:
    metric: str
    recorded: float
    reproduced: float

    def matches(self, tolerance: float) -> bool:
        return abs(self.recorded - self.reproduced) <= tolerance


def recorded_run(tracker: Tracker, run_id: str) -> tuple[dict, str, dict]:
    """(profile, DVC pointer text, tags) of a past pipeline run; a clear error when it is not one."""
    run = tracker.run(run_id)
    if "mlflow.parentRunId" in run.tags or "data_hash" not in run.tags:
        raise ValueError(f"run {run_id} is not a completed r1flow pipeline run (no data_hash tag)")
    return json.loads(tracker.read_artifact(run_id, "profile.json")), tracker.read_artifact(run_id, "data.dvc"), \
        run.tags


def rerun(run_id: str, place: Place, tracking_uri: str | None = None) -> tuple[dict, list[Comparison], list[str]]:
    """Restore the run's data, run its profile, compare its metrics; returns (summary, comparisons,
    warnings about what differs from the original run's circumstances). The run is looked up
    in ``place``'s store (or ``tracking_uri``), and rerun under ``place``'s root."""
    tracking_uri = tracking_uri or place.tracking_uri
    tracker = Tracker(tracking_uri, place.experiment)
    root = place.root
    profile, pointer, tags = recorded_run(tracker, run_id)
    warnings = []
    now = code_commit()
    if tags.get("git_commit") and now.get("git_commit") != tags["git_commit"]:
        warnings.append(f"code is at {now.get('git_commit', 'unknown')[:12]}, the run used "
                        f"{tags['git_commit'][:12]}: `git checkout {tags['git_commit'][:12]}` to reproduce exactly")
    if tags.get("git_dirty") == "True" or now.get("git_dirty"):
        warnings.append("uncommitted changes (then or now): the code may differ from the commit")

    workspace = locate(Profile.model_validate(profile), root).workspace  # the run's own workspace setting
    data_hash = versioning.restore(root, pointer, versioning.remote_url(profile.get("store"), workspace),
                                   profile["data_dir"])
    if data_hash != tags["data_hash"]:
        raise ValueError(f"DVC restored {data_hash}, the run recorded {tags['data_hash']}")
    profile["tracking"]["tracking_uri"] = tracking_uri
    config = workspace / "reruns" / f"{run_id}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(profile, sort_keys=False))
    data_run = tracker.child_runs(run_id).get("data")  # its data stage key: what the run's keys descend from
    summary = r1_pipeline(config=str(config), root=str(root), restored=str(root / profile["data_dir"]),
                          restored_key=data_run.tags.get("stage_key") if data_run else None, reproduces=run_id)
    recorded = tracker.run(run_id).metrics
    comparisons = [Comparison(f"{role}.{key}", recorded[name], float(value))
                   for role, metrics in summary["metrics"].items() for key, value in metrics.items()
                   if (name := metric_name(f"{role}.{key}")) in recorded]
    return summary, comparisons, warnings
