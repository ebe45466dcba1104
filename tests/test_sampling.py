"""Generation, evaluation metrics and rejection sampling."""

import json

from components import evaluate, rejection_sampling
from components.generation import Completion, Sampling, generate
from components.modeling import load_tokenizer, render_prompt
from components.rewards import extract_answer, is_correct, last_number
from components.stage_io import StageSpec

RIGHT = "<think>\n1+1=2\n</think>\n<answer>2</answer>"
WRONG = "<think>\n1+1=3\n</think>\n<answer>3</answer>"


def test_generate_returns_k_bounded_completions(random_model):
    tokenizer = load_tokenizer(random_model)
    prompts = [render_prompt(tokenizer, f"What is {i} + 1?") for i in range(3)]
    [out] = generate(random_model, prompts, [Sampling(k=2, max_new_tokens=5)], device="cpu", batch_size=2)
    assert [len(group) for group in out] == [2, 2, 2]
    assert all(c.tokens <= 5 for group in out for c in group)
    one = [Sampling(k=1, max_new_tokens=5, greedy=True)]
    [greedy] = generate(random_model, prompts, one, device="cpu")
    assert [greedy] == generate(random_model, prompts, one, device="cpu")


def test_score_computes_pass_at_1_cons_and_greedy():
    records = [{"id": "a", "task": "addition", "question": "1+1", "answer": "2"},
               {"id": "b", "task": "addition", "question": "1+1", "answer": "2"}]
    c = lambda text: Completion(text, 10, True)
    sampled = [[c(RIGHT), c(RIGHT), c(WRONG), c(WRONG)],  # 2/4 right, vote ties to the first seen: right
               [c(WRONG), c(WRONG), c("no format <answer>2</answer>"), c(WRONG)]]
    greedy = [[c(RIGHT)], [c(WRONG)]]
    metrics, rows = evaluate.score(records, sampled, greedy)
    assert metrics["pass@1"] == (0.5 + 0.25) / 2
    assert metrics["cons@4"] == 0.5
    assert metrics["greedy_accuracy"] == 0.5
    assert metrics["format_rate"] == 7 / 8
    assert len(rows) == 8 and rows[0]["correct"] and not rows[2]["correct"]


def test_evaluate_stage_writes_per_sample_records(random_model, micro_data, tmp_path):
    metrics = evaluate.run(StageSpec("eval", {"k": 2, "max_new_tokens": 8, "limit": 4}, tmp_path,
                                     {"model": str(random_model), "data": str(micro_data / "test.jsonl")},
                                     device="cpu"))
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert metrics["prompts"] == 4 and len(rows) == 8
    assert set(rows[0]) >= {"id", "completion", "answer", "gold", "correct", "format", "tokens"}


def test_accept_keeps_correct_well_formed_unique_traces():
    record = {"task": "addition", "answer": "2"}
    kept, reasons = rejection_sampling.accept(
        record, [RIGHT, RIGHT + " ", WRONG, "<answer>2</answer>", "<think>два</think><answer>2</answer>"])
    assert kept == [RIGHT]
    assert reasons == {"wrong": 1, "malformed": 1, "mixed_language": 1, "duplicate": 1}


def test_rejection_sampling_stage_reports_acceptance(tiny_base, micro_data, tmp_path):
    result = rejection_sampling.run(StageSpec(
        "rs", {"k": 4, "max_new_tokens": 32, "max_prompts": 16}, tmp_path,
        {"model": str(tiny_base), "data": str(micro_data / "train.jsonl")}, device="cpu"))
    kept = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert result["samples"] == 64 and result["accepted"] == len(kept)
    assert len({row["id"] for row in kept}) == len(kept)  # one id per trace, not per prompt
    assert result["accepted"] + sum(result["rejected"].values()) == 64
    assert all(is_correct(extract_answer(row["completion"]), row["answer"], "addition") for row in kept)
    # Distillation's control: the same prompts and verified answers, the reasoning left out.
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == [k["id"] for k in kept]
    assert all(a["completion"] == f"<think>\n</think>\n<answer>{extract_answer(k['completion'])}</answer>"
               for a, k in zip(answers, kept))


def test_lenient_pass_at_1_grades_the_last_number_beside_strict():
    records = [{"id": "a", "task": "addition", "question": "2+2", "answer": "4"}]
    c = lambda text: Completion(text, 5, True)
    sampled = [[c("<think>2+2</think><answer>4</answer>"), c("2 + 2 = 4"), c("it is 5"), c("<answer>4</answer> 3")]]
    metrics, _ = evaluate.score(records, sampled, [[c("4")]])
    assert metrics["pass@1"] == 0.5  # the tagged answers: 4, and 4 (the last tag, lenient extraction)
    assert metrics["lenient_pass@1"] == 0.5  # the last numbers: 4, 4, 5, 3
    assert last_number("x = -1,200.") == "-1200"
    fraction = [{"id": "f", "task": "math", "question": "1/2?", "answer": "\\frac{1}{2}"}]
    metrics, _ = evaluate.score(fraction, [[c("<answer>\\frac{1}{2}</answer>")]], [[c("")]])
    assert metrics["lenient_pass@1"] == metrics["pass@1"] == 1.0  # not "2", the last number
