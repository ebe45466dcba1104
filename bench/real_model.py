"""A real pretrained model learning by RL on this CPU, over seeds: one table, one curve.

    .venv/bin/python bench/real_model.py [--seeds 0 1 2] [--config configs/smollm2-gym.yaml]
        [--set KEY=VALUE ...] [--gsm8k 200 [--gsm8k-seeds 0]] [--name real_model] [--reuse]

Each seed is a first `r1flow run --set seed=N` of the profile (default: SmolLM2-135M-Instruct,
R1-Zero GRPO on reasoning-gym chain_sum) in an empty project folder
(`.r1flow/bench/NAME/seed-N`), so the minutes are those of a first run. With `--gsm8k N` the
seed's base and R1-Zero model are then scored on the first N GSM8K test problems with `r1flow
eval` (the same models, a task they were not trained on). Results are read back from each seed's
MLflow store; `reports/NAME.md` gets, per model, strict pass@1 (the one `<answer>` graded by the
task's verifier) beside lenient pass@1 (the last number anywhere in the completion), format rate
and length, per seed and on the mean; `reports/NAME.png` the GRPO reward and held-out pass@1
against the step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from seed_band import plot_seed_band  # bench/, beside this script

from components.config import load_profile
from components.tracking import Tracker
from flows.workspace import locate

PROJECT = Path(__file__).resolve().parents[1]
R1FLOW = str(Path(sys.executable).parent / "r1flow")
MODELS = {"base": "base (the package's model)", "r1_zero": "R1-Zero (GRPO from the base)"}
COLUMNS = {"pass_at_1": "strict pass@1", "lenient_pass_at_1": "lenient pass@1", "format_rate": "format",
           "mean_length": "tokens"}
CURVES = {"reward": "GRPO reward (training batch)", "heldout/pass_at_1": "held-out pass@1"}


def r1flow(folder: Path, args: list[str], log: str) -> None:
    """An r1flow command in the seed's folder; its output kept beside it, the bench stopped on failure."""
    # One torch thread unless told otherwise: GRPO on one core, and two threads ran ~7x slower than
    # one whenever another process was busy on the other core.
    # The seed's folder is its root whatever the caller's R1FLOW_ROOT says.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "R1FLOW_ROOT": str(folder)}
    done = subprocess.run([R1FLOW, *args], cwd=folder, env=env, capture_output=True, text=True, check=False)
    (folder / log).write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed in {folder}; log: {folder / log}\n{(done.stdout + done.stderr)[-3000:]}")


def run_seed(seed: int, settings: list[str], folder: Path) -> float:
    """A first run of the profile with this seed in an empty folder; its wall time."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.time()
    r1flow(folder, ["run", *settings], "run.log")
    return time.time() - started


def score_gsm8k(folder: Path, workspace: Path, settings: list[str], n: int) -> None:
    """The seed's base and R1-Zero model on the first n GSM8K test problems (cached when done before).
    GSM8K answers need room: 256 new tokens, one sample and the greedy decode per problem."""
    for role in MODELS:
        r1flow(folder, ["eval", str(model_folder(workspace, role)), "--benchmark", "gsm8k", "--limit", str(n),
                        *settings, "--set", "evaluate.max_new_tokens=256", "--set", "evaluate.k=1"],
               f"gsm8k-{role}.log")


def model_folder(workspace: Path, stage: str) -> Path:
    """The one model folder a first run left for the stage."""
    (found,) = (workspace / "stages" / stage).glob("*/model")
    return found


def read_seed(folder: Path, profile) -> dict:
    """Eval metrics, GRPO curves and GSM8K scores of the folder's latest pipeline run."""
    place = locate(profile, folder)  # `r1flow run` ran in the seed's folder
    tracker = Tracker(place.tracking_uri, place.experiment)
    parent = tracker.pipeline_runs(limit=1)[0]
    grpo = tracker.child_runs(parent.run_id)["r1_zero"]
    evals = tracker.benchmark_runs("gsm8k")[::-1]  # oldest first: the newest run of a model wins
    models = {role: str(model_folder(place.workspace, role)) for role in MODELS}
    gsm8k = {role: run.metrics for role in MODELS for run in evals if run.tags.get("model") == models[role]}
    return {"metrics": parent.metrics, "curves": {key: tracker.metric_history(grpo.run_id, key) for key in CURVES},
            "gsm8k": gsm8k, "grpo_seconds": grpo.seconds, "run_id": parent.run_id}


