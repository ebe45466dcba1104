"""The CLI turns what a user can get wrong into one line and a non-zero exit, before any work."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

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


def test_the_results_table_keeps_readable_headers_at_80_columns(monkeypatch):
    from rich.console import Console

    from flows import cli

    metrics = {"pass@1": 0, "lenient_pass@1": 0.3, "cons@4": 0.0, "greedy_accuracy": 0.5, "format_rate": 0.125,
               "language_consistency": 1.0, "mean_length": 30.812, "prompts": 200}
    roles = ("base", "cold_start", "r1_zero", "r1_rl", "r1_sft", "r1_final", "student_base", "student",
             "student_no_traces")
    summary = {"run_id": "75a67174535146a59fe836bad7580d07", "stages": {"data": True, "base": False},
               "data_hash": "50c1", "tracking_uri": "sqlite:///x", "metrics": dict.fromkeys(roles, metrics),
               "versions": {"student_no_traces": {"version": "12", "champion": True}},
               "seconds": {"data": 1.25, "base": 30.5}, "timeline": {"data": [0.4, 1.7], "base": [1.7, 32.2]},
               "wall_seconds": 40.0, "stage_seconds": 31.75, "critical_path": {"stages": ["base"], "seconds": 30.5}}
    console = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(cli, "console", console)
    cli.print_summary(summary, 600.0)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if line.lstrip().startswith("model"))
    assert header.split() == ["model", "pass@1", "lenient", "cons@4", "greedy", "format", "lang", "tokens", "ver"]
    assert "student_no_traces" in text and "v12 ★" in text
    assert re.search(r"base\W+ran\W+30\.5\W+1\.7\W+32\.2", text)  # the stage table: seconds, start, end
    assert "wall 40 s, stages 32 s, critical path 30 s: base" in " ".join(text.split())
    assert next(line for line in text.splitlines() if line.startswith("base")).split()[1] == "0.000"  # an int 0


def test_cli_reports_a_bad_config_in_one_line_without_traceback(tmp_path):
    (tmp_path / "p.yaml").write_text("grpo:\n  learning_rate: fast\n")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "p.yaml")],
                          capture_output=True, text=True, check=False, cwd=Path(__file__).parents[1])
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2
    assert "Traceback" not in output
    assert "grpo.learning_rate" in output and len(output.splitlines()) == 1


def test_cli_help_lists_commands():
    """The help's Commands panel names every command by its exact name (``rerun`` is not ``run``)."""
    from typer.main import get_command

    done = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    panel = done.stdout.partition(" Commands ")[2]
    listed = re.findall(r"^[│|] ([a-z][\w-]*) ", panel, re.MULTILINE)  # a command starts a row; wrapped text does not
    commands = {name for name, command in get_command(app).commands.items() if not command.hidden}
    assert {"run", "ui"} <= commands and sorted(listed) == sorted(commands), done.stdout
