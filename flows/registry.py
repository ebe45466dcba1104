"""A run's trained models into the MLflow registry, each reviewed for ``champion``.

Each model is registered once per stage key (alias ``candidate``) with its lineage; the decision
(parent and champion compared on per-prompt scores, gates, the alias move) is
``components.promotion``'s, the same that ``r1flow promote`` shows a person.
"""

from __future__ import annotations

import json

from prefect import task
from prefect.cache_policies import NO_CACHE

from components import promotion
from components.config import REGISTERED_REF, Profile, content_hash
from components.stage_io import read_metrics
from components.tracking import NotFound, Tracker, VersionRecord
from flows.keys import StageOutput, code_version, registered_base
from flows.locks import exclusive
from flows.recipe import PARENTS, RECIPE, REGISTERED, recipe_step, section


def pin_bases(profile: Profile, tracker: Tracker) -> tuple[list[str], dict[str, str]]:
    """Overrides that fix each registry base for the whole run: the version its alias names now,
    or its fallback while none does; and tags that say which. The run's keys, the stages it sends
    elsewhere and its rerun then use that one version, however the alias moves meanwhile (this
    run's own promotions move it)."""
    overrides, tags = [], {}
    for step in (s for s in RECIPE if s.module == "base"):
        config = section(profile, step)
        if config.source != "registry":
            continue
        found = REGISTERED_REF.fullmatch(config.path)
        try:
            version = tracker.version(found["name"], found["alias"] or found["version"])
        except NotFound:
            if found["version"] or config.fallback is None:
                registered_base(config.path, f"{step.section}.path", profile)  # raises, saying what to do
            overrides.append(f"{step.section}={json.dumps(config.fallback.model_dump(mode='json'))}")
            tags[f"{step.section}_base"] = f"fallback ({config.path}: none yet)"
            continue
        overrides.append(f"{step.section}.path={version.ref}")
        tags[f"{step.section}_base"] = f"{version.ref} ({config.path})"
    return overrides, tags


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
        eval_run_id=evaluation.run_id, eval_key=eval_key(ctx, outputs), metrics=evaluation.result["metrics"],
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
    """What makes two evaluations comparable: the protocol and the test set."""
    return content_hash(ctx.profile.evaluate, outputs["data"].artifact("test").key)[:16]
