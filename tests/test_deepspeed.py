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


def two_processes(zero: str):
    """Two processes on this machine, as the profile says (the launch file's num_processes is not read)."""
    return load_profile(CONFIGS / "micro.yaml", ["runtime.device=cpu", "runtime.launcher=accelerate",
                                               f"runtime.accelerate_config={CONFIGS / 'accelerate' / zero}",
                                               "runtime.processes_per_machine=2"])


@pytest.mark.parametrize("module", ["sft", "grpo"])
def test_training_stage_runs_data_parallel_under_deepspeed(module, random_model, micro_data, tmp_path):
    profile = two_processes("zero2.yaml")
    # 10 SFT steps (2 logged): enough for the loss to fall, a quarter of the micro cold start's cost. GRPO with
    # gradient checkpointing, and a held-out curve of 5 prompts that the two processes share (3 and 2).
    section = profile.cold_start.model_copy(update={"max_steps": 10}) if module == "sft" else \
        profile.grpo.model_copy(update={"gradient_checkpointing": True})
    data = micro_data / ("cold_start.jsonl" if module == "sft" else "train.jsonl")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join((micro_data / "test.jsonl").read_text().splitlines(keepends=True)[:5]))
    inputs = {"model": Artifact(str(random_model), "random"), "data": Artifact(str(data), "micro"),
              **({"heldout": Artifact(str(heldout), "five")} if module == "grpo" else {})}
    out = run_stage(module, module, section, inputs, profile, tmp_path)
    folder, result = out.folder, out.result
    assert not out.cached and result["world_size"] == 2 and result["deepspeed_zero_stage"] == 2
    assert result["gradient_checkpointing"] is (module == "grpo")
    before, after = load_file(random_model / "model.safetensors"), load_file(folder / "model" / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert not (folder / "model" / "training_args.bin").exists()  # safetensors and json only
    if module == "sft":
        assert result["last_loss"] < result["first_loss"]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps) and steps.count(steps[0]) == 1  # logged by rank 0 only
    if module == "grpo":  # each measurement once, over all 5 prompts, each process sampling its share
        assert [row["step"] for row in rows if "heldout/pass@1" in row] == [0, 2, 4]
        log = (folder / "stage.log").read_text()
        for step in (0, 2, 4):
            assert f"held-out pass@1 at step {step}: rank 0 sampled 3 of 5 prompts" in log
            assert f"held-out pass@1 at step {step}: rank 1 sampled 2 of 5 prompts" in log


def test_zero3_shards_the_parameters_and_saves_a_whole_model(random_model, micro_data, tmp_path):
    profile = two_processes("zero3.yaml")
    section = profile.cold_start.model_copy(update={"max_steps": 4})
    out = run_stage("sft", "sft", section, {"model": Artifact(str(random_model), "random"),
                                            "data": Artifact(str(micro_data / "cold_start.jsonl"), "micro")},
                    profile, tmp_path)
    folder, result = out.folder, out.result
    assert result["world_size"] == 2 and result["deepspeed_zero_stage"] == 3
    saved = load_file(folder / "model" / "model.safetensors")  # gathered from both ranks' shards
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in load_file(random_model /
                                                                                       "model.safetensors").items()}
