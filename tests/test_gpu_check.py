"""bench/gpu_check.py on CPU with the micro shape: the GPU check is never dead code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_gpu_check_runs_on_cpu_and_prints_its_figures():
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--shape", "micro", "--steps", "2", "--length", "64",
                           "--completion", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line and "{" not in line)
    assert figures["device"].startswith("CPU")
    assert float(figures["sft_tokens_per_s"]) > 0 and float(figures["grpo_generated_tokens_per_s"]) > 0
    assert 0 < float(figures["grpo_generation_share"]) < 1
    assert figures["sft_mfu"].startswith("n/a")  # no known peak for a CPU
