"""Stage keys (``flows.keys``): a key follows the stage's code, config, inputs and runtime settings,
and nothing else, so an edit reruns exactly the stages it changes."""

from pathlib import Path

import pytest

from components.config import load_profile
from components.stage_io import StageSpec
from components.trainer import trl_arguments
from flows import keys
from flows import machines as machines_module
from flows.keys import Artifact, code_version, planned_keys, stage_key
from flows.launch import launch_command
from flows.machines import machines
from flows.recipe import STAGES

PROJECT = Path(__file__).parents[1]
ACCELERATE = PROJECT / "configs" / "accelerate" / "zero2.yaml"
DEFAULT = PROJECT / "configs" / "default.yaml"


@pytest.fixture
def components_copy(monkeypatch, tmp_path):
    """An editable copy of ``components/`` that code versions are read from."""
    import shutil

    copy = tmp_path / "components"
    shutil.copytree(keys.COMPONENTS, copy)
    monkeypatch.setattr(keys, "COMPONENTS", copy)
    code_version.cache_clear()
    yield copy
    code_version.cache_clear()


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _changed_keys(edit, copy: Path) -> set[str]:
    """The stages of the default profile whose key an edit of the components changes."""
    profile = load_profile(DEFAULT)
    before = planned_keys(profile)
    edit(copy)
    code_version.cache_clear()
    after = planned_keys(profile)
    assert set(before) == set(STAGES)
    return {name for name in before if before[name] != after[name]}


def test_code_version_follows_imports(components_copy):
    before = {m: code_version(m) for m in ("sft", "grpo", "evaluate")}
    _edit(components_copy / "trainer.py", '"""What every TRL trainer', '"""Edited: what every TRL trainer')
    code_version.cache_clear()
    assert code_version("grpo") != before["grpo"] and code_version("sft") != before["sft"]  # both train with it
    assert code_version("evaluate") == before["evaluate"]  # evaluate does not
    grpo = code_version("grpo")
    _edit(components_copy / "sft.py", "def run(spec: StageSpec)", "def run(spec: StageSpec)  ")
    code_version.cache_clear()
    assert code_version("grpo") == grpo  # the SFT stage's own code is not GRPO's
    sft = code_version("sft")
    _edit(components_copy / "generation.py", "from __future__", "# edited\nfrom __future__")
    code_version.cache_clear()
    assert code_version("evaluate") != before["evaluate"]  # evaluate imports generation
    assert code_version("sft") == sft  # sft does not
    grpo = code_version("grpo")
    _edit(components_copy / "gym.py", "from __future__", "# edited\nfrom __future__")
    code_version.cache_clear()
    assert code_version("grpo") != grpo  # rewards.py: "from components import gym"


def test_a_help_string_of_the_config_schema_changes_no_stage_key(components_copy):
    edit = lambda copy: _edit(copy / "sections.py", 'description="share of well-formed eval samples"',
                              'description="the share of eval samples that are well-formed"')
    assert _changed_keys(edit, components_copy) == set()


def test_an_edit_to_the_accuracy_reward_changes_only_what_grades_with_it_and_downstream(components_copy):
    edit = lambda copy: _edit(copy / "rewards.py", "def accuracy_reward(", "def accuracy_reward(  # edited\n")
    changed = _changed_keys(edit, components_copy)
    assert changed == {"r1_zero", "r1_rl", "rejection_sampling", "r1_sft", "r1_final", "student", "student_no_traces",
                       "student_rl", *(s for s in STAGES if s.startswith("eval_"))}
    assert not changed & {"data", "base", "cold_start", "student_base"}


def test_an_edit_to_the_pretraining_loop_changes_the_bases_and_what_descends_from_them(components_copy):
    edit = lambda copy: _edit(copy / "base.py", "def pretrain(", "def pretrain(  # edited\n")
    assert _changed_keys(edit, components_copy) == set(STAGES) - {"data"}


def test_stage_key_depends_on_config_inputs_and_seed():
    profile = load_profile(None)
    cfg = profile.grpo
    inputs = {"model": Artifact("/m", "k1")}
    key = stage_key("grpo", cfg, inputs, profile)
    assert key == stage_key("grpo", cfg, {"model": Artifact("/elsewhere", "k1")}, profile)  # content, not path
    assert key != stage_key("grpo", cfg.model_copy(update={"beta": 0.01}), inputs, profile)
    assert key != stage_key("grpo", cfg, {"model": Artifact("/m", "k2")}, profile)
    assert key != stage_key("grpo", cfg, inputs, profile.model_copy(update={"seed": 1}))
    vllm = profile.runtime.model_copy(update={"generation_backend": "vllm"})
    assert key != stage_key("grpo", cfg, inputs, profile.model_copy(update={"runtime": vllm}))


