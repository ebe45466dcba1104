"""DeepSeek-R1's findings at toy scale, over seeds and thread counts: the default profile end to end, one table.

    .venv/bin/python bench/r1_findings.py [--seeds 0 1 2] [--threads 1 2] [--jobs 3] [--keep]
                                          [--config configs/default.yaml]

Each (thread count, seed) is a full `r1flow run --set seed=N` with `OMP_NUM_THREADS` set, in a
project folder of its own (`.r1flow/bench/tT-seed-N`: its own DVC repo, MLflow store and stage
cache). `make run` on two cores runs two threads; whether the figures change with the thread
count depends on the CPU's kernels (on a 2-core AVX2 EPYC they did not, to the last digit), so
a finding counts where it holds for every run. A run starts from an empty folder unless
`--keep`, which reuses the folder's cached stages (e.g. after changing only the cold start);
stage seconds are then those of the run that computed each stage. `--jobs`: runs at once (they
share the cores; their figures do not change). Results are read back from each run's MLflow
store. Prints and writes to `reports/` (and to MLflow: experiment `r1flow-bench` in
`.r1flow/mlflow.db`):

- `r1_findings.md`: per model pass@1 mean ± std over runs, cons@k, greedy, format, language,
  tokens; seconds per stage by thread count; and the findings checked (R1-Zero's lift and
  growing length, RL after the cold start against the cold start and against R1-Zero, R1's
  format, the final RL against the SFT it starts from, distillation against the teacher, against
  the student trained without traces and against the student trained by RL instead).
- `heldout_pass.png`, `heldout_length.png`: pass@1 and mean completion length on held-out
  prompts against the GRPO step, mean over runs with the min-max band.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


def run_seed(seed: int, threads: int, config: Path, folder: Path, keep: bool) -> float:
    """`r1flow run` of the profile with this seed and thread count in its folder; its wall time."""
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    done = subprocess.run([str(Path(sys.executable).parent / "r1flow"), "run", "--config", str(config),
                           "--set", f"seed={seed}"], cwd=folder, capture_output=True, text=True, check=False,
                          env={**os.environ, "R1FLOW_ROOT": str(folder),  # the run's folder, whatever the caller set
                               "OMP_NUM_THREADS": str(threads)})
    (folder / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"seed {seed}, {threads} thread(s) failed; log: {folder / 'run.log'}\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    return time.time() - started


def read_seed(folder: Path, profile) -> dict:
    """Eval metrics, stage seconds and held-out curves of the folder's latest pipeline run. A stage
    the run reused from its cache counts the seconds of the run that computed it."""
    place = locate(profile, folder)  # `r1flow run` ran in the seed's folder
    tracker = Tracker(place.tracking_uri, place.experiment)
    parent = tracker.pipeline_runs(limit=1)[0]
    children = tracker.child_runs(parent.run_id)  # in the order they started: recipe order
    curves = {(stage, key): tracker.metric_history(computing(tracker, children[stage]).run_id, key)
              for stage in GRPO for key in CURVES}
    seconds = {name: computing(tracker, run).seconds for name, run in children.items()}
    return {"metrics": parent.metrics, "seconds": seconds, "curves": curves, "run_id": parent.run_id}


def computing(tracker: Tracker, run):
    """The stage run that computed ``run``'s output: itself, or the earlier one whose cache it reused."""
    if run.tags.get("cached") != "True":
        return run
    return tracker.computed_run(run.tags["stage_key"]) or run


