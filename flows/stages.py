"""Stage folders keyed by content, and launching a stage as its own process.

A stage's output lives in ``<workspace>/stages/<name>/<key>``, where the key hashes what changes
the output and nothing else: the stage's config values (defaults included), the keys of its
inputs, the code that runs (the component's module and every ``components`` module it imports,
the config schema aside) and the runtime settings that change results. It is written in a
temporary folder and renamed into place when complete, so a folder that exists is whole, and the
same key means the same result. Its ``manifest.json`` (each file's size and sha256) is checked
whenever it is reused: a damaged folder is discarded and made again, never used. Two runs that
need the same key at once take a lock on it (``flows.locks``): one trains, the other reuses. ``StageOutput`` is what every stage leaves, however it ran.

With a stage store (``profile.store``: an S3 bucket shared by workers on other machines), every
completed folder is uploaded to ``stages/<name>/<key>/`` with its manifest written last, and the
local workspace is this worker's cache of it: a stage or input found in the store is downloaded
once, checked against its manifest, and reused. Checkpoints go to the store as they are saved,
so a stage killed on one worker resumes on another.
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
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from components.config import Profile, Section, content_hash, plain_template
from components.stage_io import ERROR_MARK, StageSpec, fetch_checkpoint
from components.store import MANIFEST, Store, damage, write_manifest
from flows.forkserver import ForkServer
from flows.locks import exclusive
from flows.recipe import RECIPE, Step

COMPONENTS = Path(__file__).resolve().parents[1] / "components"
DISTRIBUTED = ("sft", "grpo")  # the components `accelerate launch` starts; the rest run as one process


class StageFailed(RuntimeError):
    """A stage process exited with an error; the message carries the tail of its log."""


class MissingInput(FileNotFoundError):
    """``--only``: a stage's input has no cached output for this profile."""


@dataclass(frozen=True)
class Artifact:
    """A file or folder produced by a stage, with the key that identifies its content."""

    path: str
    key: str


@dataclass(frozen=True)
class StageOutput:
    """What a stage left: its keyed folder, whether it was reused, its MLflow run, its result."""

    name: str
    folder: Path
    key: str
    cached: bool
    run_id: str | None = None
    result: dict = field(default_factory=dict)

    def artifact(self, file: str | None = None) -> Artifact:
        """Its model folder, or one of the JSONL files it wrote, as another stage's input."""
        if file is None:
            return Artifact(str(self.folder / "model"), self.key)
        return Artifact(str(self.folder / f"{file}.jsonl"), f"{self.key}/{file}")


def read_result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def section(profile: Profile, step: Step) -> Section:
    return getattr(profile, step.section)


def inputs_of(step: Step, outputs: dict[str, StageOutput], profile: Profile) -> dict[str, Artifact]:
    """A recipe step's inputs: ``"stage"`` is that stage's model folder, ``"stage/file"`` its
    ``file.jsonl``; the data stage's are the benchmark files a profile imports, keyed by content."""
    if step.module == "data":
        files = {"train": profile.data.train_path, "test": profile.data.test_path}
        return {name: Artifact(str(path), file_digest(path)) for name, path in files.items() if path is not None}
    refs = {name: ref.partition("/") for name, ref in step.inputs.items()}
    return {name: outputs[stage].artifact(file or None) for name, (stage, _, file) in refs.items()}


def cached_output(step: Step, inputs: dict[str, Artifact], profile: Profile, workspace: Path) -> StageOutput:
    """A stage's keyed output, without running anything (``--only``'s inputs, a remote stage's output)."""
    key = stage_key(step.module, section(profile, step), inputs, profile)
    folder = stage_folder(workspace, step.name, key)
    if not fetch(store_of(profile), workspace, step.name, key):
        raise MissingInput(f"input stage {step.name!r} has no cached output for this profile ({folder}); "
                           f"run `r1flow run` (or `--only {step.name}`) first")
    return StageOutput(step.name, folder, key, True, None, read_result(folder))


