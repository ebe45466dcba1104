"""The recipe as data (``flows.recipe``): what each stage reads, what reads it, and where the final
RL sits among the evaluated and registered models."""

from flows.recipe import EVALUATED, PARENTS, REGISTERED, STAGES, critical_path, downstream, recipe_step, upstream


def test_the_recipe_graph_knows_what_a_stage_reads_and_what_reads_it():
    assert upstream("r1_sft") == {"base", "rejection_sampling", "r1_rl", "cold_start", "data"}
    assert upstream("r1_final") == {"r1_sft", *upstream("r1_sft")}  # R1's last RL starts from its SFT model
    assert downstream("cold_start") == {"r1_rl", "rejection_sampling", "r1_sft", "r1_final", "student",
                                        "student_no_traces", "eval_cold_start", "eval_r1_rl", "eval_r1_sft",
                                        "eval_r1_final", "eval_student", "eval_student_no_traces"}
    assert downstream("r1_sft") == {"r1_final", "eval_r1_sft", "eval_r1_final"}  # distillation reads the traces
    assert downstream("eval_r1_final") == set() and upstream("base") == set()
    assert STAGES[0] == "data" and len(STAGES) == len(set(STAGES)) == 22  # eval_student_base too


def test_the_critical_path_is_the_longest_chain_of_stages_each_reading_the_one_before():
    seconds = {**dict.fromkeys(STAGES, 1.0), "base": 2.0}
    # R1's branch is the deepest: base → cold start → RL → rejection sampling → SFT → final RL → its eval
    assert critical_path(seconds) == (
        ["base", "cold_start", "r1_rl", "rejection_sampling", "r1_sft", "r1_final", "eval_r1_final"], 8.0)
    # a slow student pretraining, on a branch of its own until the student reads the traces, becomes the path
    assert critical_path({**seconds, "student_base": 100.0}) == (["student_base", "student", "eval_student"], 102.0)
    # stages that did not run add nothing; nothing ran: no path
    assert critical_path({"data": 2.0, "base": 5.0, "eval_base": 1.0}) == (["base", "eval_base"], 6.0)
    assert critical_path({}) == ([], 0.0)


def test_the_final_rl_is_grpo_on_the_sft_model_evaluated_registered_and_its_child():
    step = recipe_step("r1_final")
    assert (step.module, step.section) == ("grpo", "final_rl")
    assert step.inputs == {"model": "r1_sft", "data": "data/train", "heldout": "data/validation"}
    assert PARENTS["r1_final"] == "r1_sft" and {"r1_sft", "r1_final"} <= set(EVALUATED) & set(REGISTERED)
    assert REGISTERED.index("r1_sft") < REGISTERED.index("r1_final")  # a parent registers first
    assert recipe_step("student").inputs["data"] == "rejection_sampling/train"  # distillation: still the traces


def test_the_students_rl_is_r1_zeros_grpo_on_the_student_base_evaluated_registered_and_its_child():
    step = recipe_step("student_rl")
    assert (step.module, step.section) == ("grpo", "student_rl")  # its own section: its steps are its own
    assert step.inputs == {**recipe_step("r1_zero").inputs, "model": "student_base"}  # R1-Zero's prompts
    assert upstream("student_rl") == {"student_base", "data"}  # no teacher, no traces
    assert PARENTS["student_rl"] == "student_base" and "student_rl" in set(EVALUATED) & set(REGISTERED)
