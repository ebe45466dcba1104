"""What a stage's output leaves in MLflow, the Great Expectations suites its datasets pass, and
the run's report (the eval table across the lineage and the GRPO curves).

One shape for every stage, however it ran (here, on a worker, restored from DVC): its child
run gets the stage key, whether it was a cache hit and the code version; a fresh output also its
training curve and files; an evaluation always its per-sample records, which promotion compares.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from components.reports import eval_table, plot_curves
from components.stage_io import read_metrics
from components.tracking import Tracker, metric_name
from flows.keys import StageOutput, code_version
from flows.recipe import EVALUATED, RECIPE, Step

FILES = ("result.json", "metrics.json", "samples.jsonl", "stage.log")
# Great Expectations keeps its context in a process-wide project manager: stages running at once
# validate one at a time.
_GX = threading.Lock()


def record(tracker: Tracker, out: StageOutput, step: Step) -> None:
    """Tags, metrics and files of a stage output on its MLflow run."""
    tracker.set_tags(out.run_id, {"stage_key": out.key, "cached": out.cached,
                                  "code_version": code_version(step.module)})
    if not out.cached:  # a cache hit's curves and files are already on the run that produced them
        tracker.log_metrics_file(out.run_id, out.folder / "metrics.jsonl")
        for name in FILES:
            if (out.folder / name).exists():
                tracker.log_artifact(out.run_id, out.folder / name)
    elif step.module == "evaluate":  # promotion reads an evaluation's samples from the run it names
        tracker.log_artifact(out.run_id, out.folder / "samples.jsonl")
    result = out.result
    tracker.log_metrics(out.run_id, {**result, **result.get("metrics", {})})


def validate(tracker: Tracker, out: StageOutput, step: Step, workspace: Path, source: str) -> None:
    """Each dataset of the output through its suite, before any stage trains on it; a failure
    raises naming the dataset, expectation and rows. A report exists only for a dataset that
    passed, so a cached output validated once is done."""
    for file, suite in step.validate.items():
        path = workspace / "logs" / f"validation-{out.name}-{file}-{out.key}.json"
        dataset = out.folder / f"{file}.jsonl"
        if path.exists() or (file in ("validation", "cold_start") and not dataset.read_text().strip()):
            continue  # validated already, an empty validation split (n_validation: 0) or no worked solutions
        from components.validate import validate_file  # Great Expectations: seconds to import

        with _GX:
            report = validate_file(dataset, suite, name=f"{source}/{file}" if out.name == "data" else suite)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        tracker.log_artifact(out.run_id, path, "validation")


def report(ctx, outputs: dict[str, StageOutput], versions: dict[str, dict]) -> dict[str, dict]:
    """The eval table across the lineage and the GRPO training curves: a Prefect markdown
    artifact, and files on the MLflow parent run (``report/``). Returns the table."""
    table = {role: outputs[f"eval_{role}"].result["metrics"] for role in EVALUATED if f"eval_{role}" in outputs}
    folder = ctx.place.workspace / "reports" / ctx.parent_run
    markdown = eval_table(table, versions, ctx.profile.evaluate.k)
    curves = {s.name: read_metrics(outputs[s.name].folder / "metrics.jsonl") for s in RECIPE
              if s.module == "grpo" and s.name in outputs}  # R1-Zero, R1's RL, its final RL, the student's
    plots = plot_curves(curves, folder)
    (folder / "eval_table.md").write_text(markdown + "\n")
    ctx.tracker.log_artifact(ctx.parent_run, folder, "report")
    create_markdown_artifact(markdown + "\n\nTraining curves (reward, accuracy, KL, completion length): "
                             f"MLflow run {ctx.parent_run}, `report/` ({', '.join(p.name for p in plots)}).",
                             key="r1flow-eval", description="evaluation across the lineage")
    ctx.tracker.log_metrics(ctx.parent_run, {f"{role}.{metric_name(k)}": v for role, m in table.items()
                                             for k, v in m.items()})
    return table