def planned_keys(profile: Profile) -> dict[str, str]:
    """Every stage's key for a profile, computed without running anything."""
    outputs: dict[str, StageOutput] = {}
    for step in RECIPE:
        key = stage_key(step.module, section(profile, step), inputs_of(step, outputs, profile), profile)
        outputs[step.name] = StageOutput(step.name, Path(), key, cached=False)
    return {name: out.key for name, out in outputs.items()}


# The config schema is not code that runs: a stage's config *values* (defaults included) are in
# its key already, so an edit to a help string or another section's fields must change no key.
SCHEMA = "config"


@cache
def code_version(module: str) -> str:
    """Hash of a component module and the ``components`` modules it imports, transitively
    (the config schema aside)."""
    seen: set[str] = {SCHEMA}
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
            elif isinstance(node, ast.ImportFrom) and node.module == "components":  # from components import gym
                pending += [alias.name for alias in node.names]
    return digest.hexdigest()[:16]


def file_digest(path: Path | None) -> str | None:
    """sha256 of a file's content, or of a folder's (a ``save_to_disk`` dataset): each file's
    relative name and content, in sorted order."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\0".encode())
        return digest.hexdigest()
    with path.open("rb") as f:  # streamed: an input file may be large
        return hashlib.file_digest(f, "sha256").hexdigest()


def runtime_identity(module: str, profile: Profile) -> dict:
    """The runtime settings that change a stage's output: device, generation backend and, for a
    training stage under accelerate, the content of its config (world size, ZeRO stage, precision)
    and the number of machines it spans."""
    runtime = profile.runtime
    identity = {"device": runtime.device, "generation_backend": runtime.generation_backend}
    if runtime.precision != "auto":  # left out at its default: keys made before the setting stay valid
        identity["precision"] = runtime.precision
    if runtime.launcher == "accelerate" and module in DISTRIBUTED:
        identity["accelerate_config"] = file_digest(runtime.accelerate_config)
        if (group := machines()) is not None:
            identity["machines"] = group.count
    return identity


@dataclass(frozen=True)
class Machines:
    """This machine's place in a multi-machine training launch, from its environment (or the
    Prefect job variables' ``env``): every machine runs the same stage with the same spec."""

    count: int
    rank: int
    main_ip: str
    main_port: int

    @property
    def follower(self) -> bool:
        """Not rank 0: it trains, but writes no stage output and no MLflow record."""
        return self.rank > 0


def machines() -> Machines | None:
    count = int(os.environ.get("R1FLOW_NUM_MACHINES", "1"))
    if count < 2:
        return None
    try:
        return Machines(count, int(os.environ["R1FLOW_MACHINE_RANK"]), os.environ["R1FLOW_MAIN_PROCESS_IP"],
                        int(os.environ.get("R1FLOW_MAIN_PROCESS_PORT", "29500")))
    except KeyError as missing:
        raise ValueError(f"R1FLOW_NUM_MACHINES={count} needs {missing.args[0]} in the environment") from None


def stage_key(module: str, config: Section, inputs: dict[str, Artifact], profile: Profile) -> str:
    shared = {"seed": profile.seed, "template": plain_template(profile), "runtime": runtime_identity(module, profile)}
    return content_hash(module, code_version(module), config, {k: v.key for k, v in sorted(inputs.items())},
                        shared)[:16]


def launch_command(module: str, spec_path: Path, profile: Profile) -> list[str]:
    python = profile.runtime.stage_python or sys.executable
    if profile.runtime.launcher == "accelerate" and module in DISTRIBUTED:
        group = machines()
        # Several machines: each starts its share of the processes (the config's num_processes is the
        # total), rank 0's address is the rendezvous; torchrun-style launch on each, no ssh between them.
        across = [] if group is None else [
            "--num_machines", str(group.count), "--machine_rank", str(group.rank), "--main_process_ip",
            group.main_ip, "--main_process_port", str(group.main_port), "--deepspeed_multinode_launcher", "standard"]
        return [python, "-m", "accelerate.commands.launch", "--config_file", str(profile.runtime.accelerate_config),
                *across, "-m", f"components.{module}", "--spec", str(spec_path)]
    return [python, "-m", f"components.{module}", "--spec", str(spec_path)]


