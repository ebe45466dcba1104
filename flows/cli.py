"""The ``r1flow`` command: run the pipeline, open the UIs.

    r1flow run [--config FILE] [--set key=value ...] [--from STAGE | --only STAGE]
    r1flow eval MODEL --benchmark gsm8k|math500|countdown|reasoning_gym [--limit N]
    r1flow ui
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from components.config import ConfigError, Profile, load_profile
from flows.environment import configure
from flows.workspace import Place, locate

app = typer.Typer(help="r1flow: the DeepSeek-R1 recipe as an operable pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()

ConfigOption = typer.Option(None, "--config", "-c", help="profile YAML (default: configs/default.yaml)")
PrefectFileOption = typer.Option(Path("infra/prefect.yaml"), help="the deployments to register")
PoolOption = typer.Option(["cpu", "gpu"], "--pool", help="process work pools to create if missing")
SetOption = typer.Option(None, "--set", "-s", help="override a key, e.g. --set grpo.learning_rate=5e-5")
SummaryOption = typer.Option(None, help="also write the summary (run ids, metrics, versions, stages) as JSON here")
FolderArgument = typer.Argument(..., help="a local folder, e.g. a Hugging Face model")
ServersFolderOption = typer.Option(None, help="the servers' data and logs (default: servers/ in the workspace)")


def _profile(config: Path | None, overrides: list[str] | None) -> tuple[Path | None, Profile, Place]:
    """The profile and where its state is (``flows.workspace``), with the process configured for
    that workspace before Prefect, MLflow or DVC is imported."""
    if config is None and Path("configs/default.yaml").exists():
        config = Path("configs/default.yaml")
    try:
        profile = load_profile(config, overrides)
    except ConfigError as error:
        console.print(f"[red]config error:[/red] {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    place = locate(profile)
    configure(place.workspace)
    return config, profile, place


@app.command()
def run(config: Path | None = ConfigOption, overrides: list[str] | None = SetOption,
        from_stage: str | None = typer.Option(None, "--from", help="rerun this stage and everything downstream"),
        only: str | None = typer.Option(None, "--only", help="run this stage alone, on cached inputs"),
        summary_json: Path | None = SummaryOption) -> None:
    """Run the whole recipe for a profile (cached stages are reused) and print the results."""
    from flows.recipe import STAGES

    if from_stage and only:
        _fail("use --from or --only, not both", 2)
    for name in filter(None, (from_stage, only)):
        if name not in STAGES:
            _fail(f"unknown stage {name!r}; stages: {', '.join(STAGES)}", 2)
    config, profile, _ = _profile(config, overrides)
    if profile.tracking.tracking_uri:  # a server that does not answer: say so before Prefect or MLflow loads
        from components.reachable import Unreachable, check_reachable

        try:
            check_reachable(profile.tracking.tracking_uri)
        except Unreachable as error:
            _fail(f"pipeline failed: {error}")
    from flows.recipe import selected
    from flows.vllm_stages import check_vllm

    try:  # before Prefect loads, as the pipeline does again before any stage
        check_vllm(profile, {only} if only else selected(profile))
    except ValueError as error:
        _fail(f"pipeline failed: {error}")
    from flows.pipeline import r1_pipeline, stage_flow

    # SIGTERM (a Prefect cancellation, `kill`, a container stop) unwinds like Ctrl-C: the stage process
    # is stopped, its MLflow runs are marked failed, and its checkpoints stay for the next run.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.time()
    args = {"config": str(config) if config else None, "overrides": overrides or [], "root": None}  # $R1FLOW_ROOT or .
    with _reported("pipeline"):
        summary = stage_flow(stage=only, **args, force=True) if only else r1_pipeline(**args, from_stage=from_stage)
    print_summary(summary, time.time() - started)
    if summary_json is not None:
        summary_json.write_text(json.dumps(summary, indent=2, default=str))


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]{message}[/red]", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _reported(what: str):
    """The errors a user can act on, as one message and exit 1 instead of a traceback (a failed
    data validation is a ValueError)."""
    import logging

    from flows.stages import StageFailed

    expected = (StageFailed, FileNotFoundError, PermissionError, LookupError, ValueError, ConnectionError)

    def one_line(record: logging.LogRecord) -> bool:
        # Prefect logs a failed task and flow with the traceback; for these the message is the news.
        if record.exc_info and isinstance(record.exc_info[1], expected):
            record.exc_info, record.exc_text = None, None
        return True

    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    for logger in loggers:
        logger.addFilter(one_line)
    try:
        yield
    except expected as error:
        _fail(f"{what} failed: {error}")
    finally:
        for logger in loggers:
            logger.removeFilter(one_line)


# Column headers that fit an 80-column terminal (a test renders the table).
SHORT = {"lenient_pass@1": "lenient", "greedy_accuracy": "greedy", "format_rate": "format",
         "language_consistency": "lang", "mean_length": "tokens"}


def _figure(value) -> str:
    """A metric for a table: a rate of 0 (the mean of all-False) prints as 0.000 like any other."""
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def print_summary(summary: dict, seconds: float) -> None:
    stages = Table(title="stages", caption="cached: reused from .r1flow/stages/<stage>/<key>; ran: executed now")
    for column in ("stage", "status", "seconds", "start", "end"):  # start, end: seconds into the run
        stages.add_column(column, justify="left" if column in ("stage", "status") else "right")
    for name, cached in summary["stages"].items():
        taken, span = summary.get("seconds", {}).get(name), summary.get("timeline", {}).get(name, ["", ""])
        stages.add_row(name, "[dim]cached[/dim]" if cached else "[bold]ran[/bold]",
                       f"{taken:.1f}" if taken is not None else "", *(str(t) for t in span))
    console.print(stages)
    if path := summary.get("critical_path", {}).get("stages"):
        console.print(f"wall {summary['wall_seconds']:.0f} s, stages {summary['stage_seconds']:.0f} s, critical path "
                      f"{summary['critical_path']['seconds']:.0f} s: {' → '.join(path)}")
    if not summary.get("metrics"):  # --only, or a profile whose stages evaluate nothing
        recorded = f"MLflow run {summary['run_id']}" if summary["run_id"] else \
            f"recorded by machine rank 0 (stage key {summary['key']})"
        console.print(f"{seconds / 60:.1f} min; {recorded}")
        return
    table = Table(title=f"r1flow results (run {summary['run_id'][:8]}, {seconds / 60:.1f} min)",
                  caption="ver: in the MLflow registry as <prefix>-<model>; ★ champion", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, padding=(0, 1, 0, 0))  # 9 columns in 80
    metrics = next(iter(summary["metrics"].values()))
    keys = [k for k in metrics if k != "prompts"]
    table.add_column("model", no_wrap=True)
    for key in keys:
        table.add_column(SHORT.get(key, key), justify="right")
    table.add_column("ver")
    for role, values in summary["metrics"].items():
        version = summary["versions"].get(role)
        registered = f"v{version['version']}" + (" ★" if version["champion"] else "") if version else ""
        table.add_row(role, *(_figure(values[k]) for k in keys), registered)
    console.print(table)
    if rs := summary.get("rejection_sampling"):
        console.print(f"rejection sampling kept {rs['accepted']}/{rs['samples']} samples "
                      f"({rs['acceptance_rate']:.1%})")
    console.print(f"data version {summary['data_hash']}")
    console.print(f"MLflow: {summary['tracking_uri']} (run {summary['run_id']}); `r1flow ui` to browse")


@app.command("eval")
def evaluate(model: str = typer.Argument(..., help="a registered NAME/VERSION or NAME@ALIAS, or a Hugging Face folder"),
             benchmark: str = typer.Option(..., "--benchmark", "-b", help="gsm8k, math500, countdown, or "
                                           "reasoning_gym (the test split of the profile's data.tasks)"),
             limit: int | None = typer.Option(None, "--limit", help="the first N problems only", min=1),
             config: Path | None = ConfigOption, overrides: list[str] | None = SetOption) -> None:
    """Evaluate a model on a public benchmark with R1's protocol (the profile's `evaluate` settings)."""
    config, _, _ = _profile(config, overrides)  # configs/default.yaml where no --config is given
    from flows.model_eval import NAMES, evaluate_model

    if benchmark not in NAMES:
        _fail(f"unknown benchmark {benchmark!r}; choose from {', '.join(NAMES)}", 2)
    with _reported("eval"):
        result = evaluate_model(model=model, benchmark=benchmark, config=str(config) if config else None,
                                    overrides=overrides or [], limit=limit)
    table = Table(title=f"{model} on {benchmark} ({result['seconds'] / 60:.1f} min"
                  f"{', cached' if result['cached'] else ''})")
    for key in result["metrics"]:
        table.add_column(SHORT.get(key, key), justify="right")
    table.add_row(*(str(v) if k == "prompts" else _figure(v) for k, v in result["metrics"].items()))
    console.print(table)
    console.print(f"per-sample records: {result['samples']}")
    console.print(f"MLflow: {result['tracking_uri']} (run {result['run_id']})")


@app.command()
def rerun(run_id: str, config: Path | None = ConfigOption,
          tolerance: float = typer.Option(0.0, help="largest metric difference that still counts as reproduced; "
                                          "0 on CPU (same seeds, same kernels), e.g. 0.03 across GPUs"),
          tracking_uri: str | None = typer.Option(None, help="MLflow store holding the run (default: the "
                                                  "profile's)")) -> None:
    """Reproduce a past pipeline run: its config, its DVC data version, then compare every eval metric."""
    _, _, place = _profile(config, None)
    from flows.reproduce import rerun as reproduce

    started = time.time()
    with _reported("rerun"):
        summary, comparisons, warnings = reproduce(run_id, place, tracking_uri)
    print_summary(summary, time.time() - started)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    table = Table(title=f"run {run_id[:8]} reproduced as {summary['run_id'][:8]} (tolerance {tolerance})")
    for column in ("metric", "recorded", "rerun", "match"):
        table.add_column(column)
    for c in comparisons:
        match = "yes" if c.matches(tolerance) else "[red]NO"
        table.add_row(c.metric, f"{c.recorded:.4f}", f"{c.reproduced:.4f}", match)
    console.print(table)
    if not comparisons or not all(c.matches(tolerance) for c in comparisons):
        _fail(f"not reproduced: {sum(not c.matches(tolerance) for c in comparisons)} metric(s) differ")
    console.print(f"reproduced: {len(comparisons)} metrics match; data version {summary['data_hash']}")


@app.command()
def promote(version: str = typer.Argument(..., help="a registered version, NAME/VERSION, e.g. r1flow-r1-final/3"),
            config: Path | None = ConfigOption, yes: bool = typer.Option(False, "--yes", help="do not ask")) -> None:
    """Show the promotion checks for a version against the champion, and move `champion` if you say so."""
    _, profile, place = _profile(config, None)
    from components.promotion import crown, passed, review, verdict
    from components.tracking import Tracker

    name, _, number = version.partition("/")
    if not number.isdigit():
        _fail(f"version {version!r}: expected NAME/VERSION, e.g. r1flow-r1-final/3", 2)
    tracker = Tracker(place.tracking_uri, place.experiment)
    with _reported("promote"):
        candidate = tracker.version(name, number)
    champion = tracker.champion(name)
    if champion is not None and champion.version == number:
        console.print(f"{version} is already the champion.")
        return
    checks = review(tracker, candidate, profile.promotion)
    table = Table(title=f"{version} vs its parent ({candidate.tags.get('parent_model', 'not recorded')}) and "
                  f"the champion ({champion.ref if champion else 'none yet'})")
    for column in ("check", "passed", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, "yes" if check.passed else "[red]no", check.detail)
    console.print(table)
    failed = [c.name for c in checks if not c.passed]
    console.print(f"gates failed: {', '.join(failed)}" if failed else "every gate passes")
    if not yes and not typer.confirm(f"Move champion of {name} to v{number}?", default=False):
        raise typer.Exit(1)
    crown(tracker, candidate, by_hand=None if passed(checks) else verdict(checks))
    console.print(f"champion of {name} is now v{number}")


@app.command()
def history(name: str = typer.Argument(..., help="a registered model, e.g. nightly-r1-zero"),
            config: Path | None = ConfigOption) -> None:
    """The model's versions across nights: run, data version, parent, pass@1, verdict, champion."""
    _, _, place = _profile(config, None)
    from components.promotion import history as versions
    from components.tracking import Tracker

    with _reported("history"):
        rows = versions(Tracker(place.tracking_uri, place.experiment), name)
    table = Table(title=f"{name} in {place.tracking_uri}")
    for column in rows[0]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(f"{value[:8]}" if column in ("night", "data") else value for column, value in row.items()))
    console.print(table)


