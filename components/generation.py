"""The generator backend: k sampled completions per prompt, from transformers or vLLM.

transformers' ``generate`` runs in any environment; vLLM only in the vLLM stage environment, and is
imported lazily (``components.vllm_engine``) so this module loads anywhere. Both return, per prompt,
k completions as text plus token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress

from components.modeling import load_model, load_tokenizer, pick_device
from components.vllm_engine import start_engine


@dataclass(frozen=True)
class Sampling:
    k: int = 1
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 64
    greedy: bool = False


@dataclass
class Completion:
    text: str
    tokens: int
    finished: bool  # ended with EOS rather than by hitting max_new_tokens


def generate(model_dir: str | Path, prompts: list[str], samplings: list[Sampling], *, seed: int = 0,
             batch_size: int = 64, device: str = "auto", backend: str = "transformers",
             labels: list[str] | None = None, precision: str = "auto",
             vllm: dict | None = None) -> list[list[list[Completion]]]:
    """For each of ``samplings``, k completions for each prompt (prompts are already rendered
    through the chat template), from one model load or one vLLM engine (``vllm``: its settings)."""
    device = pick_device(device)
    labels = labels or ["generating"] * len(samplings)
    if backend == "vllm":
        return _generate_vllm(model_dir, prompts, samplings, seed, device, precision, vllm or {})
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device, precision=precision).eval()
    results = []
    for sampling, label in zip(samplings, labels):
        torch.manual_seed(seed)
        results.append(sample(model, tokenizer, prompts, sampling, batch_size=batch_size, label=label))
    return results


def sample(model, tokenizer, prompts: list[str], sampling: Sampling, *, batch_size: int = 64,
           label: str = "generating", synced_gpus: bool = False) -> list[list[Completion]]:
    """k completions per prompt from a model already in memory (``generate`` loads one; GRPO's
    held-out curve samples the policy it is training). ``synced_gpus``: every ZeRO-3 rank steps
    through generation together."""
    results: list[list[Completion]] = []
    with Progress(transient=True) as progress:
        bar = progress.add_task(label, total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                output = model.generate(
                    **batch, do_sample=not sampling.greedy,
                    temperature=None if sampling.greedy else sampling.temperature,
                    top_p=None if sampling.greedy else sampling.top_p, top_k=0 if not sampling.greedy else None,
                    max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.k,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=synced_gpus,
                )
            new = output[:, batch["input_ids"].shape[1] :]
            for i in range(0, len(new), sampling.k):
                results.append([_completion(tokenizer, row) for row in new[i : i + sampling.k]])
            progress.advance(bar, len(new) // sampling.k)
    return results


def _completion(tokenizer, ids: torch.Tensor) -> Completion:
    ids = ids.tolist()
    finished = tokenizer.eos_token_id in ids
    if finished:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    ids = [i for i in ids if i != tokenizer.pad_token_id or i == tokenizer.eos_token_id]
    return Completion(tokenizer.decode(ids, skip_special_tokens=True), len(ids), finished)


def _generate_vllm(model_dir, prompts: list[str], samplings: list[Sampling], seed: int, device: str,
                   precision: str, settings: dict) -> list[list[list[Completion]]]:
    from vllm import SamplingParams  # the vLLM stage environment only

    llm = start_engine(model_dir, settings, device, precision, seed)
    results = []
    for sampling in samplings:
        params = SamplingParams(
            n=sampling.k, temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p, max_tokens=sampling.max_new_tokens, seed=seed)
        results.append([[Completion(c.text, len(c.token_ids), c.finish_reason == "stop") for c in request.outputs]
                        for request in llm.generate(prompts, params, use_tqdm=False)])
    return results
