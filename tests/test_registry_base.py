"""A base from the model registry (``base.source: registry``), keyed by the version's content;
what cannot be found, one line each. The nights that use it: ``tests/test_nightly.py``."""

from __future__ import annotations

import json
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


def test_a_registered_base_is_keyed_by_its_content_and_a_missing_one_is_named(random_model, tmp_path):
    from components.tracking import Tracker
    from flows.keys import planned_keys
    from flows.pipeline import r1_pipeline
    from flows.workspace import locate

    place = locate(load_profile(MICRO), tmp_path)
    tracker = Tracker(place.tracking_uri, place.experiment, place.artifacts)
    for key in ("a" * 16, "b" * 16):  # two stage outputs registered, as a night registers them
        tracker.register(tracker.start_run("r1_zero"), random_model, NAME, {"stage_key": key})
    tracker.set_alias(NAME, "champion", "1")
    sets = lambda ref: ["runtime.device=cpu", registry_base(ref), f"tracking.tracking_uri={place.tracking_uri}"]
    base_key = lambda ref: planned_keys(load_profile(MICRO, sets(ref)))["base"]
    assert base_key(f"{NAME}/1") == base_key(f"{NAME}/1") != base_key(f"{NAME}/2")
    assert base_key(f"{NAME}@champion") == base_key(f"{NAME}/1")  # the alias is looked up, not keyed
    tracker.set_alias(NAME, "champion", "2")
    assert base_key(f"{NAME}@champion") == base_key(f"{NAME}/2")  # a new champion: a new key

    # What cannot be found is named with what to do, before anything runs.
    missing = {(f"{NAME}/9", True): f"base.path {NAME}/9: no such registered version in .*; name one the registry "
                                    "holds",
               ("r1flow-none@champion", False): "base.path r1flow-none@champion: no version holds that alias in .*; "
                                                "register one, or give base.fallback, the base while none does"}
    for (ref, fallback), message in missing.items():
        overrides = ["runtime.device=cpu", "stages=[eval_r1_zero]", registry_base(ref, fallback)]
        with pytest.raises(LookupError, match=f"^{message}$"):
            r1_pipeline(config=MICRO, root=str(tmp_path), overrides=overrides)
    assert not (tmp_path / ".r1flow" / "stages").exists()
