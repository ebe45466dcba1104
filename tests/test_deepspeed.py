"""Training stages under `accelerate launch` with DeepSpeed ZeRO-2: two processes over gloo on CPU."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.config import load_profile
from flows.keys import Artifact
from flows.stages import run_stage

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture
def two_process_profile(tmp_path):
    launch = tmp_path / "zero2x2.yaml"
    text = (CONFIGS / "accelerate" / "zero2.yaml").read_text()
    launch.write_text(text.replace("num_processes: 1", "num_processes: 2"))
    return load_profile(CONFIGS / "micro.yaml", ["runtime.device=cpu", "runtime.launcher=accelerate",
                                               f"runtime.accelerate_config={launch}"])


@pytest.mark.parametrize("module", ["sft", "grpo"])
def test_training_stage_runs_data_parallel_under_deepspeed(module, two_process_profile, random_model, micro_data,
                                                           tmp_path):
    profile = two_process_profile
    # 10 SFT steps (2 logged): enough for the loss to fall, a quarter of the micro cold start's cost
    section = profile.cold_start.model_copy(update={"max_steps": 10}) if module == "sft" else profile.grpo
    data = micro_data / ("cold_start.jsonl" if module == "sft" else "train.jsonl")
    out = run_stage(module, module, section, {"model": Artifact(str(random_model), "random"),
                                              "data": Artifact(str(data), "micro")}, profile, tmp_path)
    folder, result = out.folder, out.result
    assert not out.cached and result["world_size"] == 2 and result["deepspeed_zero_stage"] == 2
    before, after = load_file(random_model / "model.safetensors"), load_file(folder / "model" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert not (folder / "model" / "training_args.bin").exists()  # safetensors and json only
    if module == "sft":
        assert result["last_loss"] < result["first_loss"]
    steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(steps[0]) == 1  # logged by rank 0 only


def test_zero3_shards_the_parameters_and_saves_a_whole_model(random_model, micro_data, tmp_path):
    launch = tmp_path / "zero3x2.yaml"
    launch.write_text((CONFIGS / "accelerate" / "zero3.yaml").read_text().replace("num_processes: 1",
                                                                                 "num_processes: 2"))
    profile = load_profile(CONFIGS / "micro.yaml", ["runtime.device=cpu", "runtime.launcher=accelerate",
                                                   f"runtime.accelerate_config={launch}"])
    section = profile.cold_start.model_copy(update={"max_steps": 4})
    out = run_stage("sft", "sft", section, {"model": Artifact(str(random_model), "random"),
                                            "data": Artifact(str(micro_data / "cold_start.jsonl"), "micro")},
                    profile, tmp_path)
    folder, result = out.folder, out.result
    assert result["world_size"] == 2 and result["deepspeed_zero_stage"] == 3
    saved = load_file(folder / "model" / "model.safetensors")  # gathered from both ranks' shards
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in load_file(random_model /
                                                                                       "model.safetensors").items()}
