"""Wall time per stage of the latest pipeline runs, read back from MLflow.

    .venv/bin/python bench/pipeline_timing.py [--workspace .r1flow] [--runs 2]

Prints one table per parent run: stage, cached or not, seconds, share of the run. Use it to
compare a full run with an unchanged rerun measured on the same machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlflow.tracking import MlflowClient

from components.tracking import default_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".r1flow"))
    parser.add_argument("--experiment", default="r1flow")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    client = MlflowClient(default_uri(args.workspace))
    experiment = client.get_experiment_by_name(args.experiment)
    parents = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"], max_results=200)
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags][: args.runs]
    for parent in reversed(parents):
        total = (parent.info.end_time - parent.info.start_time) / 1000
        print(f"\nrun {parent.info.run_id[:8]} ({parent.data.tags.get('profile')}): {total:.0f} s in the flow")
        print(f"{'stage':<22}{'cached':>8}{'seconds':>10}{'share':>8}")
        children = client.search_runs([experiment.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
        for child in children:
            seconds = (child.info.end_time - child.info.start_time) / 1000
            print(f"{child.info.run_name:<22}{child.data.tags.get('cached', ''):>8}{seconds:>10.1f}"
                  f"{seconds / total:>8.1%}")


if __name__ == "__main__":
    main()