def figures(values: list[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def report(seeds: dict[int, dict], title: str, out: Path, name: str) -> str:
    get = lambda role, key: [s["metrics"][f"{role}.{key}"] for s in seeds.values()]
    ids = ", ".join(map(str, seeds))
    header = [f"{h} (mean; seeds {ids})" if k.endswith("pass_at_1") else h for k, h in COLUMNS.items()]
    lines = [title, "", "| model | " + " | ".join(header) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for role, label in MODELS.items():
        cells = [f"{mean(get(role, key)):.3f} ({figures(get(role, key))})" if key.endswith("pass_at_1")
                 else f"{mean(get(role, key)):.{1 if key == 'mean_length' else 3}f}" for key in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lift = [z - b for z, b in zip(get("r1_zero", "pass_at_1"), get("base", "pass_at_1"))]
    minutes = figures([s["wall"] / 60 for s in seeds.values()], 1)
    grpo = figures([s["grpo_seconds"] / 60 for s in seeds.values()], 1)
    per_seed = ", ".join(f"{x:+.3f}" for x in lift)
    lines += ["", (f"Strict pass@1 lift: {mean(lift):+.3f} on the mean, per seed {per_seed}; "
                   f"minutes per seed, a first run from an empty folder: {minutes} (the GRPO stage: {grpo}).")]
    scored = {seed: s["gsm8k"] for seed, s in seeds.items() if s["gsm8k"]}
    if scored:
        n = int(next(iter(scored.values()))["base"]["prompts"])
        lines += ["", (f"The same models on the first {n} GSM8K test problems (seeds {', '.join(map(str, scored))}; "
                       "1 sample at T=0.6 and the greedy decode, 256 new tokens; mean over seeds):"), "",
                  "| model | pass@1 | lenient pass@1 | greedy | format |", "|---|---|---|---|---|"]
        for role, label in MODELS.items():
            cells = [mean(g[role][key] for g in scored.values())
                     for key in ("pass_at_1", "lenient_pass_at_1", "greedy_accuracy", "format_rate")]
            lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    markdown = "\n".join(lines) + "\n"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for key, label in CURVES.items():
        plot_seed_band(axes, [s["curves"][key] for s in seeds.values()], label)
    axes.set(xlabel="GRPO step", ylim=(0, 1.05), title=f"R1-Zero on a real model, seeds {ids} (mean, min-max band)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=100)
    plt.close(figure)
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=PROJECT / "configs" / "smollm2-gym.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE, as for r1flow run")
    parser.add_argument("--gsm8k", type=int, default=0, help="also score both models on the first N GSM8K problems")
    parser.add_argument("--gsm8k-seeds", type=int, nargs="+", help="the seeds to score on GSM8K (default: all)")
    parser.add_argument("--name", default="real_model", help="bench folder and report name")
    parser.add_argument("--out", type=Path, default=PROJECT / "reports")
    parser.add_argument("--reuse", action="store_true", help="read the seeds' last runs instead of running them")
    args = parser.parse_args()
    config = args.config.resolve()
    profile = load_profile(config, args.overrides)
    import torch

    from components.modeling import pick_device, use_bf16

    device = pick_device(profile.runtime.device)
    ran = "bf16" if use_bf16(device, profile.runtime.precision) else "fp32"
    cpu = f"{torch.backends.cpu.get_cpu_capability()} capability"
    print(f"precision: {ran} ({profile.runtime.precision} on {device}, {cpu})", flush=True)
    seeds = {}
    for seed in args.seeds:
        folder = PROJECT / ".r1flow" / "bench" / args.name / f"seed-{seed}"
        settings = ["--config", str(config), *(a for o in [*args.overrides, f"seed={seed}"] for a in ("--set", o))]
        if not args.reuse:
            (folder / "wall_seconds").write_text(f"{run_seed(seed, settings, folder):.1f}")
        if args.gsm8k and seed in (args.gsm8k_seeds or args.seeds):
            score_gsm8k(folder, locate(profile, folder).workspace, settings, args.gsm8k)
        if not (folder / "wall_seconds").exists():
            sys.exit(f"seed {seed}: no finished run in {folder}; run it without --reuse first")
        wall = float((folder / "wall_seconds").read_text())
        seeds[seed] = {**read_seed(folder, profile), "wall": wall}
        print(f"seed {seed}: {wall / 60:.1f} min", flush=True)
    tasks = ", ".join(f"{task} {json.dumps(cfg)}" for task, cfg in profile.data.tasks.items())
    title = (f"`{config.relative_to(PROJECT)}`{' with ' + ', '.join(args.overrides) if args.overrides else ''}, "
             f"{ran} on a CPU of {cpu}: {profile.data.n_test} held-out test problems ({tasks}), "
             f"{profile.evaluate.k} samples each at "
             f"T={profile.evaluate.temperature} / top-p {profile.evaluate.top_p}.")
    print(report(seeds, title, args.out, args.name))


if __name__ == "__main__":
    main()
