"""Wall time per stage of the latest pipeline runs, read back from MLflow.

    .venv/bin/python bench/pipeline_timing.py [--config configs/default.yaml] [--root .] [--runs 2]

Prints one table per parent run: stage, cached or not, seconds, share of the run. Use it to
compare a full run with an unchanged rerun measured on the same machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from components.config import load_profile
from components.tracking import Tracker
from flows.workspace import locate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="the runs' profile")
    parser.add_argument("--root", type=Path, help="where the runs' workspace is (default: $R1FLOW_ROOT or .)")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    place = locate(load_profile(args.config), args.root)
    tracker = Tracker(place.tracking_uri, place.experiment)
    for parent in reversed(tracker.pipeline_runs(limit=args.runs)):
        print(f"\nrun {parent.run_id[:8]} ({parent.tags.get('profile')}): {parent.seconds:.0f} s in the flow")
        print(f"{'stage':<22}{'cached':>8}{'seconds':>10}{'share':>8}")
        for name, child in tracker.child_runs(parent.run_id).items():
            print(f"{name:<22}{child.tags.get('cached', ''):>8}{child.seconds:>10.1f}"
                  f"{child.seconds / parent.seconds:>8.1%}")


if __name__ == "__main__":
    main()
