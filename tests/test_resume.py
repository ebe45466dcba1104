"""Crash resume: checkpoints are atomic, a killed pipeline continues where it stopped."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import stage_processes, wait_until
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from components import base
from components.sections import ModelConfig
from components.stage_io import keep_checkpoint, latest_checkpoint

MICRO = str(Path(__file__).parents[1] / "configs" / "micro.yaml")
TINY = ModelConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32, pretrain_examples=64,
                   pretrain_steps=6, pretrain_batch_size=8, save_steps=2, pretrain_ema=0.5)


def test_only_complete_checkpoints_are_ever_found(tmp_path):
    folder = tmp_path / "checkpoints"
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "model.safetensors").write_text("x")
    assert latest_checkpoint(folder) is None
    keep_checkpoint(tmp_path / "checkpoint-4", folder, tmp_path / "metrics.jsonl")
    (folder / "checkpoint-8-partial").mkdir()  # not a name a complete checkpoint ever has
    assert latest_checkpoint(folder) == folder / "checkpoint-4"
    (tmp_path / "checkpoint-8").mkdir()
    keep_checkpoint(tmp_path / "checkpoint-8", folder, tmp_path / "metrics.jsonl")
    assert latest_checkpoint(folder) == folder / "checkpoint-8"
    assert [p.name for p in folder.iterdir()] == ["checkpoint-8"]  # older and partial ones are dropped


def test_resumed_pretraining_ends_exactly_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    for name in ("straight", "first", "second"):
        (tmp_path / name).mkdir()
    base.run(TINY, seed=0, template="{question}", output=tmp_path / "straight")
    kept = []

    def crash_after_first(*args):
        kept.append(base_keep(*args))
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    base_keep = base.keep_checkpoint
    monkeypatch.setattr(base, "keep_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        base.run(TINY, seed=0, template="{question}", output=tmp_path / "first", checkpoints=tmp_path / "ckpt")
    monkeypatch.setattr(base, "keep_checkpoint", base_keep)
    result = base.run(TINY, seed=0, template="{question}", output=tmp_path / "second", checkpoints=tmp_path / "ckpt")
    assert kept[0].name == "checkpoint-2" and result["resumed_from_step"] == 2
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "second" / "model" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_sigkill_mid_grpo_then_the_same_command_resumes_from_the_last_checkpoint(tmp_path):
    # GRPO and what the resume can disturb: the stages before it (cached on the second run), both
    # GRPO stages (the second must start afresh) and their evaluations and registered versions.
    command = [sys.executable, "-m", "flows.cli", "run", "--config", MICRO, "--set", "runtime.device=cpu",
               "--set", "grpo.max_steps=20", "--set", "grpo.save_steps=5",
               "--set", "stages=[eval_base, eval_cold_start, eval_r1_zero, eval_r1_rl]"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    stages = tmp_path / ".r1flow" / "stages"
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    wait_until(lambda: list(stages.glob("r1_zero/.checkpoints-*/checkpoint-*")), 600, "a GRPO checkpoint", first)
    os.kill(first.pid, signal.SIGKILL)  # the pipeline process only: its stage must die with it
    first.wait()
    checkpoint = latest_checkpoint(next(stages.glob("r1_zero/.checkpoints-*")))
    time.sleep(2)
    assert stage_processes(tmp_path) == []  # no orphaned GRPO writing on
    with contextlib.suppress(ProcessLookupError):
        os.killpg(first.pid, signal.SIGKILL)  # what else the crash orphaned: Prefect's temporary server
    logged = [json.loads(line)["step"] for line in
              next(stages.glob("r1_zero/.tmp-*")).joinpath("metrics.jsonl").read_text().splitlines()]

    again = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / '.r1flow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("r1flow")
    finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    parent = next(r for r in finished if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_name: r for r in client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert children["data"].data.tags["cached"] == children["base"].data.tags["cached"] == "True"
    resumed = children["r1_zero"].data.metrics["resumed_from_step"]
    assert resumed >= int(checkpoint.name.split("-")[1]) and max(logged) - resumed <= 5  # ≤ one interval lost
    steps = [m.step for m in client.get_metric_history(children["r1_zero"].info.run_id, "reward")]
    assert steps == sorted(set(steps)) and steps[-1] == 20  # one curve, continued, to the last step
    assert children["r1_rl"].data.metrics["resumed_from_step"] == 0
    for model in client.search_registered_models():
        assert len(client.search_model_versions(f"name = '{model.name}'")) == 1  # no duplicate versions
    assert [p.name for p in stages.glob("*/.*")] == []  # no temporary or checkpoint folder left
