"""Evaluate stage: R1's protocol on held-out prompts, with per-sample records kept.

    python -m components.evaluate --spec SPEC.json

pass@1 is the mean correctness over k samples at temperature 0.6 / top-p 0.95; cons@k is the
majority vote of the k extracted answers; greedy accuracy uses one greedy decode. Format rate,
language consistency and mean completion length (tokens) come from the same samples, and so does
lenient pass@1: the last number anywhere in the completion graded instead of the ``<answer>``
where the gold is a number (lenient minus strict is what the format costs; lenient alone is what
the model computes), the ``<answer>`` itself where it is not.
"""

from __future__ import annotations

import json
from collections import Counter
from statistics import mean

from components.generation import Sampling, generate
from components.jsonl import load_jsonl, write_jsonl
from components.modeling import load_tokenizer, render_prompt
from components.rewards import extract_answer, format_reward, grade, language_reward, lenient_answer
from components.sections import EvaluateConfig
from components.stage_io import StageSpec, main, seed_everything, write_result


def majority(answers: list[str | None]) -> str | None:
    """The most common non-empty answer (ties go to the first seen), compared whitespace-free."""
    votes = Counter("".join(a.split()) for a in answers if a and a.strip())
    return votes.most_common(1)[0][0] if votes else None


def score(records: list[dict], sampled: list[list], greedy: list[list]) -> tuple[dict, list[dict]]:
    """Aggregate metrics and per-sample records for k samples (+1 greedy) per prompt."""
    rows, per_prompt, lenient, cons, greedy_ok = [], [], [], [], []
    for record, samples, (best,) in zip(records, sampled, greedy):
        texts = [s.text for s in samples]
        correct = [grade(extract_answer(t), record) for t in texts]
        lenient.append(mean(grade(lenient_answer(t, record["answer"]), record) for t in texts))
        formats = format_reward(texts)
        langs = language_reward(texts)
        for i, (s, ok, form, lang) in enumerate(zip(samples, correct, formats, langs)):
            rows.append({"id": record["id"], "sample": i, "completion": s.text, "answer": extract_answer(s.text),
                         "gold": record["answer"], "correct": ok, "format": form, "language": lang,
                         "tokens": s.tokens, "finished": s.finished})
        per_prompt.append(mean(correct))
        vote = majority([extract_answer(t) for t in texts])
        cons.append(vote is not None and grade(vote, record))
        greedy_ok.append(grade(extract_answer(best.text), record))
    metrics = {
        "pass@1": mean(per_prompt),
        "lenient_pass@1": mean(lenient),
        f"cons@{len(sampled[0])}": mean(cons),
        "greedy_accuracy": mean(greedy_ok),
        "format_rate": mean(r["format"] for r in rows),
        "language_consistency": mean(r["language"] for r in rows),
        "mean_length": mean(r["tokens"] for r in rows),
        "prompts": len(records),
    }
    return metrics, rows


def run(spec: StageSpec) -> dict:
    cfg = EvaluateConfig(**spec.config)
    seed_everything(spec.seed)
    records = load_jsonl(spec.inputs["data"])[: cfg.limit]
    tokenizer = load_tokenizer(spec.inputs["model"])
    prompts = [render_prompt(tokenizer, r["question"], spec.prompt_template) for r in records]
    sampled, greedy = generate(
        spec.inputs["model"], prompts,
        [Sampling(cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens),
         Sampling(1, max_new_tokens=cfg.max_new_tokens, greedy=True)],
        labels=["evaluating (sampled)", "evaluating (greedy)"], seed=spec.seed, batch_size=cfg.batch_size,
        device=spec.device, backend=spec.generation_backend, precision=spec.precision, vllm=spec.vllm)
    metrics, rows = score(records, sampled, greedy)
    write_jsonl(spec.output / "samples.jsonl", rows)
    (spec.output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_result(spec.output, {"metrics": metrics, "samples": str(spec.output / "samples.jsonl")})
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main(run)
