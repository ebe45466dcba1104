"""SFT and GRPO stages on tiny models: parameters change and the training signal moves."""

import json

import torch
from safetensors.torch import load_file

from components import grpo, sft
from components.stage_io import StageSpec


def _changed(before: str, after: str) -> bool:
    a, b = load_file(before), load_file(after)
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_sft_lowers_completion_loss(random_model, micro_data, tmp_path):
    result = sft.run(StageSpec("sft", {"max_steps": 20, "learning_rate": 3e-3, "logging_steps": 2,
                                       "per_device_train_batch_size": 8},
                               tmp_path, {"model": str(random_model), "data": str(micro_data / "cold_start.jsonl")},
                               device="cpu"))
    assert result["last_loss"] < result["first_loss"]
    assert _changed(random_model / "model.safetensors", tmp_path / "model" / "model.safetensors")
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 20


def test_grpo_updates_the_policy_from_rule_rewards(tiny_base, micro_data, tmp_path):
    result = grpo.run(StageSpec("grpo", {"max_steps": 3, "learning_rate": 1e-4, "logging_steps": 1,
                                         "per_device_train_batch_size": 8, "num_generations": 4,
                                         "max_completion_length": 24},
                                tmp_path, {"model": str(tiny_base), "data": str(micro_data / "train.jsonl")},
                                device="cpu"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result["steps"] == 3 and len(rows) >= 3
    # Groups whose rewards differ carry an advantage, hence a gradient.
    assert min(row["frac_reward_zero_std"] for row in rows if "frac_reward_zero_std" in row) < 1.0
    assert all(key in rows[0] for key in ("reward", "rewards/accuracy_reward/mean", "completions/mean_length", "kl"))
    assert _changed(tiny_base / "model.safetensors", tmp_path / "model" / "model.safetensors")


def test_grpo_with_lora_in_bf16_saves_a_merged_plain_model(tiny_base, micro_data, tmp_path):
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