def stage_folder(workspace: Path, name: str, key: str) -> Path:
    return workspace / "stages" / name / key


def store_of(profile: Profile) -> Store | None:
    """The profile's shared stage store; None when the workspace alone holds the stages."""
    return Store.at(profile.store) if profile.store else None


def fetch(store: Store | None, workspace: Path, name: str, key: str) -> bool:
    """Make a stage's complete keyed folder present in the workspace: already here, or downloaded
    from the store and checked against its manifest. A folder only this disk holds (a worker
    killed between finishing and uploading) is uploaded now. False: neither has it."""
    final, relative = stage_folder(workspace, name, key), f"stages/{name}/{key}"
    if (final / "result.json").exists():
        if (problem := damage(final)) is not None:  # never used silently: fetched again, or rerun
            print(f"{name}: {problem}; the cached folder is discarded", flush=True)
            discard(final)
        else:
            if store is not None and store.manifest(relative) is None:
                store.put(final, relative)
            return True
    if store is None:
        return False
    tmp = scratch_folder(final)
    if not store.get(relative, tmp):
        return False
    install(tmp, final)
    print(f"{name}: fetched from {store.path(relative)}", flush=True)
    return True


def publish(store: Store | None, folder: Path, name: str, key: str) -> None:
    """Upload a completed stage folder and drop its checkpoints from the store."""
    if store is not None:
        store.put(folder, f"stages/{name}/{key}")
        for checkpoint in store.folders(f"checkpoints/{name}/{key}"):
            store.remove(f"checkpoints/{name}/{key}/{checkpoint}")


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
    """Rename a completed folder into place (atomic: the keyed folder appears only when whole),
    with the manifest of its files' sha256 that every later use checks; a forced rerun's old
    folder steps aside first."""
    if not (tmp / MANIFEST).exists():
        write_manifest(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def discard(final: Path) -> None:
    """Remove a keyed folder: renamed aside first, so no reader ever sees it half-deleted."""
    aside = final.parent / f".old-{final.name}-{os.getpid()}"
    os.replace(final, aside)
    shutil.rmtree(aside, ignore_errors=True)


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
    final, store = stage_folder(workspace, name, key), store_of(profile)
    group = machines() if profile.runtime.launcher == "accelerate" and module in DISTRIBUTED else None
    if group is not None:  # every machine of a multi-machine launch trains its share
        return _train(name, module, config, inputs, profile, workspace, total_steps, key, group), key, False
    if not force and fetch(store, workspace, name, key):
        return final, key, True
    # Another run may be making this very output: the first trains it, the others wait and reuse it.
    with exclusive(f"stage-{name}-{key}", workspace / "locks", waiting=f"{name}: another run is making {key}; waiting"):
        if not force and fetch(store, workspace, name, key):
            return final, key, True
        return _train(name, module, config, inputs, profile, workspace, total_steps, key, group), key, False


def _train(name: str, module: str, config: Section, inputs: dict[str, Artifact], profile: Profile, workspace: Path,
           total_steps: int | None, key: str, group: Machines | None) -> Path:
    """Run the stage's process into a scratch folder and install it as the keyed folder."""
    final, store = stage_folder(workspace, name, key), store_of(profile)
    tmp = scratch_folder(final)
    tmp.mkdir(parents=True)
    # Across machines, each keeps its own ZeRO shards of a checkpoint: no resume yet, so none saved.
    checkpoints = checkpoint_folder(workspace, name, key) if group is None else None
    if store is not None and checkpoints is not None:  # another worker may have got further: go on from there
        fetch_checkpoint(checkpoints, store.path(f"checkpoints/{name}/{key}"))
    spec = StageSpec(stage=name, config=config.model_dump(mode="json"), output=tmp,
                     inputs={k: v.path for k, v in inputs.items()}, seed=profile.seed,
                     device=profile.runtime.device, precision=profile.runtime.precision,
                     prompt_template=plain_template(profile),
                     generation_backend=profile.runtime.generation_backend, checkpoints=checkpoints,
                     checkpoint_store=store.path(f"checkpoints/{name}/{key}") if store and checkpoints else None)
    spec_path = spec.write(tmp / "spec.json")
    on_cpu = profile.runtime.device == "cpu" or (profile.runtime.device == "auto" and not _has_cuda())
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           **({"DS_ACCELERATOR": "cpu"} if on_cpu else {})}
    log_path = tmp / "stage.log"
    log_path.touch()
    process = _start(module, spec_path, log_path, profile, env, warm=on_cpu)
    try:
        _follow(process, name, tmp / "metrics.jsonl", total_steps)
    except BaseException:  # Ctrl-C or a cancelled flow: stop the stage, leave no half-written folder
        process.kill()
        process.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if group is not None and group.follower and process.returncode == 0:  # rank 0's machine keeps the output
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    if process.returncode != 0 or not (tmp / "result.json").exists():
        kept = keep_log(log_path, workspace / "logs" / f"{name}-{key}.log")
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageFailed(failure(name, process.returncode, kept, workspace))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)  # the Trainer's scratch: checkpoints already moved out
    install(tmp, final)
    publish(store, final, name, key)
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return final


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


