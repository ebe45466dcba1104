"""Stage folders keyed by content, and launching a stage as its own process.

A stage's output lives in ``<workspace>/stages/<name>/<key>``, where the key hashes the stage
config, the keys of its inputs and the code version of the component (its module and every
``components`` module it imports). It is written in a temporary folder and renamed into place
when complete, so a folder that exists is whole, and the same key means the same result.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from components.config import Profile, Section, content_hash
from components.stage_io import StageSpec

COMPONENTS = Path(__file__).resolve().parents[1] / "components"
DISTRIBUTED = ("sft", "grpo")  # the components `accelerate launch` starts; the rest run as one process


class StageFailed(RuntimeError):
    """A stage process exited with an error; the message carries the tail of its log."""


@dataclass(frozen=True)
class Artifact:
    """A file or folder produced by a stage, with the key that identifies its content."""

    path: str
    key: str


@cache
def code_version(module: str) -> str:
    """Hash of a component module and the ``components`` modules it imports, transitively."""
    seen: set[str] = set()
    pending = [module]
    digest = hashlib.sha256()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        source = (COMPONENTS / f"{name}.py").read_text()
        digest.update(name.encode() + source.encode())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components."):
                pending.append(node.module.split(".", 1)[1])
    return digest.hexdigest()[:16]


def file_digest(path: Path | None) -> str | None:
    return None if path is None else hashlib.sha256(path.read_bytes()).hexdigest()


def runtime_identity(module: str, profile: Profile) -> dict:
    """The runtime settings that change a stage's output: device, generation backend and, for a
    training stage under accelerate, the content of its config (world size, ZeRO stage, precision)."""
    runtime = profile.runtime
    identity = {"device": runtime.device, "generation_backend": runtime.generation_backend}
    if runtime.launcher == "accelerate" and module in DISTRIBUTED:
        identity["accelerate_config"] = file_digest(runtime.accelerate_config)
    return identity


def stage_key(module: str, config: Section, inputs: dict[str, Artifact], profile: Profile) -> str:
    shared = {"seed": profile.seed, "template": profile.prompt_template, "runtime": runtime_identity(module, profile)}
    return content_hash(module, code_version(module), config, {k: v.key for k, v in sorted(inputs.items())},
                        shared)[:16]


def launch_command(module: str, spec_path: Path, profile: Profile) -> list[str]:
    python = profile.runtime.stage_python or sys.executable
    if profile.runtime.launcher == "accelerate" and module in DISTRIBUTED:
        return [python, "-m", "accelerate.commands.launch", "--config_file", str(profile.runtime.accelerate_config),
                "-m", f"components.{module}", "--spec", str(spec_path)]
    return [python, "-m", f"components.{module}", "--spec", str(spec_path)]


def stage_folder(workspace: Path, name: str, key: str) -> Path:
    return workspace / "stages" / name / key


def scratch_folder(final: Path) -> Path:
    """This process's temporary folder for ``final``, after removing any that a killed process
    left (its pid is gone): a crash leaves nothing half-written behind once the stage runs again."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".*-{final.name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def install(tmp: Path, final: Path) -> None:
    """Rename a completed folder into place (atomic: the keyed folder appears only when whole);
    a forced rerun's old folder steps aside first."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    return True


def checkpoint_folder(workspace: Path, name: str, key: str) -> Path:
    """Complete checkpoints of an unfinished stage, kept across attempts until it completes."""
    return workspace / "stages" / name / f".checkpoints-{key}"


def run_stage(name: str, module: str, config: Section, inputs: dict[str, Artifact], profile: Profile,
              workspace: Path, total_steps: int | None = None, force: bool = False) -> tuple[Path, str, bool]:
    """Run a stage unless its keyed folder exists (or ``force``); returns (folder, key, cache hit).

    A stage killed part-way (crash, SIGKILL, Ctrl-C) leaves only its checkpoints; the next attempt
    with the same key continues from the last one.
    """
    key = stage_key(module, config, inputs, profile)
    final = stage_folder(workspace, name, key)
    if (final / "result.json").exists() and not force:
        return final, key, True
    tmp = scratch_folder(final)
    tmp.mkdir(parents=True)
    checkpoints = checkpoint_folder(workspace, name, key)
    spec = StageSpec(stage=name, config=config.model_dump(mode="json"), output=tmp,
                     inputs={k: v.path for k, v in inputs.items()}, seed=profile.seed,
                     device=profile.runtime.device, prompt_template=profile.prompt_template,
                     generation_backend=profile.runtime.generation_backend, checkpoints=checkpoints)
    command = launch_command(module, spec.write(tmp / "spec.json"), profile)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if profile.runtime.device == "cpu" or (profile.runtime.device == "auto" and not _has_cuda()):
        env["DS_ACCELERATOR"] = "cpu"
    log_path = tmp / "stage.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _follow(process, name, tmp / "metrics.jsonl", total_steps)
        except BaseException:  # Ctrl-C or a cancelled flow: stop the stage, leave no half-written folder
            process.kill()
            process.wait()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if process.returncode != 0 or not (tmp / "result.json").exists():
        logs = workspace / "logs"
        logs.mkdir(exist_ok=True)
        kept = shutil.move(log_path, logs / f"{name}-{key}.log")
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join(Path(kept).read_text().splitlines()[-15:])
        raise StageFailed(f"stage {name!r} failed (exit {process.returncode}); full log: {kept}\n{tail}")
    shutil.rmtree(tmp / "trainer", ignore_errors=True)  # the Trainer's scratch: checkpoints already moved out
    install(tmp, final)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return final, key, False


@cache
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _follow(process: subprocess.Popen, name: str, metrics: Path, total: int | None) -> None:
    """Show a progress bar fed by the stage's metrics log while the process runs."""
    columns = [TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TimeElapsedColumn()]
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        bar = progress.add_task(name, total=total)
        while process.poll() is None:
            time.sleep(1.0)
            if metrics.exists():
                lines = metrics.read_text().splitlines()
                try:
                    progress.update(bar, completed=json.loads(lines[-1]).get("step", 0) if lines else 0)
                except json.JSONDecodeError:  # a line being written right now
                    pass
