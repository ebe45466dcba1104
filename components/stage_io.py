"""What a launched stage reads and writes: its spec file, metrics log, and result file.

A stage runs as ``python -m components.<stage> --spec SPEC.json`` (or under ``accelerate launch``).
The spec names the stage config, input paths and the output folder; the stage writes
``metrics.jsonl`` (one JSON object per logged step) and ``result.json`` into that folder. Files are
the whole interface, so a stage can run in another environment or on another machine.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from components.store import Store


@dataclass
class StageSpec:
    stage: str
    config: dict
    output: Path
    inputs: dict[str, str] = field(default_factory=dict)
    input_keys: dict[str, str] = field(default_factory=dict)  # each input's content key, as the run planned it
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # runtime.precision: bf16, fp32, or auto (GPU, or a CPU with native bf16)
    prompt_template: str | list[dict] = "{question}"  # or chat turns ending in the question's
    generation_backend: str = "transformers"
    vllm: dict = field(default_factory=dict)  # runtime.vllm: the engine settings of a stage that uses vLLM
    checkpoints: Path | None = None  # where complete checkpoints live across attempts (crash resume)
    checkpoint_store: str | None = None  # and their copy in the stage store, for a resume on another worker

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.__dict__, indent=2, default=str))
        return path

    @classmethod
    def read(cls, path: Path) -> StageSpec:
        raw = json.loads(Path(path).read_text())
        checkpoints = raw.get("checkpoints")
        return cls(**{**raw, "output": Path(raw["output"]), "checkpoints": Path(checkpoints) if checkpoints else None})


ERROR_MARK = "r1flow-stage-error: "  # the last line of a stage log that failed on its input


def main(run: Callable[[StageSpec], object]) -> None:
    """A stage's entry point: run it on its spec. Bad input (a ValueError or missing file, whose
    message names the file, row or key) and a full disk end the process with one marked line
    that the runner shows instead of a traceback; the traceback stays in the stage log."""
    spec = parse_spec()
    try:
        run(spec)
    except (ValueError, FileNotFoundError, PermissionError) as error:
        fail(spec, str(error))
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        fail(spec, f"no space left on the device writing {error.filename or spec.output}")


def fail(spec: StageSpec, message: str) -> None:
    traceback.print_exc()
    print(ERROR_MARK + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(3)


def parse_spec() -> StageSpec:
    die_with_parent()
    parser = argparse.ArgumentParser(description="Run one r1flow stage from its spec file.")
    parser.add_argument("--spec", required=True, type=Path, help="stage spec JSON written by the flow")
    return StageSpec.read(parser.parse_args().spec)


def die_with_parent() -> None:
    """Linux: end this stage process when the process that launched it dies, SIGKILL included, so
    a killed pipeline never leaves a stage running on, writing into a folder nobody will rename."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent was already gone before the line above took effect
            sys.exit("stage: the process that launched it has exited")


def seed_everything(seed: int) -> None:
    import numpy as np  # here, not at the top: the flow imports this module and needs neither
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class MetricsLog:
    """Appends every logged step to ``metrics.jsonl`` (``components.trainer.TrainerLog`` feeds it from a Trainer)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, step: int, **metrics: float) -> None:
        if is_main_process():
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(path: Path, finished: bool = False) -> list[dict]:
    """A stage's ``metrics.jsonl``, one row per logged step, up to a line still being written
    (the stage may be running). ``finished``: the stage has ended, so a line that is not JSON is
    damage, and an error."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if finished:
                raise ValueError(f"{path}: line {number} is not JSON; delete the stage's folder to rerun it") from None
            break
    return rows


def split_ref(ref: str) -> tuple[str, str | None]:
    """A recipe input: ``"stage"`` is that stage's model folder, ``"stage/file"`` its ``file.jsonl``."""
    stage, _, file = ref.partition("/")
    return stage, file or None


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest checkpoint in ``folder``. Checkpoints are renamed in only when complete
    (``keep_checkpoint``), so whatever is there is whole: a crash mid-save leaves nothing to load."""
    if folder is None or not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    return max(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


def keep_checkpoint(written: Path, folder: Path, metrics: Path, store: str | None = None) -> Path:
    """Move a fully written checkpoint into ``folder`` atomically (with the metrics log so far)
    and drop the older ones: one interval of work is the most a crash can lose. With a stage
    store, upload it there too (complete once its manifest is written), then drop older copies."""
    if metrics.exists():
        shutil.copyfile(metrics, written / "metrics.jsonl")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / written.name
    shutil.rmtree(target, ignore_errors=True)
    os.replace(written, target)
    for older in folder.glob("checkpoint-*"):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    if store is not None:
        remote = Store.at(store)
        remote.put(target, target.name)
        for older in remote.folders(""):
            if older != target.name:
                remote.remove(older)
    return target


def fetch_checkpoint(folder: Path, store: str, part: str = "") -> None:
    """Download the store's newest complete checkpoint into ``folder`` when it is newer than any
    here: a stage started on an empty worker continues where a killed one left off. The runner
    calls it before starting the stage, so a stage process touches the store only to upload.
    ``part``: a checkpoint across machines, this machine's share of it (``machine-<rank>``)."""
    remote = Store.at(store)
    steps = [int(name.removeprefix("checkpoint-")) for name in remote.folders("")
             if name.removeprefix("checkpoint-").isdigit()]
    newest = next((s for s in sorted(steps, reverse=True) if remote.manifest(f"checkpoint-{s}")), None)
    if newest is None or newest <= checkpoint_step(latest_checkpoint(folder)):
        return
    name = f"checkpoint-{newest}"
    scratch = folder / f".download-{name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    if remote.get(name, scratch, part):
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(scratch, folder / name)
        print(f"fetched {name} from {remote.url}", flush=True)


def resume_from(folder: Path | None, metrics: Path) -> Path | None:
    """The checkpoint a restarted stage continues from, with its metrics log restored."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None and (checkpoint / "metrics.jsonl").exists() and is_main_process():
        shutil.copyfile(checkpoint / "metrics.jsonl", metrics)
    return checkpoint


def checkpoint_step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-")) if checkpoint else 0


def write_result(output: Path, result: dict) -> None:
    """``result.json``; paths inside the output folder are written relative to it, because the
    runner renames the folder once the stage completes."""
    prefix = f"{output}/"
    result = {k: str(v).removeprefix(prefix) if isinstance(v, (str, Path)) else v for k, v in result.items()}
    if is_main_process():
        (output / "result.json").write_text(json.dumps(result, indent=2, default=str))
