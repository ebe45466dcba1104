"""The default profile with two stages at once against one at a time, alternating, each a fresh
workspace as `make run` starts: wall time, the stages' sum, the critical path, which stages ran
beside which, and each stage's seconds in both runs (how much two stages on the same cores slow
each other).

    .venv/bin/python bench/parallel.py [--pairs 1] [--profile configs/default.yaml] [--folder /tmp/r1flow-parallel]

Both runs of a pair use the same seed, threads and code, and the pairs alternate which goes first,
so a machine's drift falls on both sides. Stages at once split the cores (each gets its share as
its thread count), so with two each stage runs on half of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def run(profile: str, parallel: int, root: Path) -> dict:
    """``r1flow run`` in a fresh ``root``; its summary."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    summary = root / "summary.json"
    subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(PROJECT / profile), "--set",
                    f"runtime.max_parallel={parallel}", "--summary-json", str(summary)], cwd=PROJECT, check=True,
                   env={**os.environ, "R1FLOW_ROOT": str(root)}, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def overlaps(summary: dict) -> list[str]:
    """Pairs of stages that ran at once, with the seconds they shared."""
    spans = summary["timeline"]
    pairs = []
    for a in spans:
        for b in spans:
            shared = min(spans[a][1], spans[b][1]) - max(spans[a][0], spans[b][0])
            if a < b and shared > 0.5:
                pairs.append(f"{a}+{b} {shared:.0f}s")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--profile", default="configs/default.yaml")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/r1flow-parallel"))
    args = parser.parse_args()
    import torch

    print(f"cpu {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, profile {args.profile}")
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for pair in range(args.pairs):
        for parallel in ((2, 1) if pair % 2 == 0 else (1, 2)):
            summary = run(args.profile, parallel, args.folder / f"parallel-{parallel}")
            runs[parallel].append(summary)
            path = summary["critical_path"]
            print(f"pair {pair + 1}, max_parallel {parallel}: wall {summary['wall_seconds']:.0f} s, stages "
                  f"{summary['stage_seconds']:.0f} s, critical path {path['seconds']:.0f} s "
                  f"({' → '.join(path['stages'])})", flush=True)
            print(f"  at once: {', '.join(overlaps(summary)) or 'none'}", flush=True)
            print(f"  pass@1: {json.dumps({k: round(v['pass@1'], 3) for k, v in summary['metrics'].items()})}")
    for pair, (two, one) in enumerate(zip(runs[2], runs[1])):
        print(f"pair {pair + 1}: wall 2/1 = {two['wall_seconds'] / one['wall_seconds']:.2f}; each stage's "
              "seconds, two at once / one at a time:")
        print("  " + ", ".join(f"{name} {two['seconds'][name] / one['seconds'][name]:.2f}"
                               for name in one["seconds"] if one["seconds"][name] > 5))
        same = two["metrics"] == one["metrics"]
        print(f"  the same metrics in both: {same}")


if __name__ == "__main__":
    main()