def pm(values: list[float]) -> str:
    return f"{mean(values):.3f} ± {pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def findings(runs: dict[str, dict]) -> list[tuple[str, bool, bool, str]]:
    """The R1 claims: (claim, holds on the mean over runs, holds for every run, per-run figures)."""
    get = lambda role, key: [r["metrics"][f"{role}.{key}"] for r in runs.values()]
    per_run = lambda cells: ", ".join(f"{label} {cell}" for label, cell in zip(runs, cells))
    base, zero, cold, rl = (get(role, "pass_at_1") for role in ("base", "r1_zero", "cold_start", "r1_rl"))
    final, sft = get("r1_final", "pass_at_1"), get("r1_sft", "pass_at_1")
    lift = [z - b for z, b in zip(zero, base)]
    rl_gain = [a - c for a, c in zip(rl, cold)]
    lengths = [(c[0][1], c[-1][1]) for c in (r["curves"]["r1_zero", "heldout/mean_length"] for r in runs.values())]
    grew = [b > a for a, b in lengths]
    formats = get("r1_rl", "format_rate")
    share = [s / t for s, t in zip(get("student", "pass_at_1"), rl)]
    gap = [a - b for a, b in zip(get("student", "pass_at_1"), get("student_no_traces", "pass_at_1"))]
    distilled, by_rl = get("student", "pass_at_1"), get("student_rl", "pass_at_1")
    compute = lambda stage: mean(r["seconds"][stage] for r in runs.values())  # each side's training, as run
    at_least = lambda values, floor: (mean(values) >= floor, all(v >= floor for v in values))
    pairs = lambda a, b: per_run(f"{x:.3f} vs {y:.3f}" for x, y in zip(a, b))
    return [
        ("R1-Zero: pass@1 − base ≥ 0.20", *at_least(lift, 0.20), per_run(f"{x:+.3f}" for x in lift)),
        ("R1-Zero: held-out completion length grows over GRPO", all(grew), all(grew),
         per_run(f"{a:.1f}→{b:.1f}" for a, b in lengths) + " tokens"),
        ("R1: cold start + RL pass@1 ≥ cold start's + 0.05", *at_least(rl_gain, 0.05),
         per_run(f"{x:+.3f}" for x in rl_gain) + f" (cold start {mean(cold):.3f}, then RL {mean(rl):.3f}, mean)"),
        ("R1: cold start + RL pass@1 ≥ R1-Zero's", mean(rl) >= mean(zero), all(a >= b for a, b in zip(rl, zero)),
         pairs(rl, zero)),
        ("R1 final (RL after the SFT) pass@1 ≥ R1 SFT's", mean(final) >= mean(sft),
         all(a >= b for a, b in zip(final, sft)), pairs(final, sft)),
        ("R1: format ≥ 0.95", *at_least(formats, 0.95),
         (per_run(f"{x:.3f}" for x in formats) + f" (R1-Zero {mean(get('r1_zero', 'format_rate')):.3f}; language "
          f"{mean(get('r1_rl', 'language_consistency')):.3f} vs {mean(get('r1_zero', 'language_consistency')):.3f})")),
        ("distillation: student ≥ 80% of the teacher (R1 RL, whose traces it learns)", *at_least(share, 0.8),
         per_run(f"{x:.0%}" for x in share)),
        ("distillation: student − student without traces ≥ 0.15", *at_least(gap, 0.15),
         per_run(f"{x:+.3f}" for x in gap)),
        ("distillation vs RL on the student: distilled ≥ trained by RL (R1: do the RL once, in the big model)",
         mean(distilled) >= mean(by_rl), all(a >= b for a, b in zip(distilled, by_rl)),
         pairs(distilled, by_rl) + f" (training: SFT {compute('student'):.0f} s, GRPO {compute('student_rl'):.0f} s, "
         "mean)"),
    ]


