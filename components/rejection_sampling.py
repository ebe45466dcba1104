"""Rejection sampling stage: k samples per training prompt, keep the correct, well-formed, new ones.

    python -m components.rejection_sampling --spec SPEC.json

Inputs: ``inputs.model`` (the R1 RL checkpoint) and ``inputs.data`` (training prompts). Writes
``train.jsonl`` (an SFT dataset of R1-format traces), ``answers.jsonl`` (the same prompts and
verified answers with the reasoning left out: distillation's control) and acceptance statistics in
``result.json``.
"""

from __future__ import annotations

import json

from components.addition import r1_completion
from components.generation import Sampling, generate
from components.jsonl import load_jsonl, write_jsonl
from components.modeling import load_tokenizer, render_prompt
from components.rewards import accuracy_reward, extract_answer, format_reward, language_reward
from components.sections import RejectionSamplingConfig
from components.stage_io import StageSpec, main, seed_everything, write_result


def accept(record: dict, completions: list[str]) -> tuple[list[str], dict]:
    """The completions worth training on, and why the others were rejected."""
    n = len(completions)
    columns = {"answer": [record["answer"]] * n, "task": [record["task"]] * n,
               "numbers": [record.get("numbers")] * n, "entry": [record.get("entry")] * n}
    correct = accuracy_reward(completions, **columns)
    formatted = format_reward(completions)
    consistent = language_reward(completions)
    kept, seen = [], set()
    reasons = {"wrong": 0, "malformed": 0, "mixed_language": 0, "duplicate": 0}
    for text, ok, form, lang in zip(completions, correct, formatted, consistent):
        key = " ".join(text.split())
        if not ok:
            reasons["wrong"] += 1
        elif not form:
            reasons["malformed"] += 1
        elif lang < 1.0:
            reasons["mixed_language"] += 1
        elif key in seen:
            reasons["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(text.strip())
    return kept, reasons


def run(spec: StageSpec) -> dict:
    cfg = RejectionSamplingConfig(**spec.config)
    seed_everything(spec.seed)
    records = load_jsonl(spec.inputs["data"])[: cfg.max_prompts]
    tokenizer = load_tokenizer(spec.inputs["model"])
    prompts = [render_prompt(tokenizer, r["question"], spec.prompt_template) for r in records]
    [samples] = generate(
        spec.inputs["model"], prompts,
        [Sampling(k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)],
        seed=spec.seed, batch_size=cfg.batch_size, device=spec.device, backend=spec.generation_backend,
        labels=["rejection sampling"], precision=spec.precision, vllm=spec.vllm,
    )
    traces, totals = [], {"wrong": 0, "malformed": 0, "mixed_language": 0, "duplicate": 0}
    prompts_kept = 0
    for record, completions in zip(records, samples):
        kept, reasons = accept(record, [c.text for c in completions])
        traces += [{**record, "id": f"{record['id']}-{i}", "completion": text} for i, text in enumerate(kept)]
        prompts_kept += bool(kept)
        totals = {k: totals[k] + reasons[k] for k in totals}
    write_jsonl(spec.output / "train.jsonl", traces)
    write_jsonl(spec.output / "answers.jsonl", [{**t, "completion": r1_completion("", extract_answer(t["completion"]))}
                                                for t in traces])
    sampled = len(records) * cfg.k
    result = {"prompts": len(records), "samples": sampled, "accepted": len(traces),
              "acceptance_rate": len(traces) / sampled if sampled else 0.0,
              "prompts_with_accepted": prompts_kept, "rejected": totals,
              "data": str(spec.output / "train.jsonl")}
    write_result(spec.output, result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(run)
