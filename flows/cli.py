"""The ``r1flow`` command: run the pipeline, open the UIs.

    r1flow run [--config FILE] [--set key=value ...]
    r1flow ui
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from components.config import ConfigError, Profile, load_profile
from flows.environment import configure

app = typer.Typer(help="r1flow: the DeepSeek-R1 recipe as an operable pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()

ConfigOption = typer.Option(None, "--config", "-c", help="profile YAML (default: configs/default.yaml)")
SetOption = typer.Option(None, "--set", "-s", help="override a key, e.g. --set grpo.learning_rate=5e-5")


def _profile(config: Path | None, overrides: list[str] | None) -> tuple[Path | None, Profile]:
    if config is None and Path("configs/default.yaml").exists():
        config = Path("configs/default.yaml")
    try:
        return config, load_profile(config, overrides)
    except ConfigError as error:
        console.print(f"[red]config error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def run(config: Path | None = ConfigOption, overrides: list[str] | None = SetOption) -> None:
    """Run the whole recipe for a profile and print the evaluation table."""
    config, profile = _profile(config, overrides)
    configure(profile.workspace)
    from components.validate import DataValidationError
    from flows.pipeline import r1_pipeline
    from flows.stages import StageFailed

    started = time.time()
    try:
        summary = r1_pipeline(config=str(config) if config else None, overrides=overrides or [], root=".")
    except (StageFailed, DataValidationError, FileNotFoundError, ValueError) as error:
        console.print(f"[red]pipeline failed:[/red] {error}", soft_wrap=True)
        raise typer.Exit(1) from None
    print_summary(summary, time.time() - started)


SHORT = {"greedy_accuracy": "greedy", "format_rate": "format", "language_consistency": "language",
         "mean_length": "tokens"}  # headers that fit an 80-column terminal


def print_summary(summary: dict, seconds: float) -> None:
    table = Table(title=f"r1flow results (run {summary['run_id'][:8]}, {seconds / 60:.1f} min)",
                  caption="version: in the MLflow registry as <prefix>-<model>; ★ champion")
    metrics = next(iter(summary["metrics"].values()))
    keys = [k for k in metrics if k != "prompts"]
    table.add_column("model", no_wrap=True)
    for key in keys:
        table.add_column(SHORT.get(key, key), justify="right")
    table.add_column("version")
    for role, values in summary["metrics"].items():
        version = summary["versions"].get(role)
        registered = f"v{version['version']}" + (" ★" if version["champion"] else "") if version else ""
        table.add_row(role, *(f"{values[k]:.3f}" if isinstance(values[k], float) else str(values[k]) for k in keys),
                      registered)
    console.print(table)
    hits = [name for name, cached in summary["stages"].items() if cached]
    console.print(f"stages cached: {', '.join(hits) if hits else 'none'}")
    rs = summary["rejection_sampling"]
    console.print(f"rejection sampling kept {rs['accepted']}/{rs['samples']} samples "
                  f"({rs['acceptance_rate']:.1%}); data version {summary['data_hash']}")
    console.print(f"MLflow: {summary['tracking_uri']} (run {summary['run_id']}); `r1flow ui` to browse")


@app.command()
def ui(config: Path | None = ConfigOption, mlflow_port: int = 5000, prefect_port: int = 4200,
       host: str = typer.Option("127.0.0.1", help="bind address (loopback unless you mean it)")) -> None:
    """Start the MLflow and Prefect UIs over this workspace's stores; Ctrl-C stops both."""
    _, profile = _profile(config, None)
    configure(profile.workspace)
    from components.tracking import default_uri

    uri = profile.tracking.tracking_uri or default_uri(profile.workspace)
    bin_dir = Path(sys.executable).parent
    servers = [
        subprocess.Popen([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", uri, "--host", host,
                          "--port", str(mlflow_port)]),
        subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)]),
    ]
    console.print(f"MLflow UI:  http://{host}:{mlflow_port}\nPrefect UI: http://{host}:{prefect_port}\n"
                  "Ctrl-C to stop.")
    try:
        while all(s.poll() is None for s in servers):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    app()
