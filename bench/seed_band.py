"""The benches' curve over seeds: the mean per step, with the seeds' min-max as a band."""

from __future__ import annotations

from statistics import mean


def plot_seed_band(axes, series: list[list[tuple[int, float]]], label: str) -> None:
    """One (step, value) series per seed, drawn on the steps every seed logged."""
    by_step = [dict(x) for x in series]
    steps = sorted(set.intersection(*(set(x) for x in by_step)))
    values = [[x[step] for x in by_step] for step in steps]
    line, = axes.plot(steps, [mean(v) for v in values], marker=".", label=label)
    axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=line.get_color())