@app.command()
def deploy(prefect_file: Path = PrefectFileOption, pools: list[str] = PoolOption,
           store: str | None = typer.Option(None, help="s3://bucket/prefix: upload this checkout's code there and "
                                            "give every deployment a pull step, so workers need no checkout")) -> None:
    """Register the Prefect deployments (the nightly pipeline, each stage as its own flow) with the
    server at PREFECT_API_URL, creating the work pools first. Without ``--store``, workers run in
    this checkout's path; with it, each flow run pulls this code from the bucket."""
    import asyncio

    if not os.environ.get("PREFECT_API_URL"):
        _fail("deploy: set PREFECT_API_URL to a Prefect server (e.g. http://127.0.0.1:4200/api; "
              "`r1flow servers` starts one)", 2)
    if not prefect_file.exists():
        _fail(f"deploy: {prefect_file} not found (run from the repository root)", 2)
    created = asyncio.run(_ensure_pools(pools))
    if created:
        console.print(f"created work pool(s): {', '.join(created)}")
    if store:
        from flows.code import with_pull_step

        prefect_file, url = with_pull_step(prefect_file, store, Path.cwd())
        console.print(f"code uploaded to {url}")
    prefect = Path(sys.executable).parent / "prefect"
    done = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        _fail(f"prefect deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    console.print(f"deployed {prefect_file}: `prefect deployment ls` lists them; start workers with "
                  f"`prefect worker start --pool {pools[0]}`")


