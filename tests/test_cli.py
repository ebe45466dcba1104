"""The CLI turns what a user can get wrong into one line and a non-zero exit, before any work."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.recipe import EVALUATED, PARENTS, REGISTERED, STAGES, downstream, recipe_step, upstream

runner = CliRunner()


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--from", "r2"], "unknown stage 'r2'"),
    (["run", "--only", "base", "--from", "data"], "use --from or --only, not both"),
    (["promote", "r1flow-r1-final"], "expected NAME/VERSION"),
])
def test_usage_errors_name_the_problem(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output


def test_deploy_needs_a_prefect_server(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["deploy"])
    assert result.exit_code == 2 and "PREFECT_API_URL" in result.output


def test_the_recipe_graph_knows_what_a_stage_reads_and_what_reads_it():
    assert upstream("r1_sft") == {"base", "rejection_sampling", "r1_rl", "cold_start", "data"}
    assert upstream("r1_final") == {"r1_sft", *upstream("r1_sft")}  # R1's last RL starts from its SFT model
    assert downstream("cold_start") == {"r1_rl", "rejection_sampling", "r1_sft", "r1_final", "student",
                                        "student_no_traces", "eval_cold_start", "eval_r1_rl", "eval_r1_sft",
                                        "eval_r1_final", "eval_student", "eval_student_no_traces"}
    assert downstream("r1_sft") == {"r1_final", "eval_r1_sft", "eval_r1_final"}  # distillation reads the traces
    assert downstream("eval_r1_final") == set() and upstream("base") == set()
    assert STAGES[0] == "data" and len(STAGES) == len(set(STAGES)) == 20  # eval_student_base too


def test_the_final_rl_is_grpo_on_the_sft_model_evaluated_registered_and_its_child():
    step = recipe_step("r1_final")
    assert (step.module, step.section) == ("grpo", "final_rl")
    assert step.inputs == {"model": "r1_sft", "data": "data/train", "heldout": "data/validation"}
    assert PARENTS["r1_final"] == "r1_sft" and {"r1_sft", "r1_final"} <= set(EVALUATED) & set(REGISTERED)
    assert REGISTERED.index("r1_sft") < REGISTERED.index("r1_final")  # a parent registers first
    assert recipe_step("student").inputs["data"] == "rejection_sampling/train"  # distillation: still the traces


def test_every_stage_has_its_deployment():
    """A stage the pipeline sends to `r1flow-stage/{stage}` must be deployed (infra/prefect.yaml)."""
    import yaml

    deployments = yaml.safe_load((Path(__file__).parents[1] / "infra" / "prefect.yaml").read_text())["deployments"]
    stages = {d["parameters"]["stage"]: d["name"] for d in deployments if d["entrypoint"].endswith(":stage_flow")}
    assert set(stages) == set(STAGES) and all(name == stage for stage, name in stages.items())


def test_the_results_table_keeps_readable_headers_at_80_columns(monkeypatch):
    from rich.console import Console

    from flows import cli

    metrics = {"pass@1": 0, "lenient_pass@1": 0.3, "cons@4": 0.0, "greedy_accuracy": 0.5, "format_rate": 0.125,
               "language_consistency": 1.0, "mean_length": 30.812, "prompts": 200}
    roles = ("base", "cold_start", "r1_zero", "r1_rl", "r1_sft", "r1_final", "student_base", "student",
             "student_no_traces")
    summary = {"run_id": "75a67174535146a59fe836bad7580d07", "stages": {"data": True}, "data_hash": "50c1",
               "tracking_uri": "sqlite:///x", "metrics": dict.fromkeys(roles, metrics),
               "versions": {"student_no_traces": {"version": "12", "champion": True}}}
    console = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(cli, "console", console)
    cli.print_summary(summary, 600.0)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if line.lstrip().startswith("model"))
    assert header.split() == ["model", "pass@1", "lenient", "cons@4", "greedy", "format", "lang", "tokens", "ver"]
    assert "student_no_traces" in text and "v12 ★" in text
    assert next(line for line in text.splitlines() if line.startswith("base")).split()[1] == "0.000"  # an int 0
