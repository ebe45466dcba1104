"""What a launched stage reads and writes: its spec file, metrics log, and result file.

A stage runs as ``python -m components.<stage> --spec SPEC.json`` (or under ``accelerate launch``).
The spec names the stage config, input paths and the output folder; the stage writes
``metrics.jsonl`` (one JSON object per logged step) and ``result.json`` into that folder. Files are
the whole interface, so a stage can run in another environment or on another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback


@dataclass
class StageSpec:
    stage: str
    config: dict
    output: Path
    inputs: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    prompt_template: str = "{question}"
    generation_backend: str = "transformers"

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps({**self.__dict__, "output": str(self.output)}, indent=2, default=str))
        return path

    @classmethod
    def read(cls, path: Path) -> StageSpec:
        raw = json.loads(Path(path).read_text())
        return cls(**{**raw, "output": Path(raw["output"])})


def parse_spec() -> StageSpec:
    parser = argparse.ArgumentParser(description="Run one r1flow stage from its spec file.")
    parser.add_argument("--spec", required=True, type=Path, help="stage spec JSON written by the flow")
    return StageSpec.read(parser.parse_args().spec)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class MetricsLog(TrainerCallback):
    """Appends every logged step to ``metrics.jsonl``; used directly and as a Trainer callback."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, step: int, **metrics: float) -> None:
        if is_main_process():
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.write(state.global_step, **numbers)


def write_result(output: Path, result: dict) -> None:
    """``result.json``; paths inside the output folder are written relative to it, because the
    runner renames the folder once the stage completes."""
    prefix = f"{output}/"
    result = {k: str(v).removeprefix(prefix) if isinstance(v, (str, Path)) else v for k, v in result.items()}
    if is_main_process():
        (output / "result.json").write_text(json.dumps(result, indent=2, default=str))
