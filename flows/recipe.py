"""The R1 recipe as data: each stage, the component it runs, its profile section, its inputs.

An input is ``"stage"`` (that stage's model folder) or ``"stage/file"`` (a file it wrote, e.g.
``data/train`` is ``train.jsonl`` of the data stage). From this table the pipeline knows what
``--from STAGE`` must rerun (the stage and everything downstream) and what ``--only STAGE`` needs
cached (everything upstream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.config import Profile
from components.sections import Section
from components.stage_io import split_ref

# Every model is evaluated, the students' base too: a registered model must beat its parent.
EVALUATED = ("base", "cold_start", "r1_zero", "r1_rl", "r1_sft", "r1_final", "student_base", "student",
             "student_no_traces", "student_rl")
# Parents before their children: a version's lineage names its parent's registered version.
REGISTERED = ("cold_start", "r1_zero", "r1_rl", "r1_sft", "r1_final", "student", "student_rl")


@dataclass(frozen=True)
class Step:
    name: str
    module: str  # components.<module>
    section: str  # the profile section that configures it
    inputs: dict[str, str] = field(default_factory=dict)
    # Great Expectations suites its files must pass before anything trains on them: file -> suite
    validate: dict[str, str] = field(default_factory=dict)


RECIPE = (
    # Prompts with verifiable answers (generated or imported), split and decontaminated.
    Step("data", "data", "data",
         validate={"train": "prompts", "validation": "prompts", "test": "eval", "cold_start": "sft"}),
    Step("base", "base", "base"),
    # R1-Zero: GRPO straight from the base, rule rewards only.
    Step("r1_zero", "grpo", "grpo", {"model": "base", "data": "data/train", "heldout": "data/validation"}),
    # R1: a little cold-start SFT, the same RL, rejection sampling, SFT of the base on the traces,
    # then RL again on that SFT model (the final stage; its own section, so its budget is its own).
    Step("cold_start", "sft", "cold_start", {"model": "base", "data": "data/cold_start"}),
    Step("r1_rl", "grpo", "grpo", {"model": "cold_start", "data": "data/train", "heldout": "data/validation"}),
    Step("rejection_sampling", "rejection_sampling", "rejection_sampling", {"model": "r1_rl", "data": "data/train"},
         validate={"train": "rejection_sampled"}),
    Step("r1_sft", "sft", "sft", {"model": "base", "data": "rejection_sampling/train"}),
    Step("r1_final", "grpo", "final_rl", {"model": "r1_sft", "data": "data/train", "heldout": "data/validation"}),
    # Distillation: plain SFT of a smaller student on the same traces.
    Step("student_base", "base", "student"),
    Step("student", "sft", "distill", {"model": "student_base", "data": "rejection_sampling/train"}),
    # The control: the same student, steps and prompts, trained on the verified answers without
    # the reasoning. What the student gains over it is what the traces taught.
    Step("student_no_traces", "sft", "distill", {"model": "student_base", "data": "rejection_sampling/answers"}),
    # Distillation's other side, as R1's report compares them: the same student trained by RL instead,
    # GRPO on its own base with R1-Zero's prompts and rewards. Distilling wins if the expensive RL
    # is worth doing once, in the big model.
    Step("student_rl", "grpo", "student_rl", {"model": "student_base", "data": "data/train",
                                              "heldout": "data/validation"}),
    # Every model on the held-out test prompts, R1's protocol.
    *(Step(f"eval_{model}", "evaluate", "evaluate", {"model": model, "data": "data/test"}) for model in EVALUATED),
)
STAGES = tuple(step.name for step in RECIPE)
# Each registered model's parent in the lineage.
PARENTS = {"cold_start": "base", "r1_zero": "base", "r1_rl": "cold_start", "r1_sft": "base", "r1_final": "r1_sft",
           "student": "student_base", "student_rl": "student_base"}


def recipe_step(name: str) -> Step:
    return next(s for s in RECIPE if s.name == name)


def section(profile: Profile, step: Step) -> Section:
    """The profile section that configures a step."""
    return getattr(profile, step.section)


def check_stage(name: str) -> str:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return name


def reads(step: Step) -> set[str]:
    """The stages whose output ``step`` reads directly."""
    return {split_ref(ref)[0] for ref in step.inputs.values()}


def upstream(name: str) -> set[str]:
    """Every stage whose output ``name`` reads, directly or not."""
    direct = reads(recipe_step(name))
    return direct.union(*(upstream(d) for d in direct))


def downstream(name: str) -> set[str]:
    """Every stage that reads ``name``'s output, directly or not."""
    return {s for s in STAGES if name in upstream(s)}


def critical_path(seconds: dict[str, float]) -> tuple[list[str], float]:
    """The chain of stages, each reading the one before, that took longest by ``seconds``: the
    least wall time any order of running this run's stages could take. Stages without a time
    (not run, or restored) add nothing."""
    longest: dict[str, tuple[float, list[str]]] = {}
    for step in RECIPE:  # recipe order: every stage after those it reads
        before = max((longest[d] for d in sorted(reads(step)) if d in longest),
                     key=lambda chain: chain[0], default=(0.0, []))
        if step.name in seconds:
            longest[step.name] = (before[0] + seconds[step.name], [*before[1], step.name])
    total, chain = max(longest.values(), key=lambda chain: chain[0], default=(0.0, []))
    return chain, total


def selected(profile: Profile) -> set[str]:
    """The profile's ``stages`` and everything they need; all stages when it names none."""
    if profile.stages is None:
        return {s.name for s in RECIPE}
    return {"data"}.union(*({check_stage(name), *upstream(name)} for name in profile.stages))
