"""What several test files share, one copy each: separate hosts on one machine (``Hosts``), what a
completed pipeline run leaves in MLflow (``check_runs``, ``check_report``, ``check_registry``),
bounded waits on processes, a PostgreSQL database per test, an S3 bucket on SeaweedFS, the stage
processes of a workspace, and a small GGUF file.

Free ports and waiting for a server's URL are the project's own: ``flows.servers.free_port`` and
``flows.servers.wait_for``. Heavy libraries are imported where they are used, so that importing
this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

# --- processes -------------------------------------------------------------------------------


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    """The process's output once it ends (bounded); its process group is killed whatever happens,
    so nothing a test started outlives it."""
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return out


def wait_until(condition, seconds: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` until it holds, at most ``seconds``. Given the process that should make it
    hold, fail as soon as that process ends, with its output, instead of waiting out the bound."""
    deadline = time.time() + seconds
    while not condition():
        assert process is None or process.poll() is None, \
            f"the process ended before {what}:\n{(finish(process) or '')[-3000:]}"
        assert time.time() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.1)


def stage_processes(root: Path) -> list[int]:
    """Live processes running a stage of this workspace: a stopped or killed run must leave none
    behind. A launched stage names its spec file under ``root``; a stage forked from the warm
    fork server carries the server's command line, so it is known by its working folder."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:  # the process ended meanwhile
            continue
        ours = str(root) in text or cwd == root or root in cwd.parents
        if ours and ("components." in text or "flows.forkserver" in text):
            found.append(int(proc.name))
    return found


# --- PostgreSQL ------------------------------------------------------------------------------
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}


def postgres_database(create: bool = True) -> str | None:
    """A fresh database name on the machine's PostgreSQL, the database made unless ``create`` is
    false (``r1flow servers`` makes its own); None where none answers on 127.0.0.1."""
    import psycopg2

    try:
        connection = psycopg2.connect(**POSTGRES, connect_timeout=3)
    except psycopg2.OperationalError:
        return None
    name = f"r1flow_test_{uuid.uuid4().hex[:8]}"
    if create:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return name


def drop_database(name: str) -> None:
    """Drop a test's database, connections and all: the machine's PostgreSQL is shared."""
    import psycopg2

    connection = psycopg2.connect(**POSTGRES)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    connection.close()


# --- model files -----------------------------------------------------------------------------


@contextlib.contextmanager
def s3_prefix(folder: Path, user: str):
    """A SeaweedFS S3 endpoint with its bucket, started in ``folder``; the environment points s3fs
    (and the stages) at it. Yields the ``Store`` of a prefix of the bucket of the caller's own."""
    import secrets

    import pytest

    from components.store import Store
    from flows.servers import BUCKET, free_port, seaweedfs, stop

    keys = {"AWS_ACCESS_KEY_ID": user, "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    port = free_port()
    server = seaweedfs(folder, "127.0.0.1", port, keys)
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**keys, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}.items():
            env.setenv(name, value)
        try:
            store = Store.at(f"s3://{BUCKET}")
            for _ in range(60):  # the bucket is made just after S3 answers
                if store.fs.exists(BUCKET):
                    break
                time.sleep(0.5)
            yield Store.at(f"s3://{BUCKET}/{secrets.token_hex(4)}")
        finally:
            stop([server])