def test_stage_key_follows_the_accelerate_config_content(tmp_path):
    accelerate = tmp_path / "zero2.yaml"
    accelerate.write_bytes(ACCELERATE.read_bytes())
    profile = load_profile(None, ["runtime.launcher=accelerate", f"runtime.accelerate_config={accelerate}"])
    inputs = {"model": Artifact("/m", "k1")}
    keys = {module: stage_key(module, getattr(profile, module), inputs, profile) for module in ("grpo", "evaluate")}
    accelerate.write_text(ACCELERATE.read_text().replace("zero_stage: 2", "zero_stage: 3"))
    assert stage_key("grpo", profile.grpo, inputs, profile) != keys["grpo"]  # the ZeRO stage changes training
    assert stage_key("evaluate", profile.evaluate, inputs, profile) == keys["evaluate"]  # not evaluation


def test_machines_and_processes_come_from_the_profile_so_every_machine_computes_one_key(monkeypatch):
    launch = ["runtime.launcher=accelerate", f"runtime.accelerate_config={ACCELERATE}", "runtime.device=cpu"]
    one, two = (load_profile(None, [*launch, f"runtime.machines={n}"]) for n in (1, 2))
    inputs = {"model": Artifact("/m", "k1")}
    sender = stage_key("grpo", two.grpo, inputs, two)  # the orchestrator: no rank in its environment
    for rank in ("0", "1"):  # each machine of the launch: its place, and nothing else, from the environment
        monkeypatch.setenv("R1FLOW_MACHINE_RANK", rank)
        monkeypatch.setenv("R1FLOW_MAIN_PROCESS_IP", "10.0.0.1")
        assert stage_key("grpo", two.grpo, inputs, two) == sender
        assert machines("grpo", two).rank == int(rank) and machines("grpo", one) is None
        assert machines("evaluate", two) is None  # one process: no launch across machines
    assert sender != stage_key("grpo", one.grpo, inputs, one)
    per_machine = load_profile(None, [*launch, "runtime.machines=2", "runtime.processes_per_machine=2"])
    assert stage_key("grpo", per_machine.grpo, inputs, per_machine) != sender
    assert stage_key("evaluate", per_machine.evaluate, inputs, per_machine) == stage_key("evaluate", one.evaluate,
                                                                                        inputs, one)
    monkeypatch.setenv("R1FLOW_MACHINE_RANK", "2")
    with pytest.raises(ValueError, match="R1FLOW_MACHINE_RANK 2 is not a rank of runtime.machines 2"):
        machines("grpo", two)
    monkeypatch.delenv("R1FLOW_MAIN_PROCESS_IP")
    with pytest.raises(ValueError, match="runtime.machines is 2: each machine needs R1FLOW_MAIN_PROCESS_IP"):
        machines("grpo", two)
    monkeypatch.setenv("R1FLOW_NUM_MACHINES", "2")  # an older r1flow's setting: refused, not half-obeyed
    with pytest.raises(ValueError, match="R1FLOW_NUM_MACHINES is not read"):
        machines("grpo", one)


def test_the_launch_starts_processes_per_machine_times_machines(monkeypatch, tmp_path):
    launch = ["runtime.launcher=accelerate", f"runtime.accelerate_config={ACCELERATE}", "runtime.device=cpu"]
    monkeypatch.setenv("R1FLOW_MACHINE_RANK", "1")
    monkeypatch.setenv("R1FLOW_MAIN_PROCESS_IP", "10.0.0.1")

    def started(*overrides: str) -> list[str]:
        command = launch_command("grpo", tmp_path / "spec.json", load_profile(None, [*launch, *overrides]))
        at = command.index("--num_processes")
        return command[at + 1 : at + 2] + (command[command.index("--num_machines") + 1 :][:3:2]
                                           if "--num_machines" in command else [])

    assert started() == ["1"]  # on CPU: one process a machine unless the profile says
    assert started("runtime.processes_per_machine=3") == ["3"]
    assert started("runtime.machines=2", "runtime.processes_per_machine=2") == ["4", "2", "1"]  # total, count, rank
    # on GPU: one per GPU the stage environment sees (its own torch, not the orchestrator's)
    monkeypatch.setattr(machines_module, "visible_gpus", lambda python: 8)
    assert started("runtime.device=cuda", "runtime.machines=2") == ["16", "2", "1"]
    monkeypatch.setattr(machines_module, "visible_gpus", lambda python: 0)
    with pytest.raises(ValueError, match="runtime.device is cuda and .* sees no GPU"):
        started("runtime.device=cuda")


def test_bf16_on_cpu_is_a_runtime_setting_in_the_stage_key(tmp_path):
    profile = load_profile(PROJECT / "configs" / "micro.yaml")
    spec = StageSpec(stage="r1_zero", config={}, output=tmp_path, precision=profile.runtime.precision)
    assert trl_arguments(profile.grpo, spec, "cpu")["bf16"] is False  # micro: fp32 on every CPU
    spec.precision = "bf16"
    assert trl_arguments(profile.grpo, spec, "cpu")["bf16"] is True
    bf16 = profile.model_copy(update={"runtime": profile.runtime.model_copy(update={"precision": "bf16"})})
    key = lambda p: stage_key("grpo", p.grpo, {}, p)
    assert key(bf16) != key(profile)
