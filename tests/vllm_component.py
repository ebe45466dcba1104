"""A component run on a stage's spec file in the vLLM stage environment, for tests/test_vllm.py:

    .venv-vllm/bin/python tests/vllm_component.py MODULE SPEC OUTPUT [--set JSON] [--checkpoints DIR] [--stale]

``--set``: config values over the spec's; ``--stale``: GRPO's control, in which vLLM never
receives the trained weights (TRL's weight sync does nothing) and samples from the starting model.
"""

import argparse
import importlib
import json
from pathlib import Path

from components.stage_io import StageSpec


def never_pushed(grpo) -> None:
    configured = grpo.colocate_settings

    def settings(*args):
        configured(*args)
        from trl.generation.vllm_generation import VLLMGeneration

        VLLMGeneration.sync_weights = lambda generation: None

    grpo.colocate_settings = settings


if __name__ == "__main__":  # vLLM's engine may start processes of its own: guarded, as it asks
    parser = argparse.ArgumentParser()
    parser.add_argument("module", choices=["grpo", "evaluate", "rejection_sampling"])
    parser.add_argument("spec", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--set", type=json.loads, default={})
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--stale", action="store_true")
    args = parser.parse_args()
    spec = StageSpec.read(args.spec)
    spec.output, spec.checkpoints, spec.checkpoint_store = args.output, args.checkpoints, None
    spec.config.update(args.set)
    spec.output.mkdir(parents=True, exist_ok=True)
    component = importlib.import_module(f"components.{args.module}")
    if args.stale:
        never_pushed(component)
    print(json.dumps(component.run(spec)))
