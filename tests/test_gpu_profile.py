"""The GPU profile, checked without a GPU: it loads, and TRL builds its GRPO config with TRL's own
vLLM integration turned on (vLLM itself is imported only by the trainer, on a GPU worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import ConfigError, load_profile
from components.grpo import grpo_arguments
from components.stage_io import StageSpec

ROOT = Path(__file__).parents[1]


def test_the_gpu_profile_builds_trl_configs_with_vllm_rollouts(monkeypatch, tmp_path):
    import transformers.training_args

    profile = load_profile(ROOT / "configs" / "qwen-gpu.yaml")
    assert profile.runtime.launcher == "accelerate" and profile.runtime.generation_backend == "vllm"
    # As on a bf16 GPU: transformers refuses bf16 where none is present.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    spec = StageSpec(stage="r1_zero", config=profile.grpo.model_dump(), output=tmp_path, checkpoints=tmp_path / "c")
    args = grpo_arguments(profile.grpo, spec, "cuda")
    assert args.use_vllm and args.vllm_mode == "colocate" and args.bf16
    assert args.vllm_gpu_memory_utilization == 0.3 and args.vllm_tensor_parallel_size == 1
    assert args.num_generations == 16 and args.max_completion_length == 1024 and args.save_strategy == "steps"
    assert args.gradient_checkpointing and profile.cold_start.gradient_checkpointing and \
        profile.sft.gradient_checkpointing


def test_the_gpu_profile_trains_on_every_gpu_and_names_no_local_path():
    profile = load_profile(ROOT / "configs" / "qwen-gpu.yaml")
    assert profile.runtime.processes_per_machine is None and profile.runtime.known_processes() is None  # every GPU
    # the prompts a step its comments give: 8 on one node of 8 GPUs, 16 on two
    assert [profile.grpo.generation_batch(gpus) // profile.grpo.num_generations for gpus in (8, 16)] == [8, 16]
    # what a worker on a fresh machine (a Kubernetes pod) has: the store, not this checkout's folders
    assert profile.base.path.startswith("s3://")


def test_server_mode_passes_the_server_address(tmp_path):
    profile = load_profile(ROOT / "configs" / "micro.yaml",
                           ["grpo.use_vllm=true", "grpo.vllm_mode=server", "grpo.vllm_server_host=10.0.0.5",
                            "grpo.vllm_server_port=8001"])
    spec = StageSpec(stage="r1_zero", config=profile.grpo.model_dump(), output=tmp_path)
    args = grpo_arguments(profile.grpo, spec, "cpu")
    assert (args.vllm_mode, args.vllm_server_host, args.vllm_server_port) == ("server", "10.0.0.5", 8001)
    assert not grpo_arguments(load_profile(ROOT / "configs" / "micro.yaml").grpo, spec, "cpu").use_vllm


def test_vllm_without_an_explicit_mode_is_refused():
    with pytest.raises(ConfigError, match="vllm_mode"):
        load_profile(ROOT / "configs" / "micro.yaml", ["grpo.use_vllm=true"])
