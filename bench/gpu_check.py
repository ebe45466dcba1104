"""A GPU worker's first check: a Qwen2.5-0.5B-shaped model with random weights (nothing is
downloaded), a few SFT steps and a few GRPO steps (TRL) in bf16.

    .venv/bin/python bench/gpu_check.py                      # on a CUDA GPU: the 0.5B shape
    .venv/bin/python bench/gpu_check.py --vllm colocate      # GRPO rollouts by TRL's vLLM (stage env)
    .venv/bin/python bench/gpu_check.py --shape micro        # anywhere (the test suite runs this on CPU)

Prints SFT tokens/s and model-FLOPs utilisation (the weights' 6 × parameters and attention's
12 × layers × hidden × length FLOPs a token, against the device's dense bf16 peak where its exact
model is known, or ``--peak-tflops``), GRPO generated tokens/s and the share of a GRPO step spent
generating, both from the generation time TRL itself measures (Hugging Face ``generate``, or vLLM).
The model is saved to a folder first and GRPO loads it from there, as a stage does: vLLM reads
its weights from a folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from components.modeling import build_tiny_tokenizer, save_model

SHAPES = {  # Qwen2.5-0.5B's architecture; micro: the same family, small enough for a CPU test
    "qwen2.5-0.5b": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                         "intermediate_size": 4864, "vocab_size": 151936},
    "micro": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 128, "vocab_size": 512},
}
GROUP = 8  # GRPO completions per prompt, and per step
# Dense bf16 peak FLOP/s by the exact name torch reports (NVIDIA's data sheets, without sparsity). A
# name that is not here has no MFU unless --peak-tflops gives it: an H100 PCIe is not an SXM H100.
PEAK_BF16 = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12, "NVIDIA L40": 181e12, "NVIDIA L4": 121e12, "NVIDIA A10": 125e12,
}
GENERATION = ("transformers.generate", "transformers.generate_batch", "vLLM.generate")  # TRL's own timers


def build_model(shape: str, device: str) -> tuple[Qwen2ForCausalLM, object]:
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=4096,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(device), tokenizer


def peak_flops(name: str) -> float | None:
    """The dense bf16 peak of a GPU by its exact name; None for another name (or a CPU)."""
    return PEAK_BF16.get(name)


def training_flops_per_token(config, parameters: int, length: int) -> float:
    """A training token's FLOPs: 6 × parameters (forward and backward through the weights) and
    attention's scores and weighted values, 12 × layers × hidden × sequence length (PaLM's count)."""
    return 6 * parameters + 12 * config.num_hidden_layers * config.hidden_size * length


def sft_check(model, device: str, steps: int, batch: int, length: int, peak: float | None) -> dict:
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
    flops = training_flops_per_token(model.config, model.num_parameters(), length) * tokens_per_s
    return {"sft_tokens_per_s": tokens_per_s, "sft_mfu": flops / peak if peak else None}


def trl_timings() -> dict[str, float]:
    """Seconds that TRL's own profiling timers measure (generation, weight sync), summed by name.
    TRL hands them only to wandb, MLflow or trackio; this keeps a copy."""
    from trl.extras import profiling

    totals: dict[str, float] = defaultdict(float)
    original = profiling.ProfilingContext._log_metrics

    def kept(context, duration: float) -> None:
        totals[context.name.split(".", 1)[-1]] += duration  # "GRPOTrainer.vLLM.generate": "vLLM.generate"
        original(context, duration)

    profiling.ProfilingContext._log_metrics = kept
    return totals


def grpo_check(model, tokenizer, device: str, steps: int, completion: int, vllm: str | None) -> dict:
    """TRL GRPO steps with a length reward on the model loaded from a folder; generation time as
    TRL measures it, against the whole step."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    prompts = Dataset.from_dict({"prompt": [f"{a} + {b} =" for a, b in zip(range(64), range(64, 128))]})
    with tempfile.TemporaryDirectory() as scratch:
        folder = save_model(model, tokenizer, Path(scratch) / "model")
        args = GRPOConfig(output_dir=scratch, max_steps=steps, per_device_train_batch_size=GROUP, num_generations=GROUP,
                          max_completion_length=completion, learning_rate=1e-6, beta=0.0, report_to="none",
                          logging_steps=1, save_strategy="no", use_cpu=device == "cpu", bf16=device == "cuda",
                          disable_tqdm=True, **({"use_vllm": True, "vllm_mode": vllm} if vllm else {}))
        trainer = GRPOTrainer(model=str(folder), args=args, processing_class=tokenizer, train_dataset=prompts,
                              reward_funcs=[lambda completions, **_: [len(c) / 100 for c in completions]])
        timings = trl_timings()
        sync(device)
        started = time.perf_counter()
        trainer.train()
        sync(device)
        seconds = time.perf_counter() - started
    generating = sum(timings[name] for name in GENERATION)
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
    generated = sum(lengths) * GROUP  # mean completion tokens × completions per step (one prompt's group)
    return {"grpo_seconds_per_step": seconds / steps,
            "grpo_generated_tokens_per_s": generated / generating if generating else None,
            "grpo_generation_share": generating / seconds,
            "grpo_weight_sync_seconds": timings["sync_weights"] if vllm else None}


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
    parser.add_argument("--save", type=Path, default=None, help="only save the shape's random model to this folder "
                        "(a base for a first run with nothing downloaded)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, where its "
                        "name is not in PEAK_BF16")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = build_model(args.shape, device)
    if args.save:
        print(f"saved {save_model(model, tokenizer, args.save)}")
        return
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(where)
    print(f"device: {where}; shape {args.shape}: {model.num_parameters() / 1e6:.1f}M parameters")
    figures = {**sft_check(model, device, args.steps, args.batch, args.length, peak),
               **grpo_check(model, tokenizer, device, args.steps, args.completion, args.vllm)}
    for name, value in figures.items():
        print(f"{name}: {'n/a' if value is None else f'{value:.4g}'}")
    if peak is None:
        print(f"sft_mfu needs the peak of {where!r}: pass --peak-tflops")


if __name__ == "__main__":
    main()
