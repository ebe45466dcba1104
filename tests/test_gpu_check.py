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
    assert figures["sft_mfu"] == "n/a" and figures["grpo_weight_sync_seconds"] == "n/a"  # no peak, no vLLM


def test_mfu_counts_attention_and_knows_gpus_by_their_exact_name():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import SHAPES, peak_flops, training_flops_per_token
    from transformers import Qwen2Config

    config = Qwen2Config(**SHAPES["qwen2.5-0.5b"])
    weights = 6 * 494e6
    # at 1,024 tokens attention adds 12 x 24 layers x 896 x 1,024 FLOPs a token: 9% on top of the weights'
    assert training_flops_per_token(config, 494e6, 1024) == weights + 12 * 24 * 896 * 1024
    assert training_flops_per_token(config, 494e6, 4096) > training_flops_per_token(config, 494e6, 1024)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA L40") == 181e12 and peak_flops("NVIDIA L4") == 121e12  # not each other's
    assert peak_flops("NVIDIA H100") is None and peak_flops("CPU") is None  # unknown: no guessed MFU


def test_the_first_gpu_run_script_parses_and_its_profile_loads(tmp_path):
    """bench/gpu_first_run.sh cannot run without a GPU; its shell and the profile it runs are checked here."""
    import shlex

    from transformers import AutoModelForCausalLM

    from components.config import load_profile

    script = ROOT / "bench" / "gpu_first_run.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    command = next(line for line in script.read_text().replace("\\\n", " ").splitlines() if "flows.cli run" in line)
    command = command.replace("$BASE", str(tmp_path / "base")).replace("$STAGE_PYTHON", "/opt/stage/bin/python")
    words = shlex.split(command)
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    profile = load_profile(ROOT / "configs" / "qwen-gpu.yaml", overrides)
    assert profile.runtime.gpu_deployment is None and profile.runtime.launcher == "accelerate"
    assert profile.stages == ["eval_base", "eval_r1_zero", "eval_cold_start"] and profile.grpo.max_steps == 5
    # with no BASE it trains a random model saved by the GPU check: a folder the base stage loads
    saved = subprocess.run([sys.executable, "bench/gpu_check.py", "--shape", "micro", "--save", str(tmp_path / "base")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert saved.returncode == 0, saved.stderr[-2000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "base").config.hidden_size == 64
