"""Wall time per stage of the latest pipeline runs, read back from MLflow.

    .venv/bin/python bench/pipeline_timing.py [--workspace .r1flow] [--runs 2]

Prints one table per parent run: stage, cached or not, seconds, share of the run. Use it to
compare a full run with an unchanged rerun measured on the same machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.tracking import Tracker, default_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(".r1flow"))
    parser.add_argument("--experiment", default="r1flow")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    tracker = Tracker(default_uri(args.workspace), args.experiment)
    for parent in reversed(tracker.pipeline_runs(limit=args.runs)):
        print(f"\nrun {parent.run_id[:8]} ({parent.tags.get('profile')}): {parent.seconds:.0f} s in the flow")
        print(f"{'stage':<22}{'cached':>8}{'seconds':>10}{'share':>8}")
        for name, child in tracker.child_runs(parent.run_id).items():
            print(f"{name:<22}{child.tags.get('cached', ''):>8}{child.seconds:>10.1f}"
                  f"{child.seconds / parent.seconds:>8.1%}")


if __name__ == "__main__":
    main()
