"""Running one stage: reuse its keyed output, or launch its process and install what it wrote.

    run_stage("r1_zero", "grpo", profile.grpo, inputs, profile, workspace)  # -> StageOutput

The key (``flows.keys``) names the output folder (``flows.cache``); a folder that exists is whole
and reused, in this workspace or the profile's stage store. Two runs that need the same key at
once take a lock on it (``flows.locks``): one trains, the other reuses. A stage killed part-way
(crash, SIGKILL, Ctrl-C) leaves only its checkpoints; the next attempt with the same key
continues from the last one, on this worker or another that shares the store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.config import Profile, plain_template
from components.sections import Section
from components.stage_io import StageSpec, fetch_checkpoint
from components.store import Store
from flows import cache
from flows.keys import Artifact, StageOutput, inputs_of, stage_key
from flows.launch import failure, keep_log, run_process
from flows.locks import exclusive
from flows.machines import Machines, machines
from flows.recipe import RECIPE, Step, recipe_step, section, upstream
from flows.vllm_stages import interpreter


class StageFailed(RuntimeError):
    """A stage process exited with an error; the message carries the tail of its log."""


class MissingInput(FileNotFoundError):
    """``--only``: a stage's input has no cached output for this profile."""


def run_stage(name: str, module: str, config: Section, inputs: dict[str, Artifact], profile: Profile,
              workspace: Path, total_steps: int | None = None, force: bool = False) -> StageOutput:
    """The stage's keyed output: reused unless ``force``, else made now."""
    key = stage_key(module, config, inputs, profile)
    store = cache.store_of(profile)
    if not force and reuse(store, workspace, name, key):
        return _output(name, cache.stage_folder(workspace, name, key), key, cached=True)
    group = machines(module, profile)
    if group is not None:  # every machine of a multi-machine launch trains its share
        return _output(name, _train(name, module, config, inputs, profile, workspace, total_steps, key, group), key)
    # Another run may be making this very output: the first trains it, the others wait and reuse it.
    with exclusive(f"stage-{name}-{key}", workspace / "locks", waiting=f"{name}: another run is making {key}; waiting"):
        if not force and reuse(store, workspace, name, key):
            return _output(name, cache.stage_folder(workspace, name, key), key, cached=True)
        return _output(name, _train(name, module, config, inputs, profile, workspace, total_steps, key, group), key)


def cached_output(step: Step, inputs: dict[str, Artifact], profile: Profile, workspace: Path) -> StageOutput:
    """A stage's keyed output, without running anything (``--only``'s inputs, a remote stage's output)."""
    key = stage_key(step.module, section(profile, step), inputs, profile)
    if not reuse(cache.store_of(profile), workspace, step.name, key):
        raise MissingInput(f"input stage {step.name!r} has no cached output for this profile "
                           f"({cache.stage_folder(workspace, step.name, key)}); "
                           f"run `r1flow run` (or `--only {step.name}`) first")
    return _output(step.name, cache.stage_folder(workspace, step.name, key), key, cached=True)


def cached_inputs(name: str, profile: Profile, workspace: Path) -> dict[str, Artifact]:
    """A stage's inputs from the cached outputs of everything it needs (fetched from the store
    where this workspace lacks them); ``MissingInput`` names one that nobody has."""
    outputs = {}
    for s in RECIPE:
        if s.name in upstream(name):
            outputs[s.name] = cached_output(s, inputs_of(s, outputs, profile), profile, workspace)
    return inputs_of(recipe_step(name), outputs, profile)


def _output(name: str, folder: Path, key: str, cached: bool = False) -> StageOutput:
    """The record of a keyed folder (a follower machine keeps none: its result is empty)."""
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").exists() else {}
    return StageOutput(name, folder, key, cached, None, result)


def reuse(store: Store | None, workspace: Path, name: str, key: str) -> bool:
    """The complete folder is here or in the store; one that only this disk holds is shared now."""
    if not cache.fetch(store, workspace, name, key):
        return False
    cache.publish(store, cache.stage_folder(workspace, name, key), name, key, missing_only=True)
    return True


def _train(name: str, module: str, config: Section, inputs: dict[str, Artifact], profile: Profile, workspace: Path,
           total_steps: int | None, key: str, group: Machines | None) -> Path:
    """Run the stage's process into a scratch folder and install it as the keyed folder."""
    final, store = cache.stage_folder(workspace, name, key), cache.store_of(profile)
    tmp = cache.scratch_folder(final)
    tmp.mkdir(parents=True)
    # Across machines each keeps its own ZeRO shards: a checkpoint lives in the store, a part per machine.
    checkpoints = cache.checkpoint_folder(workspace, name, key) if group is None or store else None
    remote = cache.checkpoint_url(store, name, key) if checkpoints is not None else None
    if remote is not None:  # another worker may have got further: go on from there
        fetch_checkpoint(checkpoints, remote, f"machine-{group.rank}" if group else "")
    StageSpec(stage=name, config=config.model_dump(mode="json"), output=tmp,
              inputs={k: v.path for k, v in inputs.items()}, input_keys={k: v.key for k, v in inputs.items()},
              seed=profile.seed, device=profile.runtime.device, precision=profile.runtime.precision,
              prompt_template=plain_template(profile),
              generation_backend=profile.runtime.generation_backend, checkpoints=checkpoints,
              checkpoint_store=remote, vllm=profile.runtime.vllm.model_dump(mode="json")).write(tmp / "spec.json")
    try:
        code = run_process(name, module, tmp, profile, total_steps, interpreter(module, config, profile))
    except BaseException:  # Ctrl-C or a cancelled flow: the process is stopped; leave no half-written folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if group is not None and group.follower and code == 0:  # rank 0's machine keeps the output
        shutil.rmtree(tmp, ignore_errors=True)
        if checkpoints is not None:
            shutil.rmtree(checkpoints, ignore_errors=True)
        return final
    if code != 0 or not (tmp / "result.json").exists():
        kept = keep_log(tmp / "stage.log", workspace / "logs" / f"{name}-{key}.log")
        shutil.rmtree(tmp, ignore_errors=True)
        raise StageFailed(failure(name, code, kept, workspace))
    shutil.rmtree(tmp / "trainer", ignore_errors=True)  # the Trainer's scratch: checkpoints already moved out
    cache.install(tmp, final)
    cache.publish(store, final, name, key)
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return final
