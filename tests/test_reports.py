"""components.reports: the training curves as PNG files."""

from __future__ import annotations

from components import reports

ROWS = {"r1_zero": [{"step": s, "reward": 0.1 * s, "kl": 0.01 * s} for s in range(1, 5)],
        "r1_rl": [{"step": s, "reward": 0.2 * s} for s in range(1, 5)]}


def test_each_logged_curve_is_a_png_and_unlogged_ones_are_skipped(tmp_path):
    written = reports.plot_curves(ROWS, tmp_path / "run-1")
    assert sorted(p.name for p in written) == ["kl.png", "reward.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)