_FORK_SERVERS: dict[tuple, ForkServer] = {}
PRELOAD = [f"components.{m}" for m in ("data", "base", "sft", "grpo", "rejection_sampling", "evaluate")]


def _start(module: str, spec: Path, log: Path, profile: Profile, env: dict, warm: bool):
    """The stage's process: forked from a warm server for CPU stages in this environment (the
    imports paid once per run, not per stage), else a plain ``python -m`` or ``accelerate launch``."""
    if warm and profile.runtime.launcher == "python" and profile.runtime.stage_python is None:
        server = _fork_server(env)
        if server.busy.acquire(blocking=False):  # another stage is running on it: start a plain one
            try:
                return server.launch(f"components.{module}", spec, log, env)
            except BaseException:
                server.busy.release()
                raise
    with log.open("w") as out:
        return subprocess.Popen(launch_command(module, spec, profile), stdout=out, stderr=subprocess.STDOUT, env=env)


def _fork_server(env: dict) -> ForkServer:
    """The fork server for this environment and this source of the components, started on first
    use and replaced when either changed (an edited component is never run from a stale import)."""
    source = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(COMPONENTS.glob("*.py")))
    identity = (sys.executable, content_hash(env), source)
    server = _FORK_SERVERS.get(identity)
    if server is None or not server.alive():
        for old in _FORK_SERVERS.values():
            old.close()
        _FORK_SERVERS.clear()
        server = _FORK_SERVERS[identity] = ForkServer(sys.executable, env, PRELOAD)
    return server


@cache
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


PROGRESS_EVERY = 30.0  # seconds between progress lines where stderr is no terminal (CI, worker logs)


def _follow(process, name: str, metrics: Path, total: int | None) -> None:
    """While the stage runs: a progress bar in a terminal, fed by its metrics log; elsewhere (CI,
    Prefect worker logs) a line at most every ``PROGRESS_EVERY`` seconds, so a long stage is
    never minutes of silence."""
    terminal = sys.stderr.isatty()
    columns = [TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TimeElapsedColumn()]
    started = said = read = time.time()
    with Progress(*columns, transient=True, disable=not terminal) as progress:
        bar = progress.add_task(name, total=total)
        while process.poll() is None:
            time.sleep(0.2)  # a small stage takes a few seconds: poll often, read the log once a second
            if time.time() - read < 1:
                continue
            read = time.time()
            rows = read_metrics(metrics)
            progress.update(bar, completed=rows[-1].get("step", 0) if rows else 0)
            if not terminal and read - said >= PROGRESS_EVERY:
                print(progress_line(name, rows, total, read - started), file=sys.stderr, flush=True)
                said = read


def read_metrics(path: Path) -> list[dict]:
    """A stage's ``metrics.jsonl``, one row per logged step (up to a line still being written)."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return rows


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
