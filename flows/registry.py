"""A run's trained models into the MLflow registry, each reviewed for ``champion``.

Each model is registered once per stage key (alias ``candidate``) with its lineage; the decision
(parent and champion compared on per-prompt scores, gates, the alias move) is
``components.promotion``'s, the same that ``r1flow promote`` shows a person.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from components import promotion
from components.config import Profile, content_hash, plain_template
from components.digest import file_sha256
from components.sections import REGISTERED_REF, ModelConfig
from components.stage_io import read_metrics
from components.tracking import NotFound, Tracker, VersionRecord
from flows.keys import StageOutput, code_version, inputs_of, registered_base, stage_key
from flows.locks import exclusive
from flows.recipe import PARENTS, RECIPE, REGISTERED, recipe_step, section


def pin_bases(profile: Profile, tracker: Tracker) -> tuple[list[str], dict[str, str]]:
    """Overrides that fix each registry base for the whole run, and tags that say which it is. The
    run's keys, the stages it sends elsewhere and its rerun then use that one version, however
    the alias moves meanwhile (this run's own promotions move it)."""
    overrides, tags = [], {}
    for step in (s for s in RECIPE if s.module == "base"):
        config = section(profile, step)
        if config.source == "registry":
            version, tags[f"{step.section}_base"] = pinned_base(config, f"{step.section}.path", profile, tracker)
            overrides.append(f"{step.section}.path={version.ref}" if version else
                             f"{step.section}={json.dumps(config.fallback.model_dump(mode='json'))}")
    return overrides, tags


def pinned_base(config: ModelConfig, what: str, profile: Profile, tracker: Tracker) -> tuple[VersionRecord | None, str]:
    """The version a registry base stands for in this run (None: its fallback), and why."""
    found = REGISTERED_REF.fullmatch(config.path)
    try:
        version = tracker.version(found["name"], found["alias"] or found["version"])
    except NotFound:
        if found["version"] or config.fallback is None:
            registered_base(config.path, what, profile)  # raises, saying what to do
        return None, f"fallback ({config.path}: none yet)"
    data = recipe_step("data")
    if found["alias"] and version.tags.get("data_key") == stage_key("data", profile.data, inputs_of(data, {}, profile),
                                                                     profile):
        # The alias names a model that learnt this very data: with nothing new, the night reruns
        # the one that made it (from its base: every stage a cache hit), not more of its own output.
        learnt = f"{config.path} is {version.ref}, trained on this data from it"
        parent = REGISTERED_REF.fullmatch(version.tags.get("parent_model", ""))
        if parent and parent["version"]:
            try:
                return tracker.version(parent["name"], parent["version"]), f"{parent[0]} ({learnt})"
            except NotFound:  # deleted since: as if it had been no registered base
                pass
        if config.fallback is not None:
            return None, f"fallback ({learnt})"
    return version, f"{version.ref} ({config.path})"


@task(name="register", cache_policy=NO_CACHE)
def register(ctx, outputs: dict[str, StageOutput], data_hash: str) -> dict[str, dict]:
    """Register each trained model once per stage key (alias ``candidate``) with its lineage; then
    review each against its parent and the champion (``components.promotion``). ``champion``
    moves only after every version is registered and reviewed, so a failure on the way leaves
    every champion where it was."""
    # Two runs of one profile at once would both find a model unregistered: one registers at a time.
    with exclusive(f"registry-{ctx.profile.tracking.registry_prefix}", ctx.place.workspace / "locks"):
        return _register(ctx, outputs, data_hash)


def _register(ctx, outputs: dict[str, StageOutput], data_hash: str) -> dict[str, dict]:
    registered, crowned = {}, []
    for role in (r for r in REGISTERED if f"eval_{r}" in outputs):  # parents first: lineage names their version
        version, new = registered_version(ctx, role, outputs, data_hash, registered)
        champion = ctx.tracker.champion(version.name)
        registered[role] = {"name": version.name, "version": version.version, "ref": version.ref, "new": new,
                            "champion": champion is not None and champion.version == version.version}
        if not registered[role]["champion"]:
            checks = promotion.review(ctx.tracker, version, ctx.profile.promotion)
            print(f"{version.ref}: {promotion.verdict(checks)}")
            if promotion.passed(checks):
                crowned.append((role, version))
    for role, version in crowned:
        promotion.crown(ctx.tracker, version)
        registered[role]["champion"] = True
    return registered


def registered_version(ctx, role: str, outputs: dict[str, StageOutput], data_hash: str,
                       registered: dict[str, dict]) -> tuple[VersionRecord, bool]:
    """The version registered for this role's stage output, and whether it was registered now."""
    out, evaluation, parent = outputs[role], outputs[f"eval_{role}"], PARENTS[role]
    name = f"{ctx.profile.tracking.registry_prefix}-{role.replace('_', '-')}"
    found = ctx.tracker.version_by_stage_key(name, out.key)
    if found is not None:
        ctx.tracker.complete_registration(found)
        return found, False
    tags = promotion.lineage(
        stage_key=out.key, code_version=code_version(recipe_step(role).module),
        config_hash=content_hash(ctx.profile)[:16], commit=ctx.commit, data_hash=data_hash,
        data_key=outputs["data"].key, eval_run_id=evaluation.run_id, eval_key=eval_key(ctx, outputs),
        metrics=evaluation.result["metrics"],
        parent=registered[parent]["ref"] if parent in registered else  # else a base; from the registry: its version
        outputs[parent].result.get("registered") or f"{parent} (stage {outputs[parent].key})",
        parent_eval_run_id=outputs[f"eval_{parent}"].run_id if f"eval_{parent}" in outputs else None,
        health=promotion.training_health(read_metrics(out.folder / "metrics.jsonl", finished=True),
                                         ctx.profile.promotion))
    tags.update(base_provenance(role, outputs))
    return ctx.tracker.version(name, ctx.tracker.register(out.run_id, out.folder / "model", name, tags)), True


def base_provenance(role: str, outputs: dict[str, StageOutput]) -> dict[str, str]:
    """Where the pretrained weights under a model came from, as the base stage checked them (a
    GGUF file's sha256 against the profile's pin, its header name, the package that shipped it)."""
    while role in PARENTS:
        role = PARENTS[role]
    found = outputs[role].result.get("provenance") if role in outputs else None
    return {f"base_{key}": str(value) for key, value in (found or {}).items()}


def eval_key(ctx, outputs: dict[str, StageOutput]) -> str:
    """What makes two evaluations comparable: the protocol, the prompt and the test set's content
    (not the data stage's key, which new training data changes: nights pair on one test set)."""
    test = file_sha256(Path(outputs["data"].artifact("test").path))
    return content_hash(ctx.profile.evaluate, plain_template(ctx.profile), test)[:16]
