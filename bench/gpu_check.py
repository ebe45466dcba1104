"""A GPU worker's first check: a Qwen2.5-0.5B-shaped model with random weights (nothing is
downloaded), a few SFT steps and a few GRPO steps (TRL) in bf16.

    .venv/bin/python bench/gpu_check.py                      # on a CUDA GPU: the 0.5B shape
    .venv/bin/python bench/gpu_check.py --shape micro        # anywhere (the test suite runs this on CPU)

Prints SFT tokens/s and model-FLOPs utilisation (6 × parameters × tokens/s against the device's
dense bf16 peak, where the device is known), GRPO generated tokens/s, and the share of a GRPO step
spent generating (rollouts with Hugging Face ``generate``; TRL's vLLM when ``--vllm colocate``).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from components.modeling import build_tiny_tokenizer

SHAPES = {  # Qwen2.5-0.5B's architecture; micro: the same family, small enough for a CPU test
    "qwen2.5-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                         "intermediate_size": 4864, "vocab_size": 151936},
    "micro": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 128, "vocab_size": 512},
}
GROUP = 8  # GRPO completions per prompt, and per step
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def build_model(shape: str, device: str) -> tuple[Qwen2ForCausalLM, object]:
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device), tokenizer


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def sft_check(model, device: str, steps: int, batch: int, length: int) -> dict:
    """Plain next-token training steps under bf16 autocast: tokens/s and model-FLOPs utilisation."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    model.train()

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: kernels, allocator
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    tokens_per_s = steps * batch * length / (time.perf_counter() - started)
    peak = peak_flops(device)
    flops = 6 * model.num_parameters() * tokens_per_s
    return {"sft_tokens_per_s": tokens_per_s, "sft_mfu": flops / peak if peak else None}


def grpo_check(model, tokenizer, device: str, steps: int, completion: int, vllm: str | None) -> dict:
    """TRL GRPO steps with a length reward; time inside generation against the whole step."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    generating = [0.0]
    generate = model.generate

    def timed_generate(*args, **kwargs):
        sync(device)
        started = time.perf_counter()
        out = generate(*args, **kwargs)
        sync(device)
        generating[0] += time.perf_counter() - started
        return out

    model.generate = timed_generate
    prompts = Dataset.from_dict({"prompt": [f"{a} + {b} =" for a, b in zip(range(64), range(64, 128))]})
    with tempfile.TemporaryDirectory() as scratch:
        args = GRPOConfig(output_dir=scratch, max_steps=steps, per_device_train_batch_size=GROUP, num_generations=GROUP,
                          max_completion_length=completion, learning_rate=1e-6, beta=0.0, report_to="none",
                          logging_steps=1, save_strategy="no", use_cpu=device == "cpu", bf16=device == "cuda",
                          disable_tqdm=True, **({"use_vllm": True, "vllm_mode": vllm} if vllm else {}))
        trainer = GRPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=prompts,
                              reward_funcs=[lambda completions, **_: [len(c) / 100 for c in completions]])
        sync(device)
        started = time.perf_counter()
        trainer.train()
        sync(device)
        seconds = time.perf_counter() - started
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    generated = sum(lengths) * GROUP  # mean completion tokens × completions per step (one prompt's group)
    return {"grpo_seconds_per_step": seconds / steps,
            "grpo_generated_tokens_per_s": generated / max(generating[0], 1e-9),
            "grpo_generation_share": generating[0] / seconds if not vllm else None}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024, help="SFT sequence length")
    parser.add_argument("--completion", type=int, default=256, help="GRPO completion tokens")
    parser.add_argument("--vllm", choices=["colocate"], default=None, help="GRPO rollouts by TRL's vLLM")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = build_model(args.shape, device)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {where}; shape {args.shape}: {model.num_parameters() / 1e6:.1f}M parameters")
    figures = {**sft_check(model, device, args.steps, args.batch, args.length),
               **grpo_check(model, tokenizer, device, args.steps, args.completion, args.vllm)}
    for name, value in figures.items():
        print(f"{name}: {'n/a (no known peak for this device)' if value is None else f'{value:.4g}'}")


if __name__ == "__main__":
    main()
