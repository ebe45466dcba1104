"""Content keys: what names a stage's output, as pure functions of the profile and the inputs.

A key hashes what changes the output and nothing else: the stage's config values (defaults
included), the keys of its inputs, the code that runs (the component's module and every
``components`` module it imports, the config schema aside), the seed, the prompt template and the
runtime settings that change results. The same key means the same result: that is what makes
caching, ``--from``, ``--only``, resume and rerun safe, on any worker.
"""

from __future__ import annotations

import ast
import hashlib
import threading
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from components.config import Profile, content_hash, plain_template
from components.digest import content_sha256
from components.sections import REGISTERED_REF, ModelConfig, Section
from components.stage_io import split_ref
from components.store import data_objects, objects_key, stored_folder_key
from flows.machines import accelerated
from flows.recipe import RECIPE, Step, section
from flows.vllm_stages import environment_identity, uses_vllm
from flows.workspace import locate

if TYPE_CHECKING:
    from components.tracking import VersionRecord

COMPONENTS = Path(__file__).resolve().parents[1] / "components"
# The config schema is not code that runs: a stage's config *values* (defaults included) are in
# its key already, so an edit to a help string or another section's fields must change no key.
SCHEMA = {"config", "sections"}


@dataclass(frozen=True)
class Artifact:
    """A file or folder produced by a stage, with the key that identifies its content."""

    path: str
    key: str


@dataclass(frozen=True)
class StageOutput:
    """What a stage left, however it ran: its keyed folder, whether it was reused, its MLflow
    run and its ``result.json``."""

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


def inputs_of(step: Step, outputs: dict[str, StageOutput], profile: Profile) -> dict[str, Artifact]:
    """A recipe step's inputs from its upstream outputs; the data stage's are the files a profile
    imports, keyed by content, and a base stage's a model folder in the store, keyed by its manifest."""
    if step.module == "data":
        files = {"train": profile.data.train_path, "test": profile.data.test_path}
        return {name: data_file(path, f"data.{name}_path") for name, path in files.items() if path is not None}
    if step.module == "base":
        return base_input(section(profile, step), f"{step.section}.path", profile)
    refs = {name: split_ref(ref) for name, ref in step.inputs.items()}
    return {name: outputs[stage].artifact(file) for name, (stage, file) in refs.items()}


def base_input(config: ModelConfig, what: str, profile: Profile) -> dict[str, Artifact]:
    """A base stage's input: a registered version, keyed by what was registered (the key of the
    stage output it came from), or a folder in the store, keyed by its manifest; none where the
    stage makes the base or loads it by its config alone."""
    if config.source == "registry":
        version = registered_base(config.path, what, profile)
        key = version.tags.get("stage_key") or content_hash(version.run_id, version.source)[:16]
        return {"registered": Artifact(f"models:/{version.ref}", key)}
    if (config.path or "").startswith("s3://"):
        return {"source": Artifact(config.path, stored_folder_key(config.path, what))}
    return {}


def registered_base(ref: str, what: str, profile: Profile) -> VersionRecord:
    """The version ``NAME@ALIAS`` or ``NAME/VERSION`` names in the profile's registry; an error
    naming it and what to do when there is none."""
    from components.tracking import NotFound, Tracker  # MLflow: only for a base from the registry

    place, found = locate(profile), REGISTERED_REF.fullmatch(ref)
    try:
        return Tracker(place.tracking_uri, place.experiment).version(found["name"], found["alias"] or found["version"])
    except NotFound:
        if found["version"]:
            raise LookupError(f"{what} {ref}: no such registered version in {place.tracking_uri}; name one the "
                              "registry holds") from None
        raise LookupError(f"{what} {ref}: no version holds that alias in {place.tracking_uri}; register one, or give "
                          f"{what.removesuffix('.path')}.fallback, the base while none does") from None


def data_file(path: str, what: str) -> Artifact:
    """A file the data stage imports, keyed by its content: a local file's sha256, or the listing
    (names, sizes, checksums) of what an ``s3://`` URL names, so one new object changes the key."""
    if path.startswith("s3://"):
        return Artifact(path, objects_key(data_objects(path, what)))
    return Artifact(path, content_sha256(Path(path)))


# CPython 3.11's ast.parse is not thread-safe (python/cpython#106905: "AST constructor recursion
# depth mismatch" when two threads parse at once, as two stages at once computing their keys did).
PARSING = threading.Lock()


@cache
def code_version(module: str) -> str:
    """Hash of a component module and the ``components`` modules it imports, transitively
    (the config schema aside)."""
    seen: set[str] = set(SCHEMA)
    pending = [module]
    digest = hashlib.sha256()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        source = (COMPONENTS / f"{name}.py").read_text()
        digest.update(name.encode() + source.encode())
        with PARSING:
            tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components."):
                pending.append(node.module.split(".", 1)[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "components":  # from components import gym
                pending += [alias.name for alias in node.names]
    return digest.hexdigest()[:16]


def runtime_identity(module: str, profile: Profile) -> dict:
    """The runtime settings that change a stage's output: device, generation backend and, for a
    training stage under accelerate, the content of its config (ZeRO stage, precision)
    and the machines and processes it spans, as the profile gives them."""
    runtime = profile.runtime
    identity = {"device": runtime.device, "generation_backend": runtime.generation_backend}
    if runtime.precision != "auto":  # left out at its default: keys made before the setting stay valid
        identity["precision"] = runtime.precision
    if accelerated(module, profile):
        identity["accelerate_config"] = content_sha256(runtime.accelerate_config)
        if runtime.machines > 1:  # from the profile: the sender and every machine compute the same key
            identity["machines"] = runtime.machines
        if runtime.processes_per_machine is not None:
            identity["processes_per_machine"] = runtime.processes_per_machine
    return identity


def stage_key(module: str, config: Section, inputs: dict[str, Artifact], profile: Profile) -> str:
    shared = {"seed": profile.seed, "template": plain_template(profile),
              "runtime": runtime_identity(module, profile)}
    if uses_vllm(module, config, profile):  # another environment, and an engine of its own
        shared["runtime"]["vllm"] = environment_identity(profile)
    if isinstance(config, ModelConfig) and config.source == "registry":  # the version is the input, however named
        config = config.model_copy(update={"path": None})
    return content_hash(module, code_version(module), config, {k: v.key for k, v in sorted(inputs.items())},
                        shared)[:16]


def planned_keys(profile: Profile) -> dict[str, str]:
    """Every stage's key for a profile, computed without running anything."""
    outputs: dict[str, StageOutput] = {}
    for step in RECIPE:
        key = stage_key(step.module, section(profile, step), inputs_of(step, outputs, profile), profile)
        outputs[step.name] = StageOutput(step.name, Path(), key, cached=False)
    return {name: out.key for name, out in outputs.items()}