@app.command()
def upload(folder: Path = FolderArgument,
           url: str = typer.Argument(..., help="s3://bucket/prefix to put it at (credentials and endpoint: AWS_*)")):
    """Put a folder into the S3 store with a manifest of its files (sizes, sha256), as a profile's
    ``base.path`` reads it: a model that every worker fetches, checks file by file, and keys by
    that manifest."""
    from components.sections import has_credentials
    from components.store import Store

    if not folder.is_dir():
        _fail(f"upload: {folder} is not a folder", 2)
    if not url.startswith("s3://") or has_credentials(url):
        _fail("upload: the destination must be s3://bucket/prefix, with no credentials in it (they come from "
              "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)", 2)
    manifest = Store.at(url).put(folder, "")
    size = sum(f["size"] for f in manifest["files"].values())
    console.print(f"uploaded {len(manifest['files'])} files ({size / 1e6:.1f} MB) to {url} with their manifest")


async def _ensure_pools(names: list[str]) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    created = []
    async with get_client() as client:
        for name in names:
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                created.append(name)
            except ObjectAlreadyExists:
                pass
    return created


@app.command()
def servers(host: str = typer.Option("127.0.0.1", help="bind address (loopback unless you mean it)"),
            s3_port: int = 8333, mlflow_port: int = 5000, prefect_port: int = 4200,
            backend: str = typer.Option("postgresql+psycopg2://postgres@127.0.0.1:5432/r1flow",
                                        help="the MLflow server's database (created if missing)"),
            mlflow_workers: int = typer.Option(4, help="MLflow server processes answering requests"),
            folder: Path | None = ServersFolderOption, config: Path | None = ConfigOption) -> None:
    """Start what workers on other machines share: SeaweedFS (S3), MLflow on PostgreSQL with its
    artifacts in the bucket, and Prefect. Prints what to export; Ctrl-C stops all three."""
    from flows.servers import BUCKET, Ports, start_stack, stop

    folder = (folder or _profile(config, None)[2].workspace / "servers").resolve()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        stack, processes = start_stack(folder, host, Ports(s3_port, mlflow_port, prefect_port), backend,
                                       mlflow_workers=mlflow_workers)
    except (OSError, RuntimeError) as error:
        _fail(f"servers: {error} (logs in {folder})")
    keys = "as exported" if os.environ.get("AWS_SECRET_ACCESS_KEY") else f"source {folder / 's3.env'}"
    print(f"# S3 (SeaweedFS) {stack.endpoint}, bucket {BUCKET}; MLflow {stack.tracking_uri}; "
          f"Prefect {stack.prefect_api}\n"
          f"export AWS_ENDPOINT_URL_S3={stack.endpoint} PREFECT_API_URL={stack.prefect_api}\n"
          f"# credentials: {keys}\n"
          f"r1flow run --set store=s3://{BUCKET}/store --set tracking.tracking_uri={stack.tracking_uri}\n"
          "# Ctrl-C stops the servers", flush=True)
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(1)
        _fail("servers: one server exited; see the logs in " + str(folder))
    except KeyboardInterrupt:
        pass
    finally:
        stop(processes)


@app.command()
def ui(config: Path | None = ConfigOption, mlflow_port: int = 5000, prefect_port: int = 4200,
       host: str = typer.Option("127.0.0.1", help="bind address (loopback unless you mean it)")) -> None:
    """Start the MLflow and Prefect UIs over this workspace's stores; Ctrl-C (or SIGTERM) stops both."""
    _, _, place = _profile(config, None)

    # Even when started with SIGINT ignored (`nohup`, `&` in a script), Ctrl-C and SIGTERM stop it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    uri = place.tracking_uri
    bin_dir = Path(sys.executable).parent
    servers = [
        subprocess.Popen([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", uri, "--host", host,
                          "--port", str(mlflow_port), "--workers", "1"]),  # one user: one process, not MLflow's 4
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
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    app()