def small_gguf(path: Path) -> Path:
    """A small valid GGUF file (a little metadata, two float32 tensors): a real one is 100 MB."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("planted")
    writer.add_token_list([f"t{i}" for i in range(50)])
    writer.add_token_scores([0.0] * 50)
    writer.add_tensor("token_embd.weight", np.ones((50, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- hosts -----------------------------------------------------------------------------------


class Hosts:
    """Separate hosts on one machine: Linux network namespaces joined by veth pairs to a bridge in
    the test's own subnet, each host with its own folder. The servers bind to the bridge's address;
    from a namespace, 127.0.0.1 is that host's own loopback, so nothing else is reachable.

    Where namespaces are refused (no root, no iproute2), each host is a folder and every address is
    127.0.0.1; ``isolated`` says which, and the test prints it.
    """

    def __init__(self, folder: Path, names: list[str]):
        self.folder, self.names = folder, names
        tag = f"{os.getpid() % 100000}"
        self.bridge, self.subnet = f"r1b{tag}", f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.namespaces = {name: f"r1f{tag}-{name}" for name in names}
        self.processes: dict[str, list[subprocess.Popen]] = {name: [] for name in names}
        self.isolated = False
        self.reason = ""
        try:
            self._create()
            self.isolated = True
        except (OSError, subprocess.CalledProcessError) as error:
            self.remove()
            self.reason = getattr(error, "stderr", b"") or str(error)

    @property
    def address(self) -> str:
        """Where the servers listen: the bridge's address, or loopback without namespaces."""
        return f"{self.subnet}.1" if self.isolated else "127.0.0.1"

    def root(self, name: str) -> Path:
        return self.folder / name

    def host_address(self, name: str) -> str:
        """A host's own address on the bridge (127.0.0.1 without namespaces)."""
        return f"{self.subnet}.{10 + self.names.index(name)}" if self.isolated else "127.0.0.1"

    def interface(self, name: str) -> str:
        """A host's network interface: for libraries that must be told which one (gloo)."""
        return f"{self.bridge}p{10 + self.names.index(name)}" if self.isolated else "lo"

    def _create(self) -> None:
        ip = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for number, (name, namespace) in enumerate(self.namespaces.items(), start=10):
            outside, inside = f"{self.bridge}v{number}", f"{self.bridge}p{number}"
            ip("netns", "add", namespace)
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", namespace)
            ip("link", "set", outside, "master", self.bridge, "up")
            ip("-n", namespace, "addr", "add", f"{self.subnet}.{number}/24", "dev", inside)
            ip("-n", namespace, "link", "set", inside, "up")
            ip("-n", namespace, "link", "set", "lo", "up")

    def _wrap(self, name: str, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[name], *command] if self.isolated else command

    def run(self, name: str, command: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(self._wrap(name, command), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, name: str, command: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
        with log.open("ab") as out:
            process = subprocess.Popen(self._wrap(name, command), env=env, cwd=cwd, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name].append(process)
        return process

    def kill(self, name: str) -> None:
        """SIGKILL every process of a host, as when the machine dies."""
        pids = set()
        if self.isolated:
            listed = subprocess.run(["ip", "netns", "pids", self.namespaces[name]], capture_output=True, text=True,
                                    check=False, timeout=30)
            pids = {int(p) for p in listed.stdout.split()}
        for process in self.processes[name]:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes[name]:
            process.wait(timeout=30)

    def remove(self) -> None:
        """Kill every host's processes, then delete the namespaces (their veth ends go with them)
        and the bridge."""
        for name in self.names:
            self.kill(name)
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False, timeout=30)


# --- what a completed pipeline run leaves in MLflow ------------------------------------------
# The same assertions run against the local SQLite store (test_pipeline, test_data_sources), an
# MLflow server (test_servers) and the servers the hosts share (test_hosts).

STAGES = {"data", "base", "r1_zero", "cold_start", "r1_rl", "rejection_sampling", "r1_sft", "r1_final",
          "student_base", "student", "student_no_traces", "student_rl"}
MODELS = {"base", "cold_start", "r1_zero", "r1_rl", "r1_sft", "r1_final", "student_base", "student",
          "student_no_traces", "student_rl"}
EVALS = {f"eval_{m}" for m in MODELS}
REGISTERED = ["r1flow-cold-start", "r1flow-r1-zero", "r1flow-r1-rl", "r1flow-r1-sft", "r1flow-r1-final",
              "r1flow-student", "r1flow-student-rl"]
LINEAGE_TAGS = {"config_hash", "code_version", "git_commit", "parent_model", "parent_eval_run_id", "eval_run_id",
                "eval_key", "pass_at_1", "stage_key", "format_rate", "data_validation", "training_health", "data_hash",
                "promotion"}


def child_runs(summary: dict) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    return {c.info.run_name: c for c in children}


def check_runs(summary: dict, left_out: frozenset[str] = frozenset()) -> None:
    """One parent run, one finished child run per stage (but the models ``left_out`` and their
    evaluations), curves and samples logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["data_hash"] == summary["data_hash"]
    children = child_runs(summary)
    assert set(children) == (STAGES | EVALS) - left_out - {f"eval_{m}" for m in left_out}
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert len(client.get_metric_history(children["r1_zero"].info.run_id, "reward")) >= 2  # a training curve
    evaluation = children["eval_r1_sft"]
    assert evaluation.data.metrics["pass_at_1"] == summary["metrics"]["r1_sft"]["pass@1"]
    assert "samples.jsonl" in {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert set(summary["metrics"]) == MODELS - left_out
    # pass@1 on the held-out validation prompts at step 0 and the last step: R1's figure-2 curve
    for grpo in ("r1_zero", "r1_final"):
        heldout = sorted(m.step for m in client.get_metric_history(children[grpo].info.run_id, "heldout/pass_at_1"))
        assert heldout[0] == 0 and heldout[-1] == children[grpo].data.metrics["steps"]


def check_schedule(summary: dict, at_most: int) -> set[tuple[str, str]]:
    """The run's timeline keeps the recipe's graph: no stage started before every stage it reads
    had ended, and at most ``at_most`` ran at once. Returns the pairs of stages that overlapped."""
    from flows.recipe import RECIPE, reads

    spans = summary["timeline"]
    for step in RECIPE:
        for before in reads(step) & spans.keys() if step.name in spans else ():
            assert spans[before][1] <= spans[step.name][0] + 0.1, f"{step.name} started before {before} ended"
    # rounded to 0.1 s: a stage that starts as another ends does not count as running beside it
    overlapped = {(a, b) for a in spans for b in spans if a < b and
                  max(spans[a][0], spans[b][0]) + 0.1 < min(spans[a][1], spans[b][1])}
    starts = sorted(start for start, _ in spans.values())
    assert max(sum(s <= t + 0.05 and t + 0.05 < e for s, e in spans.values()) for t in starts) <= at_most, spans
    return overlapped


def check_report(summary: dict) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    report = {a.path for a in client.list_artifacts(summary["run_id"], "report")}
    assert {f"report/{name}" for name in ("eval_table.md", "reward.png", "accuracy.png", "kl.png",
                                          "completion_length.png", "heldout_pass.png")} <= report


def check_registry(summary: dict, left_out: frozenset[str] = frozenset()) -> None:
    """Each trained model (but those ``left_out``) registered once as candidate, with lineage and a
    promotion verdict that compared it with its parent; champion exactly where the verdict says so;
    loadable by transformers."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    client = MlflowClient(summary["tracking_uri"])
    for name in (n for n in REGISTERED if n.removeprefix("r1flow-").replace("-", "_") not in left_out):
        candidate = client.get_model_version_by_alias(name, "candidate")
        assert str(candidate.version) == "1"
        assert LINEAGE_TAGS <= set(candidate.tags) and candidate.tags["data_hash"] == summary["data_hash"]
        verdict = candidate.tags["promotion"]
        assert "beats its parent" in verdict  # the first version of a name needs evidence too
        champion = {v.version for v in client.search_model_versions(f"name = '{name}'") if "champion" in v.aliases}
        assert champion == ({"1"} if verdict.startswith("promoted to champion") else set())
    r1_rl = client.get_model_version_by_alias("r1flow-r1-rl", "candidate")
    assert r1_rl.tags["parent_model"] == "r1flow-cold-start/1"  # lineage names the parent's version
    r1_final = client.get_model_version_by_alias("r1flow-r1-final", "candidate")
    assert r1_final.tags["parent_model"] == "r1flow-r1-sft/1"  # the final RL starts from the SFT on the traces
    source = r1_final.source  # file:// or the server's store
    folder = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=summary["tracking_uri"])
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0
