"""run_stage (``flows.stages``): a stage runs in its own process, is cached by its key, leaves nothing
half-written when it fails or is interrupted, and reports progress where no terminal shows a bar."""

import json
import re

import pytest

from components.config import load_profile
from components.sections import ModelConfig
from flows import launch
from flows.stages import StageFailed, run_stage


def test_run_stage_caches_and_leaves_nothing_half_written(tmp_path):
    profile = load_profile(None, ["runtime.device=cpu"])
    tiny = ModelConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32, pretrain_examples=64,
                       pretrain_steps=2, pretrain_batch_size=8, pretrain_ema=0)
    out = run_stage("base", "base", tiny, {}, profile, tmp_path)
    folder, key = out.folder, out.key
    assert not out.cached and (folder / "model" / "model.safetensors").exists() and folder.name == key
    assert json.loads((folder / "result.json").read_text())["model"] == "model"  # valid after the rename
    again = run_stage("base", "base", tiny, {}, profile, tmp_path)
    assert again.cached and again.folder == folder and again.result == out.result

    broken = ModelConfig(source="gguf", path=str(tmp_path), gguf_file="absent.gguf")
    with pytest.raises(StageFailed, match="GGUF file not found"):
        run_stage("base", "base", broken, {}, profile, tmp_path)
    leftovers = [p.name for p in (tmp_path / "stages" / "base").iterdir()]
    assert leftovers == [key]  # no temporary folder left behind
    assert list((tmp_path / "logs").glob("base-*.log"))


def test_interrupted_stage_stops_its_process_and_leaves_no_folder(tmp_path, monkeypatch):
    started = []

    def interrupt(process, *args):
        started.append(process)
        raise KeyboardInterrupt  # what Ctrl-C raises in the flow while the stage runs

    monkeypatch.setattr(launch, "follow", interrupt)
    profile = load_profile(None, ["runtime.device=cpu"])
    with pytest.raises(KeyboardInterrupt):
        run_stage("base", "base", ModelConfig(pretrain_steps=10_000), {}, profile, tmp_path)
    assert started[0].poll() is not None  # the stage process was stopped, not left running
    assert list((tmp_path / "stages" / "base").iterdir()) == []


def test_a_stage_outside_a_terminal_prints_progress_lines(tmp_path, monkeypatch, capfd):
    """Where stderr is no terminal (here: pytest's capture; in use: CI, Prefect worker logs), a
    long stage says where it is (every 30 s; every 0.5 s here)."""
    monkeypatch.setattr(launch, "PROGRESS_EVERY", 0.5)
    profile = load_profile(None, ["runtime.device=cpu"])
    slow = ModelConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32, pretrain_examples=256,
                       pretrain_steps=400, pretrain_batch_size=8, pretrain_ema=0)
    run_stage("base", "base", slow, {}, profile, tmp_path, total_steps=400)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("base: step ")]
    assert lines and all(re.fullmatch(r"base: step \d+/400, \dm\d\ds(, loss [\d.e+-]+)?", line) for line in lines)
    assert any(", loss " in line for line in lines)
    assert launch.progress_line("eval_base", [], None, 185) == "eval_base: running, 3m05s"  # no steps to count


def test_stages_at_once_on_a_cpu_split_its_cores(monkeypatch):
    """Each of N stages at once gets 1/N of the cores as its thread count (each using every core,
    two pretrainings on 2 cores ran 8-9x slower per step); one stage at a time, or a thread count
    the user set, is left alone."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(8)))
    share = lambda n: launch.core_share(load_profile(None, [f"runtime.max_parallel={n}"]))
    assert share(1) == {} and share(2) == {"OMP_NUM_THREADS": "4"} and share(3) == {"OMP_NUM_THREADS": "2"}
    assert share(16) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert share(2) == {}
