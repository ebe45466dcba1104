"""A base from the model registry (``base.source: registry``): the fallback while the registry
holds no version, then the version an alias names, pinned for the run, keyed by what was
registered and named as the parent of what trains on it; the errors, one line each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from components.config import load_profile

MICRO = str(Path(__file__).parents[1] / "configs" / "micro.yaml")
NAME = "r1flow-r1-zero"


def registry_base(ref: str, fallback: bool = True) -> str:
    """The override that takes the micro profile's base from the registry, its own tiny base as the fallback."""
    base = {"source": "registry", "path": ref}
    if fallback:
        base["fallback"] = load_profile(MICRO).base.model_dump(mode="json")
    return f"base={json.dumps(base)}"


@pytest.mark.slow
def test_a_night_starts_from_the_registered_version_its_alias_names_or_the_fallback_while_none_does(tmp_path):
    from typer.testing import CliRunner

    from components.tracking import Tracker
    from flows.cli import app
    from flows.keys import planned_keys
    from flows.pipeline import r1_pipeline
    from flows.workspace import locate

    root = tmp_path / "project"
    night = ["runtime.device=cpu", "stages=[eval_r1_zero]", registry_base(f"{NAME}@candidate")]
    first = r1_pipeline(config=MICRO, root=str(root), overrides=night)  # nothing registered yet: the fallback
    place = locate(load_profile(MICRO), root)
    tracker = Tracker(place.tracking_uri, place.experiment)
    assert tracker.run(first["run_id"]).tags["base_base"] == f"fallback ({NAME}@candidate: none yet)"
    assert first["versions"]["r1_zero"]["version"] == "1"
    assert tracker.version(NAME, "1").tags["parent_model"].startswith("base (stage ")

    second = r1_pipeline(config=MICRO, root=str(root), overrides=night)  # @candidate is version 1 now
    assert tracker.run(second["run_id"]).tags["base_base"] == f"{NAME}/1 ({NAME}@candidate)"
    assert not second["stages"]["base"] and not second["stages"]["r1_zero"]  # another base: retrained
    assert second["versions"]["r1_zero"]["version"] == "2"
    assert tracker.version(NAME, "2").tags["parent_model"] == f"{NAME}/1"
    profile = json.loads(tracker.read_artifact(second["run_id"], "profile.json"))
    assert profile["base"]["path"] == f"{NAME}/1"  # what a rerun uses, wherever the alias is by then

    # Keyed by the version's content: the same version, the same key; another version, another key.
    pinned = lambda ref: planned_keys(load_profile(MICRO, [*night[:2], registry_base(ref), "tracking.tracking_uri="
                                                           + place.tracking_uri]))["base"]
    assert pinned(f"{NAME}/1") == pinned(f"{NAME}/1") != pinned(f"{NAME}/2")

    # What cannot be found is one line naming it, before anything runs.
    missing = {(f"{NAME}/9", True): f"base.path {NAME}/9: no such registered version in .*; name one the registry "
                                    "holds",
               ("r1flow-none@champion", False): "base.path r1flow-none@champion: no version holds that alias in .*; "
                                                "register one, or give base.fallback, the base while none does"}
    for (ref, fallback), message in missing.items():
        sets = ["runtime.device=cpu", "stages=[eval_r1_zero]", registry_base(ref, fallback)]
        shown = CliRunner().invoke(app, ["run", "-c", MICRO, *(arg for s in sets for arg in ("-s", s))],
                                   env={"R1FLOW_ROOT": str(root)})
        assert shown.exit_code == 1 and "Traceback" not in shown.output, shown.output
        assert re.search(f"pipeline failed: {message}", shown.output.replace("\n", "")), shown.output
