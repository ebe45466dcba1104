"""DeepSeek-R1's findings at toy scale, over seeds: the default profile end to end, one table.

    .venv/bin/python bench/r1_findings.py [--seeds 0 1 2] [--config configs/default.yaml]

Each seed is a full `r1flow run --set seed=N` from an empty project folder
(`.r1flow/bench/seed-N`, its own DVC repo, MLflow store and stage cache), so the wall time is
that of a first `make run`. Results are read back from each run's MLflow store. Prints and writes
to `reports/` (and to MLflow: experiment `r1flow-bench` in `.r1flow/mlflow.db`):

- `r1_findings.md`: per model pass@1 mean ± std over seeds, cons@k, greedy, format, language,
  tokens; wall time per stage; and the findings checked (R1-Zero's lift and growing length, R1's
  format, the final RL against the SFT it starts from, distillation against the teacher, against
  the student trained without traces and against the student trained by RL instead).
- `heldout_pass.png`, `heldout_length.png`: pass@1 and mean completion length on held-out
  prompts against the GRPO step, mean over seeds with the min-max band.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, pstdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from seed_band import plot_seed_band  # bench/, beside this script

from components.config import load_profile
from components.tracking import Tracker
from flows.workspace import locate

PROJECT = Path(__file__).resolve().parents[1]
MODELS = {"base": "base", "r1_zero": "R1-Zero (GRPO from base)", "cold_start": "R1 cold start (SFT)",
          "r1_rl": "R1 RL (cold start + GRPO)", "r1_sft": "R1 SFT (base SFT on R1 traces)",
          "r1_final": "R1 final (GRPO on R1 SFT)", "student": "student (SFT on R1 traces)",
          "student_no_traces": "student without traces (answers only)",
          "student_rl": "student by RL (GRPO on its own base)"}
GRPO = {"r1_zero": "R1-Zero", "r1_rl": "R1 RL (after cold start)", "r1_final": "R1 final (after the SFT)",
        "student_rl": "student by RL"}
COLUMNS = {"pass_at_1": "pass@1", "cons_at_{k}": "cons@{k}", "greedy_accuracy": "greedy", "format_rate": "format",
           "language_consistency": "language", "mean_length": "tokens"}
CURVES = {"heldout/pass_at_1": ("heldout_pass.png", "pass@1 on held-out prompts"),
          "heldout/mean_length": ("heldout_length.png", "mean completion length, held-out prompts (tokens)")}


def run_seed(seed: int, config: Path, folder: Path) -> float:
    """A first `r1flow run` of the profile with this seed in an empty project folder; its wall time."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.time()
    done = subprocess.run([str(Path(sys.executable).parent / "r1flow"), "run", "--config", str(config),
                           "--set", f"seed={seed}"], cwd=folder, capture_output=True, text=True, check=False,
                          env={**os.environ, "R1FLOW_ROOT": str(folder)})  # the seed's folder, whatever the caller set
    (folder / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"seed {seed} failed; log: {folder / 'run.log'}\n{(done.stdout + done.stderr)[-3000:]}")
    return time.time() - started


def read_seed(folder: Path, profile) -> dict:
    """Eval metrics, stage wall times and held-out curves of the folder's latest pipeline run."""
    place = locate(profile, folder)  # `r1flow run` ran in the seed's folder
    tracker = Tracker(place.tracking_uri, place.experiment)
    parent = tracker.pipeline_runs(limit=1)[0]
    children = tracker.child_runs(parent.run_id)  # in the order they started: recipe order
    curves = {(stage, key): tracker.metric_history(children[stage].run_id, key)
              for stage in GRPO for key in CURVES}
    seconds = {name: run.seconds for name, run in children.items()}
    return {"metrics": parent.metrics, "seconds": seconds, "curves": curves, "run_id": parent.run_id}


