"""Workers that share nothing but the servers: the micro profile across separate hosts.

Each host is a network namespace made here (``helpers.Hosts``) with its own copy of the repository,
at its own path, and its own workspace. They share only SeaweedFS (the S3 stage store), the MLflow
server (PostgreSQL, artifacts in the bucket) and the Prefect server, all started by
``flows.servers`` on the test's bridge address. The cpu host orchestrates; the workers of the gpu
and gpu2 hosts (one stage at a time each, as a GPU machine) take the training stages, with code
pulled from the bucket, two at once where the recipe's branches allow.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Hosts, check_registry, check_report, check_runs, check_schedule, drop_database, postgres_database

from components.config import load_profile
from components.store import Store
from flows.code import code_files
from flows.keys import planned_keys
from flows.recipe import EVALUATED
from flows.servers import Ports, Stack, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
STORE = "s3://r1flow/store"
# The training stages (SFT and GRPO), sent to the gpu pool (a flow run there costs ~7 s here).
TRAINED = ("cold_start", "r1_zero", "r1_rl", "r1_sft", "r1_final", "student", "student_no_traces")
# The runs here leave out the student's RL (the local pipeline tests run it): ready with R1-Zero and
# the cold start, a third pool stage would queue on the two machines, and the schedule checked below
# is that of two branches on two machines.
LEFT_OUT = frozenset({"student_rl"})
EVALUATED_HERE = f"stages=[{','.join(f'eval_{m}' for m in EVALUATED if m not in LEFT_OUT)}]"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Four hosts (cpu, gpu, third, gpu2), the servers on the bridge, the deployments registered
    from the cpu host with the code uploaded to the bucket, and a worker on the gpu host's pool."""
    folder = tmp_path_factory.mktemp("hosts")
    hosts = Hosts(folder, ["cpu", "gpu", "third", "gpu2"])
    print("hosts: network namespaces on " + hosts.address if hosts.isolated else
          f"hosts: network namespaces refused ({hosts.reason!s:.200}); hosts are folders on 127.0.0.1")
    # Credentials a test can search for afterwards: they must appear in no record of the run.
    keys = {"AWS_ACCESS_KEY_ID": f"r1key{secrets.token_hex(6)}", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    database = postgres_database()
    backend = (f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}" if database
               else f"sqlite:///{folder / 'mlflow.db'}")
    servers, test_env = None, pytest.MonkeyPatch()
    try:
        stack = Stack(hosts.address, Ports(*(free_port(hosts.address) for _ in range(3))), keys)
        for name, value in {**keys, "AWS_ENDPOINT_URL_S3": stack.endpoint}.items():
            test_env.setenv(name, value)  # the test's own reads of the bucket (``bucket()``), undone at the end
        servers = start_servers(stack, backend, folder / "servers")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "MLFLOW_"))}
        for name in hosts.names:
            copy = hosts.root(name) / f"r1flow-{name}"  # the repository, at a path of this host's own
            for file in code_files(ROOT):
                (copy / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / file, copy / file)
            subprocess.run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm copy",
                           shell=True, cwd=copy, check=True, timeout=60)
            (hosts.root(name) / "root").mkdir()
        # A host's commands import r1flow from its own copy; its worker's flow runs, from the code
        # they pull from the bucket (no PYTHONPATH there).
        env = lambda name, copy=True: {
            **base, **stack.environment(), "R1FLOW_ROOT": str(hosts.root(name) / "root"),
            "PREFECT_HOME": str(hosts.root(name) / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LOG_PRINTS": "true", "PREFECT_WORKER_QUERY_SECONDS": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **({"PYTHONPATH": str(hosts.root(name) / f"r1flow-{name}")} if copy else {})}
        deployed = hosts.run("cpu", [str(BIN / "r1flow"), "deploy", "--store", STORE], env("cpu"),
                             hosts.root("cpu") / "r1flow-cpu", timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        cluster = {"hosts": hosts, "stack": stack, "env": env, "keys": keys, "folder": folder, "servers": servers}
        cluster["worker"] = start_worker(cluster, "gpu", "--limit", "1")  # a GPU machine: one stage at a time
        yield cluster
    finally:
        test_env.undo()
        hosts.remove()
        if servers is not None and servers.poll() is None:
            servers.send_signal(signal.SIGINT)
            servers.wait(timeout=120)
        if database:
            drop_database(database)


def start_servers(stack: Stack, backend: str, folder: Path) -> subprocess.Popen:
    """``r1flow servers`` on the bridge's address; returns once it says they all answer."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}, **stack.keys}
    folder.mkdir(parents=True)
    command = [str(BIN / "r1flow"), "servers", "--host", stack.host, "--s3-port", str(stack.ports.s3),
               "--mlflow-port", str(stack.ports.mlflow), "--prefect-port", str(stack.ports.prefect),
               "--backend", backend, "--mlflow-workers", "1", "--folder", str(folder)]
    log = folder / "r1flow-servers.log"
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(300):  # bounded: 5 min for SeaweedFS, MLflow and Prefect to answer
        if "Ctrl-C stops" in log.read_text() or process.poll() is not None:
            break
        time.sleep(1)
    assert process.poll() is None and f"export AWS_ENDPOINT_URL_S3={stack.endpoint}" in log.read_text(), \
        log.read_text()[-3000:]
    return process


def start_worker(cluster: dict, host: str, *more: str, env: dict | None = None) -> subprocess.Popen:
    hosts = cluster["hosts"]
    return hosts.start(host, [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--name", f"{host}-worker",
                              *more], {**cluster["env"](host, copy=False), **(env or {})}, hosts.root(host) / "root",
                       hosts.root(host) / "worker.log")


def overrides(cluster: dict, *more: str) -> list[str]:
    return [f"store={STORE}", f"tracking.tracking_uri={cluster['stack'].tracking_uri}", "runtime.device=cpu", *more]


def r1flow(cluster: dict, host: str, args: list[str], timeout: float = 900) -> dict:
    """``r1flow run`` on a host, from its own copy; returns the summary it wrote."""
    hosts = cluster["hosts"]
    out = hosts.root(host) / f"summary-{time.time_ns()}.json"
    done = hosts.run(host, [str(BIN / "r1flow"), "run", "--config", "configs/micro.yaml", *args,
                            "--summary-json", str(out)], cluster["env"](host), hosts.root(host) / f"r1flow-{host}",
                     timeout)
    (hosts.root(host) / "runs.log").open("a").write(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def refs(summary: dict) -> dict:
    return {role: version["ref"] for role, version in summary["versions"].items()}


def bucket(cluster: dict) -> Store:
    return Store.at(STORE)  # the cluster fixture points s3fs at its SeaweedFS


@pytest.fixture(scope="module")
def pipeline(cluster):
    """The cpu stages on the cpu host, its local outputs deleted, then the whole pipeline from the
    cpu host (two stages at once there) with the training stages sent to the gpu pool, where a
    second machine's worker has joined."""
    hosts = cluster["hosts"]
    sets = lambda *more: [arg for o in overrides(cluster, *more) for arg in ("--set", o)]
    first = r1flow(cluster, "cpu", sets("stages=[eval_base,eval_student_base]"))
    assert not any(first["stages"].values())
    shutil.rmtree(hosts.root("cpu") / "root" / ".r1flow" / "stages")
    start_worker(cluster, "gpu2", "--limit", "1")
    summary = r1flow(cluster, "cpu", sets("runtime.gpu_deployment=r1flow-stage/{stage}",
                                          "runtime.gpu_components=[grpo,sft]", "runtime.max_parallel=2",
                                          EVALUATED_HERE))
    return summary


def test_the_gpu_worker_trains_from_inputs_it_downloaded(cluster, pipeline):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    summary, hosts = pipeline, cluster["hosts"]
    assert {name for name, cached in summary["stages"].items() if cached} == {
        "data", "base", "student_base", "eval_base", "eval_student_base"}  # fetched: this host's copies are gone
    check_runs(summary, LEFT_OUT)
    check_report(summary)
    check_registry(summary, LEFT_OUT)
    with temporary_settings({PREFECT_API_URL: cluster["stack"].prefect_api}), get_client(sync_client=True) as client:
        runs = {r.name: r for r in client.read_flow_runs() if r.name in TRAINED}
    assert set(runs) == set(TRAINED)
    workers = {name: r.labels["prefect.worker.name"] for name, r in runs.items()}
    assert all(r.state.is_completed() for r in runs.values()) and set(workers.values()) <= {"gpu-worker", "gpu2-worker"}
    # R1-Zero and R1's cold start (different branches, both ready once the base is) Running at once,
    # on the two machines' workers
    zero, cold = runs["r1_zero"], runs["cold_start"]
    print(f"r1_zero on {workers['r1_zero']} {zero.start_time:%H:%M:%S}-{zero.end_time:%H:%M:%S}, cold_start on "
          f"{workers['cold_start']} {cold.start_time:%H:%M:%S}-{cold.end_time:%H:%M:%S}")
    assert max(zero.start_time, cold.start_time) < min(zero.end_time, cold.end_time)
    assert workers["r1_zero"] != workers["cold_start"]
    check_schedule(summary, at_most=2 + len(TRAINED))  # two here; the pool's, queued ones included
    stages_wall = max(end for _, end in summary["timeline"].values())  # from the run's start to its last stage's end
    print(f"stages' wall {stages_wall:.0f} s, critical path {summary['critical_path']['seconds']:.0f} s, "
          f"run's wall {summary['wall_seconds']:.0f} s (registration after the stages included)")
    assert stages_wall <= 1.15 * summary["critical_path"]["seconds"]
    keys = planned_keys(load_profile(ROOT / "configs/micro.yaml", overrides(cluster)))
    logs = {name: (hosts.root(name) / "worker.log").read_text() for name in ("gpu", "gpu2")}
    for stage in ("data", "base", "rejection_sampling"):  # inputs made here: downloaded, checked against manifests
        assert f"{stage}: fetched from {STORE}/stages/{stage}/{keys[stage]}" in "".join(logs.values())
    for stage in TRAINED:  # outputs: trained on the worker's machine (not fetched there), then uploaded
        machine = workers[stage].removesuffix("-worker")
        assert (hosts.root(machine) / "root" / ".r1flow" / "stages" / stage / keys[stage] / "result.json").exists()
        assert f"{stage}: fetched from" not in logs[machine]
        assert bucket(cluster).manifest(f"stages/{stage}/{keys[stage]}") is not None


def test_mlflow_artifacts_and_dvc_objects_are_in_the_bucket(cluster, pipeline):
    fs = bucket(cluster).fs
    assert fs.find("r1flow/mlflow"), "no MLflow artifact in the bucket"
    assert fs.find("r1flow/store/dvc/files/md5"), "no DVC object in the bucket"
    hosts = cluster["hosts"]
    status = hosts.run("cpu", [str(BIN / "dvc"), "status", "-c"], cluster["env"]("cpu"), hosts.root("cpu") / "root",
                       timeout=120)
    assert status.returncode == 0 and "in sync" in status.stdout, status.stdout + status.stderr


def test_a_third_host_with_an_empty_folder_reruns_from_cache(cluster, pipeline):
    sets = [arg for o in overrides(cluster, EVALUATED_HERE) for arg in ("--set", o)]
    summary = r1flow(cluster, "third", sets)
    assert all(summary["stages"].values()), summary["stages"]
    assert refs(summary) == refs(pipeline)  # the same versions: nothing registered twice
    check_registry(summary, LEFT_OUT)


def test_grpo_killed_on_one_host_resumes_on_another_from_the_store(cluster, pipeline):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    hosts, store = cluster["hosts"], bucket(cluster)
    hosts.kill("gpu2")  # one machine in the pool: the gpu host takes the run
    shutil.rmtree(hosts.root("gpu2") / "root" / ".r1flow", ignore_errors=True)
    longer = overrides(cluster, "grpo.max_steps=40", "grpo.save_steps=4")
    key = planned_keys(load_profile(ROOT / "configs/micro.yaml", longer))["r1_zero"]
    parameters = {"config": "configs/micro.yaml", "overrides": longer, "force": True}
    with temporary_settings({PREFECT_API_URL: cluster["stack"].prefect_api}):
        run_deployment("r1flow-stage/r1_zero", parameters=parameters, timeout=0)
        for _ in range(600):  # until a checkpoint is complete in the store: at most 5 min
            saved = [c for c in store.folders(f"checkpoints/r1_zero/{key}")
                     if store.manifest(f"checkpoints/r1_zero/{key}/{c}")]
            if saved:
                break
            time.sleep(0.5)
        assert saved, "no checkpoint reached the store"
        hosts.kill("gpu")  # the machine dies mid-GRPO: worker, flow run and stage process
        assert store.manifest(f"stages/r1_zero/{key}") is None
        start_worker(cluster, "gpu2")  # another machine, empty folder
        run = run_deployment("r1flow-stage/r1_zero", parameters=parameters, timeout=600, poll_interval=2)
    assert run.state.is_completed(), run.state
    result = json.loads(store.fs.cat_file(store.path(f"stages/r1_zero/{key}/result.json")))
    assert result["resumed_from_step"] >= 4 and result["steps"] == 40
    checkpoints = f"checkpoints/r1_zero/{key}"
    assert not any(store.manifest(f"{checkpoints}/{c}") for c in store.folders(checkpoints))
    # Registered once: the pipeline on a third host reuses the resumed stage, and a second run adds nothing.
    sets = [arg for o in [*longer, "stages=[eval_r1_zero]"] for arg in ("--set", o)]
    first, second = r1flow(cluster, "third", sets), r1flow(cluster, "third", sets)
    assert first["stages"]["r1_zero"] and refs(second) == refs(first)
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(cluster["stack"].tracking_uri).search_model_versions("name = 'r1flow-r1-zero'")
    assert sorted(v.tags["stage_key"] for v in versions) == sorted({v.tags["stage_key"] for v in versions})
    assert len(versions) == 2


def test_a_training_stage_sent_to_two_machines_is_trained_by_both_and_evaluated(cluster, pipeline):
    """``r1flow run`` sends R1-Zero to two workers of the gpu pool, one flow run each with its rank;
    they meet in the store, train it as one DeepSpeed job, and eval_r1_zero reads the output."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    hosts = cluster["hosts"]
    for name in ("gpu", "gpu2"):  # a fresh worker on each, one flow run at a time: one rank per machine
        hosts.kill(name)
        start_worker(cluster, name, "--limit", "1", env={"GLOO_SOCKET_IFNAME": hosts.interface(name),
                                                          "OMP_NUM_THREADS": "1"})
    two = overrides(cluster, "runtime.gpu_deployment=r1flow-stage/{stage}",
                    "runtime.gpu_components=[grpo]", "runtime.launcher=accelerate",
                    "runtime.accelerate_config=configs/accelerate/zero2.yaml",
                    "runtime.machines=2", "stages=[eval_r1_zero]")
    summary = r1flow(cluster, "cpu", [arg for o in two for arg in ("--set", o)])
    assert summary["stages"]["r1_zero"] is False and "r1_zero" in summary["metrics"]
    key = planned_keys(load_profile(ROOT / "configs/micro.yaml", two))["r1_zero"]
    with temporary_settings({PREFECT_API_URL: cluster["stack"].prefect_api}), get_client(sync_client=True) as client:
        ranked = [r for r in client.read_flow_runs() if "R1FLOW_MACHINE_RANK" in (r.job_variables or {}).get("env", {})]
    runs = {r.job_variables["env"]["R1FLOW_MACHINE_RANK"]: r for r in ranked}
    assert len(ranked) == 2 and set(runs) == {"0", "1"} and all(r.state.is_completed() for r in ranked)
    assert {r.name for r in ranked} == {"r1_zero"}
    assert {r.labels["prefect.worker.name"] for r in ranked} == {"gpu-worker", "gpu2-worker"}
    result = json.loads(bucket(cluster).read_text(f"stages/r1_zero/{key}/result.json"))
    assert result["world_size"] == 2 and result["machines"] == 2
    # run again: the store holds it, so nothing is sent and no machine trains
    again = r1flow(cluster, "cpu", [arg for o in two for arg in ("--set", o)])
    assert again["stages"]["r1_zero"] is True


def test_no_credential_reaches_a_record(cluster, pipeline):
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    secrets_ = list(cluster["keys"].values())
    client = MlflowClient(cluster["stack"].tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    for run in client.search_runs(experiments, max_results=1000):
        recorded = json.dumps({**run.data.params, **run.data.tags})
        assert not any(s in recorded for s in secrets_), run.info.run_name
    with temporary_settings({PREFECT_API_URL: cluster["stack"].prefect_api}), get_client(sync_client=True) as prefect:
        parameters = json.dumps([r.parameters for r in prefect.read_flow_runs()] +
                                [d.parameters for d in prefect.read_deployments()] +
                                [d.pull_steps for d in prefect.read_deployments()])
    assert not any(s in parameters for s in secrets_)
    # Specs, logs, reports, metrics and the Prefect database, on every host and server.
    records = [p for p in cluster["folder"].rglob("*") if p.is_file() and p.name != "s3-identity.json"
               and p.suffix in (".json", ".log", ".jsonl", ".md", ".yaml", ".db")]
    assert {"spec.json", "worker.log", "prefect.db"} <= {p.name for p in records}
    for path in records:
        content = path.read_bytes()
        assert not any(s.encode() in content for s in secrets_), path


@pytest.mark.reliability
def test_two_hosts_running_one_profile_at_once_train_each_stage_once(cluster):
    """Two hosts sharing only the servers run one new profile at once: every stage is trained on
    exactly one of them (the other waits on the Prefect limit keyed by the stage key, then fetches
    it from the store), both exit 0, and no model is registered twice."""
    from mlflow.tracking import MlflowClient

    hosts = cluster["hosts"]
    new = overrides(cluster, "seed=7", "stages=[eval_cold_start]")  # keys no other test trained
    args = [arg for o in new for arg in ("--set", o)]
    runs = {}
    for host in ("cpu", "third"):
        out = hosts.root(host) / "summary-together.json"
        runs[host] = (out, hosts.start(host, [str(BIN / "r1flow"), "run", "--config", "configs/micro.yaml", *args,
                                               "--summary-json", str(out)], cluster["env"](host),
                                       hosts.root(host) / f"r1flow-{host}", hosts.root(host) / "together.log"))
        time.sleep(2)
    for host, (_, process) in runs.items():
        assert process.wait(timeout=900) == 0, (hosts.root(host) / "together.log").read_text()[-3000:]
    summaries = [json.loads(out.read_text()) for out, _ in runs.values()]
    for stage in summaries[0]["stages"]:
        assert sum(not s["stages"][stage] for s in summaries) == 1, f"{stage}: trained on both hosts"
    client = MlflowClient(cluster["stack"].tracking_uri)
    for version in summaries[0]["versions"].values():
        key = client.get_model_version(version["name"], version["version"]).tags["stage_key"]
        assert len(client.search_model_versions(f"name = '{version['name']}' and tags.stage_key = '{key}'")) == 1


def test_servers_listen_on_the_given_address_only_and_stop_on_ctrl_c(cluster):
    import psutil

    stack, servers = cluster["stack"], cluster["servers"]
    tree = [psutil.Process(servers.pid), *psutil.Process(servers.pid).children(recursive=True)]
    listening = [c.laddr for p in tree for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    # SeaweedFS's master, volume, filer and admin ports too: on the given address (SeaweedFS also
    # listens on loopback for its own components); none on every interface
    assert len(listening) >= 6 and stack.host in {a.ip for a in listening}
    assert {a.ip for a in listening} <= {stack.host, "127.0.0.1"}, listening
    servers.send_signal(signal.SIGINT)
    assert servers.wait(timeout=120) == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree[1:])
    for port in (stack.ports.s3, stack.ports.mlflow, stack.ports.prefect):  # nothing answers any more
        with pytest.raises(OSError):
            socket.create_connection((stack.host, port), timeout=2).close()