def report(runs: dict[str, dict], k: int, out: Path) -> str:
    keys = {c.format(k=k): h.format(k=k) for c, h in COLUMNS.items()}
    lines = [(f"Default profile, {len(runs)} runs ({', '.join(runs)}; sN/tT: seed N, T threads): mean ± std over "
              f"runs (200 held-out test prompts each). CPU capability: {cpu_capability()}."), "",
             "| model | " + " | ".join(keys.values()) + " |", "|---" * (len(keys) + 1) + "|"]
    for role, label in MODELS.items():
        cells = [pm([r["metrics"][f"{role}.{key}"] for r in runs.values()]) if key == "pass_at_1"
                 else f"{mean(r['metrics'][f'{role}.{key}'] for r in runs.values()):.3f}" for key in keys]
        lines.append(f"| {label} | " + " | ".join(c.replace(".000", "") if key == "mean_length" else c
                                                  for c, key in zip(cells, keys)) + " |")
    stages = list(next(iter(runs.values()))["seconds"])
    lines += ["", ("Seconds per stage (mean over runs of the same thread count, each stage as the run that computed "
                   "it took; runs side by side (--jobs) share the cores, so these are upper bounds):"), "",
              "| stage | " + " | ".join(f"{t} thread(s)" for t in threads_of(runs)) + " |",
              "|---" * (len(threads_of(runs)) + 1) + "|"]
    by_threads = {t: [r for r in runs.values() if r["threads"] == t] for t in threads_of(runs)}
    for name in [*stages, "sum"]:
        cells = [mean(sum(r["seconds"].values()) if name == "sum" else r["seconds"][name] for r in group)
                 for group in by_threads.values()]
        lines.append(f"| {'**sum**' if name == 'sum' else name} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    yes = lambda ok: "yes" if ok else "**no**"
    lines += ["", "| finding | on the mean | every run | per run |", "|---|---|---|---|"]
    lines += [f"| {claim} | {yes(mean_ok)} | {yes(all_ok)} | {detail} |"
              for claim, mean_ok, all_ok, detail in findings(runs)]
    markdown = "\n".join(lines) + "\n"
    out.mkdir(exist_ok=True)
    (out / "r1_findings.md").write_text(markdown)
    for key, (file, title) in CURVES.items():
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for stage, label in GRPO.items():
            plot_seed_band(axes, [r["curves"][stage, key] for r in runs.values()], label)
        axes.set(xlabel="GRPO step", title=f"{title}, {len(runs)} runs")
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out / file, dpi=100)
        plt.close(figure)
    return markdown


def threads_of(runs: dict[str, dict]) -> list[int]:
    return sorted({r["threads"] for r in runs.values()})


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS of each run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--keep", action="store_true", help="reuse each run folder's cached stages")
    parser.add_argument("--config", type=Path, default=PROJECT / "configs" / "default.yaml")
    parser.add_argument("--out", type=Path, default=PROJECT / "reports")
    parser.add_argument("--reuse", action="store_true", help="read the runs' last results instead of running them")
    args = parser.parse_args()
    config = args.config.resolve()
    profile = load_profile(config)
    plan = {f"s{seed}/t{threads}": (seed, threads) for threads in args.threads for seed in args.seeds}
    folder = lambda seed, threads: PROJECT / ".r1flow" / "bench" / f"t{threads}-seed-{seed}"

    def one(label: str) -> None:
        seed, threads = plan[label]
        if not args.reuse:
            wall = run_seed(seed, threads, config, folder(seed, threads), args.keep)
            print(f"{label}: {wall / 60:.1f} min", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, plan))
    runs = {label: {**read_seed(folder(*plan[label]), profile), "threads": threads}
            for label, (_, threads) in plan.items()}
    markdown = report(runs, profile.evaluate.k, args.out)
    print(markdown)
    place = locate(profile, PROJECT)
    tracker = Tracker(place.tracking_uri, "r1flow-bench", place.artifacts)
    run_id = tracker.start_run(f"r1 findings, {' '.join(plan)}",
                               tags={f"{label.replace('/', '_')}_run": r["run_id"] for label, r in runs.items()})
    for file in ("r1_findings.md", *(f for f, _ in CURVES.values())):
        tracker.log_artifact(run_id, args.out / file)
    tracker.log_metrics(run_id, {f"{role}.pass_at_1.mean": mean(r["metrics"][f"{role}.pass_at_1"]
                                                                for r in runs.values()) for role in MODELS})
    tracker.finish(run_id)
    print(f"written to {args.out} and MLflow run {run_id} (experiment r1flow-bench)")


if __name__ == "__main__":
    main()
