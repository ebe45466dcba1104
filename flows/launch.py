"""The stage process: how it starts, how it is followed, and what it said when it failed.

A stage runs as ``python -m components.<module> --spec SPEC`` (or under ``accelerate launch``
for a training stage, across machines when it spans several), in the stage environment the
profile names; CPU stages in the orchestrator's own environment are forked from a warm server
(``flows.forkserver``, one per stage running at once), so the imports are paid once per run, not
per stage. Stages at once on a CPU split its cores (``core_share``). While a stage runs, a terminal
shows its progress bar fed by its metrics log; elsewhere (CI, Prefect worker logs) a line says
where it is at most every ``PROGRESS_EVERY`` seconds. A stopped run (``STOPPING``) stops them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from components.config import Profile, content_hash
from components.stage_io import ERROR_MARK, read_metrics
from flows.forkserver import ForkServer
from flows.keys import COMPONENTS
from flows.machines import accelerated, machines, main_address, on_cpu, processes_per_machine, stage_python

PRELOAD = [f"components.{m}" for m in ("data", "base", "sft", "grpo", "rejection_sampling", "evaluate")]
PROGRESS_EVERY = 30.0  # seconds between progress lines where stderr is no terminal (CI, worker logs)
# Set when the run is stopped (Ctrl-C, SIGTERM): the main thread gets the signal, and every stage
# running in another thread stops its process at its next look.
STOPPING = threading.Event()


class Stopped(RuntimeError):
    """The run was stopped while this stage ran; its process is gone, its checkpoints stay."""


def run_process(name: str, module: str, folder: Path, profile: Profile, total_steps: int | None,
                python: str | None = None) -> int:
    """Start the stage's process in ``python`` (default: the stage environment's) on
    ``folder/spec.json``, logging to ``folder/stage.log``, and follow it to its end; returns its
    exit code. Ctrl-C or a cancelled flow stops it first."""
    cpu = on_cpu(profile)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           **({"DS_ACCELERATOR": "cpu", **core_share(profile)} if cpu else {})}
    spec, log = folder / "spec.json", folder / "stage.log"
    log.touch()
    process = start(module, spec, log, profile, env, python or stage_python(profile), warm=cpu)
    try:
        follow(process, name, folder / "metrics.jsonl", total_steps)
    except BaseException:  # Ctrl-C, SIGTERM, a stopped run
        process.kill()
        process.wait()
        raise
    return process.returncode


def core_share(profile: Profile) -> dict:
    """Stages at once on a CPU split its cores: each gets its share as its thread count. Two stages
    that each use every core oversubscribe them (two pretrainings at once on 2 cores: 8-9x slower
    per step, each thread waiting at every barrier for one that is descheduled). A thread count
    set in the environment stays."""
    slots = profile.runtime.max_parallel or 1
    if slots == 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // slots))}


def launch_command(module: str, spec: Path, profile: Profile, python: str | None = None) -> list[str]:
    python = python or stage_python(profile)
    if not accelerated(module, profile):
        return [python, "-m", f"components.{module}", "--spec", str(spec)]
    group = machines(module, profile)
    # The process count comes from here, not the config file: every machine starts its share of the
    # total. Across machines rank 0's address is the rendezvous: a torchrun-style launch on each, no ssh.
    total = processes_per_machine(profile) * profile.runtime.machines
    across = [] if group is None else [
        "--num_machines", str(group.count), "--machine_rank", str(group.rank), "--main_process_ip",
        main_address(group, profile), "--main_process_port", str(group.main_port),
        "--deepspeed_multinode_launcher", "standard"]
    return [python, "-m", "accelerate.commands.launch", "--config_file", str(profile.runtime.accelerate_config),
            "--num_processes", str(total), *across, "-m", f"components.{module}", "--spec", str(spec)]


def start(module: str, spec: Path, log: Path, profile: Profile, env: dict, python: str, warm: bool):
    """Forked from a warm server for CPU stages in this environment (no stage environment named),
    else a plain process in ``python``."""
    own = profile.runtime.stage_python is None and python == sys.executable
    if warm and own and profile.runtime.launcher == "python":
        server = _FORK_SERVERS.idle(env)
        try:
            return server.launch(f"components.{module}", spec, log, env)
        except BaseException:
            server.busy.release()
            raise
    with log.open("w") as out:
        return subprocess.Popen(launch_command(module, spec, profile, python), stdout=out,
                                stderr=subprocess.STDOUT, env=env)


class ForkServers:
    """The warm servers of this environment and this source of the components: one per stage
    running at once (a server runs one stage at a time), started on first use, all replaced when
    either changed (an edited component is never run from a stale import)."""

    def __init__(self):
        self.servers: dict[tuple, list[ForkServer]] = {}
        self.lock = threading.Lock()

    def idle(self, env: dict) -> ForkServer:
        """A server no stage is running on, its ``busy`` lock taken (released when the stage ends)."""
        source = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(COMPONENTS.glob("*.py")))
        identity = (sys.executable, content_hash(env), source)
        with self.lock:
            if identity not in self.servers:
                for old in chain(*self.servers.values()):
                    old.close()
                self.servers = {identity: []}
            alive = self.servers[identity] = [s for s in self.servers[identity] if s.alive()]
            for server in alive:
                if server.busy.acquire(blocking=False):
                    return server
        server = ForkServer(sys.executable, env, PRELOAD)  # seconds of imports: not under the lock
        server.busy.acquire()
        with self.lock:
            self.servers.setdefault(identity, []).append(server)
        return server


_FORK_SERVERS = ForkServers()


def follow(process, name: str, metrics: Path, total: int | None) -> None:
    """While the stage runs: its bar in a terminal, fed by its metrics log; elsewhere a line at
    most every ``PROGRESS_EVERY`` seconds, so a long stage is never minutes of silence. Raises
    ``Stopped`` once the run is stopping."""
    terminal = sys.stderr.isatty()
    started = said = read = time.time()
    with _BARS.bar(name, total, shown=terminal) as show:
        while process.poll() is None:
            if STOPPING.wait(0.2):  # a small stage takes a few seconds: poll often, read the log once a second
                raise Stopped(f"stage {name!r}: stopped (Ctrl-C or SIGTERM)")
            if time.time() - read < 1:
                continue
            read = time.time()
            rows = read_metrics(metrics)
            show(rows[-1].get("step", 0) if rows else 0)
            if not terminal and read - said >= PROGRESS_EVERY:
                print(progress_line(name, rows, total, read - started), file=sys.stderr, flush=True)
                said = read


class Bars:
    """One progress display for every stage running at once, a bar each: a terminal shows one
    live display at a time."""

    def __init__(self):
        self.progress: Progress | None = None
        self.shown = 0
        self.lock = threading.Lock()

    @contextmanager
    def bar(self, name: str, total: int | None, shown: bool) -> Iterator:
        if not shown:
            yield lambda completed: None
            return
        with self.lock:
            if self.progress is None:
                self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                         TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(),
                                         transient=True)
                self.progress.start()
            self.shown += 1
            task = self.progress.add_task(name, total=total)
        progress = self.progress
        try:
            yield lambda completed: progress.update(task, completed=completed)
        finally:
            with self.lock:
                progress.remove_task(task)
                self.shown -= 1
                if self.shown == 0:
                    progress.stop()
                    self.progress = None


_BARS = Bars()


def progress_line(name: str, rows: list[dict], total: int | None, seconds: float) -> str:
    """``r1_zero: step 15/40, 1m32s, reward 0.548``: where a stage is, and its latest reward or loss;
    ``eval_base: running, 3m05s`` for a stage that counts no steps."""
    minutes, secs = divmod(int(seconds), 60)
    if not rows and total is None:
        return f"{name}: running, {minutes}m{secs:02d}s"
    step = rows[-1].get("step", 0) if rows else 0
    latest = next(((key, row[key]) for row in reversed(rows) for key in ("reward", "loss") if key in row), None)
    return (f"{name}: step {step}/{total or '?'}, {minutes}m{secs:02d}s"
            + (f", {latest[0]} {latest[1]:.4g}" if latest else ""))


def keep_log(log: Path, kept: Path) -> Path | None:
    """A failed stage's log, moved out of its scratch folder (None: not even that fits on the disk)."""
    try:
        kept.parent.mkdir(exist_ok=True)
        return Path(shutil.move(log, kept))
    except OSError:
        return None


def failure(name: str, code: int, log: Path | None, workspace: Path) -> str:
    """Why a stage failed: one line for bad input or a full disk, else the tail of its log."""
    lines = log.read_text(errors="replace").splitlines() if log else []
    marked = [line.removeprefix(ERROR_MARK) for line in lines[-5:] if line.startswith(ERROR_MARK)]
    if shutil.disk_usage(workspace).free < 1 << 20 or (marked and marked[-1].startswith("no space left")):
        return f"stage {name!r}: no space left on the device holding {workspace}; free some and run again"
    if marked:
        return f"stage {name!r}: {marked[-1]} (log: {log})"
    tail = "\n".join(lines[-15:])
    return f"stage {name!r} failed (exit {code}); full log: {log}\n{tail}"