def pm(values: list[float]) -> str:
    return f"{mean(values):.3f} ± {pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def findings(seeds: dict[int, dict]) -> list[tuple[str, bool, bool, str]]:
    """The issue's claims: (claim, holds on the mean over seeds, holds for every seed, per-seed figures)."""
    get = lambda role, key: [s["metrics"][f"{role}.{key}"] for s in seeds.values()]
    zero, rl = get("r1_zero", "pass_at_1"), get("r1_rl", "pass_at_1")
    final, sft = get("r1_final", "pass_at_1"), get("r1_sft", "pass_at_1")
    lift = [z - b for z, b in zip(zero, get("base", "pass_at_1"))]
    lengths = [(c[0][1], c[-1][1]) for c in (s["curves"]["r1_zero", "heldout/mean_length"] for s in seeds.values())]
    grew = [b > a for a, b in lengths]
    formats = get("r1_rl", "format_rate")
    share = [s / t for s, t in zip(get("student", "pass_at_1"), rl)]
    gap = [a - b for a, b in zip(get("student", "pass_at_1"), get("student_no_traces", "pass_at_1"))]
    distilled, by_rl = get("student", "pass_at_1"), get("student_rl", "pass_at_1")
    compute = lambda stage: mean(s["seconds"][stage] for s in seeds.values())  # each side's training, as run
    minutes = [s["wall"] / 60 for s in seeds.values()]
    at_least = lambda values, floor: (mean(values) >= floor, all(v >= floor for v in values))
    return [
        ("R1-Zero: pass@1 − base ≥ 0.20", *at_least(lift, 0.20), ", ".join(f"{x:+.3f}" for x in lift)),
        ("R1-Zero: held-out completion length grows over GRPO", all(grew), all(grew),
         ", ".join(f"{a:.1f}→{b:.1f}" for a, b in lengths) + " tokens"),
        ("R1: cold start + RL pass@1 ≥ R1-Zero's", mean(rl) >= mean(zero), all(a >= b for a, b in zip(rl, zero)),
         ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in zip(rl, zero))),
        ("R1 final (RL after the SFT) pass@1 ≥ R1 SFT's", mean(final) >= mean(sft),
         all(a >= b for a, b in zip(final, sft)), ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in zip(final, sft))),
        ("R1: format ≥ 0.95", *at_least(formats, 0.95),
         (", ".join(f"{x:.3f}" for x in formats) + f" (R1-Zero {mean(get('r1_zero', 'format_rate')):.3f}; language "
          f"{mean(get('r1_rl', 'language_consistency')):.3f} vs {mean(get('r1_zero', 'language_consistency')):.3f})")),
        ("distillation: student ≥ 80% of the teacher (R1 RL, whose traces it learns)", *at_least(share, 0.8),
         ", ".join(f"{x:.0%}" for x in share)),
        ("distillation: student − student without traces ≥ 0.15", *at_least(gap, 0.15),
         ", ".join(f"{x:+.3f}" for x in gap)),
        ("distillation vs RL on the student: distilled ≥ trained by RL (R1: do the RL once, in the big model)",
         mean(distilled) >= mean(by_rl), all(a >= b for a, b in zip(distilled, by_rl)),
         ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in zip(distilled, by_rl))
         + f" (training: SFT {compute('student'):.0f} s, GRPO {compute('student_rl'):.0f} s, mean)"),
        ("whole default run ≤ 15 min", max(minutes) <= 15, max(minutes) <= 15, ", ".join(f"{m:.1f}" for m in minutes)),
    ]


def report(seeds: dict[int, dict], k: int, out: Path) -> str:
    keys = {c.format(k=k): h.format(k=k) for c, h in COLUMNS.items()}
    lines = [(f"Default profile, seeds {', '.join(map(str, seeds))}: mean ± std over seeds "
              "(200 held-out test prompts each)."), "",
             "| model | " + " | ".join(keys.values()) + " |", "|---" * (len(keys) + 1) + "|"]
    for role, label in MODELS.items():
        cells = [pm([s["metrics"][f"{role}.{key}"] for s in seeds.values()]) if key == "pass_at_1"
                 else f"{mean(s['metrics'][f'{role}.{key}'] for s in seeds.values()):.3f}" for key in keys]
        lines.append(f"| {label} | " + " | ".join(c.replace(".000", "") if key == "mean_length" else c
                                                  for c, key in zip(cells, keys)) + " |")
    stages = list(next(iter(seeds.values()))["seconds"])
    lines += ["", ("Wall time per stage (seconds, mean over seeds; the whole run also includes start-up, data "
                   "versioning and registration):"), "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {mean(s['seconds'][name] for s in seeds.values()):.0f} |" for name in stages]
    lines.append(f"| **whole run** | **{mean(s['wall'] for s in seeds.values()):.0f}** |")
    yes = lambda ok: "yes" if ok else "**no**"
    lines += ["", "| finding | on the mean | every seed | per seed |", "|---|---|---|---|"]
    lines += [f"| {claim} | {yes(mean_ok)} | {yes(all_ok)} | {detail} |"
              for claim, mean_ok, all_ok, detail in findings(seeds)]
    markdown = "\n".join(lines) + "\n"
    out.mkdir(exist_ok=True)
    (out / "r1_findings.md").write_text(markdown)
    for key, (file, title) in CURVES.items():
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for stage, label in GRPO.items():
            plot_seed_band(axes, [s["curves"][stage, key] for s in seeds.values()], label)
        axes.set(xlabel="GRPO step", title=f"{title}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / file, dpi=100)
        plt.close(figure)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=PROJECT / "configs" / "default.yaml")
    parser.add_argument("--out", type=Path, default=PROJECT / "reports")
    parser.add_argument("--reuse", action="store_true", help="read the seeds' last runs instead of running them")
    args = parser.parse_args()
    config = args.config.resolve()
    profile, seeds = load_profile(config), {}
    for seed in args.seeds:
        folder = PROJECT / ".r1flow" / "bench" / f"seed-{seed}"
        wall = float((folder / "wall_seconds").read_text()) if args.reuse else run_seed(seed, config, folder)
        (folder / "wall_seconds").write_text(f"{wall:.1f}")
        seeds[seed] = {**read_seed(folder, profile), "wall": wall}
        print(f"seed {seed}: {wall / 60:.1f} min", flush=True)
    markdown = report(seeds, profile.evaluate.k, args.out)
    print(markdown)
    place = locate(profile, PROJECT)
    tracker = Tracker(place.tracking_uri, "r1flow-bench", place.artifacts)
    run_id = tracker.start_run(f"r1 findings, seeds {' '.join(map(str, seeds))}",
                               tags={f"seed_{s}_run": v["run_id"] for s, v in seeds.items()})
    for file in ("r1_findings.md", *(f for f, _ in CURVES.values())):
        tracker.log_artifact(run_id, args.out / file)
    tracker.log_metrics(run_id, {f"{role}.pass_at_1.mean": mean(s["metrics"][f"{role}.pass_at_1"]
                                                                for s in seeds.values()) for role in MODELS})
    tracker.finish(run_id)
    print(f"written to {args.out} and MLflow run {run_id} (experiment r1flow-bench)")


if __name__ == "__main__":
    main()
