"""Run reports: the evaluation table across the lineage, and training curves as PNG plots.

    table = eval_table(metrics, versions, k=4)
    plot_curves({"r1_zero": rows, "r1_rl": rows, "r1_final": rows}, out_dir)

Plain files, so the pipeline can publish them to Prefect (markdown artifact) and MLflow alike.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

# What TRL's GRPOTrainer logs, and what each plot is called.
CURVES = {
    "reward": ("reward", "total reward"),
    "accuracy": ("rewards/accuracy_reward/mean", "accuracy reward (share correct)"),
    "kl": ("kl", "KL to the reference policy"),
    "completion_length": ("completions/mean_length", "mean completion length (tokens)"),
    "heldout_pass": ("heldout/pass@1", "pass@1 on held-out prompts"),
    "heldout_length": ("heldout/mean_length", "mean completion length on held-out prompts (tokens)"),
}
COLUMNS = ["pass@1", "cons@{k}", "greedy_accuracy", "format_rate", "language_consistency", "mean_length"]


def eval_table(metrics: dict[str, dict], versions: dict[str, dict], k: int) -> str:
    """Markdown: one row per model of the lineage, with its registered version and alias."""
    keys = [c.format(k=k) for c in COLUMNS]
    lines = ["| model | " + " | ".join(keys) + " | registered |", "|---" * (len(keys) + 2) + "|"]
    for role, values in metrics.items():
        v = versions.get(role)
        tag = f"{v['name']} v{v['version']}{' (champion)' if v['champion'] else ''}" if v else ""
        lines.append(f"| {role} | " + " | ".join(f"{values[key]:.3f}" for key in keys) + f" | {tag} |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """One PNG per curve (reward, accuracy, KL, completion length) against the training step,
    a line per run that logged it; curves no run logged are skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (key, title) in CURVES.items():
        series = {run: [(row["step"], row[key]) for row in rows if key in row] for run, rows in runs.items()}
        series = {run: points for run, points in series.items() if points}
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for run, points in series.items():
            axes.plot(*zip(*points), label=run, marker="." if len(points) < 40 else None)
        axes.set(xlabel="training step", title=title)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(out_dir / f"{name}.png", dpi=100)
        plt.close(figure)
        written.append(out_dir / f"{name}.png")
    return written
