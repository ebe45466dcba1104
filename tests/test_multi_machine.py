"""One training stage across two machines: two network namespaces made here, each running two
processes of an `accelerate launch` with DeepSpeed ZeRO-2 over gloo (CPU). Inputs come from the
stage store (SeaweedFS on the test's bridge); rank 0's machine writes the output and the MLflow
records. The profile says how many machines and processes; each machine's environment gives only its
rank and rank 0's address."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from helpers import Hosts
from transformers import AutoModelForCausalLM

from components.config import load_profile
from components.store import Store
from flows.keys import planned_keys
from flows.servers import Ports, Stack, free_port, prefect_server, seaweedfs, stop, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    folder = tmp_path_factory.mktemp("machines")
    hosts = Hosts(folder, ["m0", "m1"])
    print("machines: network namespaces" if hosts.isolated else
          f"machines: namespaces refused ({hosts.reason!s:.200}); folders on 127.0.0.1")
    keys = {"AWS_ACCESS_KEY_ID": "mm", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    stack = Stack(hosts.address, Ports(free_port(hosts.address), 0, free_port(hosts.address)), keys)
    servers = []
    try:
        servers.append(seaweedfs(folder / "seaweedfs", stack.host, stack.ports.s3, keys))
        servers.append(prefect_server(folder, stack))
        wait_for(f"{stack.prefect_api}/health", servers[1], 180)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        port = 29400 + os.getpid() % 500

        def env(name: str) -> dict:
            place = {"R1FLOW_MACHINE_RANK": str(hosts.names.index(name)), "R1FLOW_MAIN_PROCESS_IP":
                     hosts.host_address("m0"), "R1FLOW_MAIN_PROCESS_PORT": str(port),
                     "GLOO_SOCKET_IFNAME": hosts.interface(name)}
            return {**base, **stack.environment(), **place, "R1FLOW_ROOT": str(hosts.root(name)),
                    "OMP_NUM_THREADS": "1"}

        overrides = ["store=s3://r1flow/machines", "runtime.device=cpu", "runtime.launcher=accelerate",
                     f"runtime.accelerate_config={ROOT / 'configs/accelerate/zero2.yaml'}", "runtime.machines=2",
                     "runtime.processes_per_machine=2", "cold_start.max_steps=6"]
        for name in hosts.names:
            hosts.root(name).mkdir()
        yield {"hosts": hosts, "env": env, "overrides": overrides,
               "store_env": {**keys, "AWS_ENDPOINT_URL_S3": stack.endpoint}}
    finally:
        hosts.remove()
        stop(servers)


def r1flow(machines: dict, host: str, name: str, *args: str):
    """`r1flow run` of the micro profile on a machine, logging to ``<name>.log``."""
    sets = [a for o in machines["overrides"] for a in ("--set", o)]
    command = [str(BIN / "r1flow"), "run", "--config", "configs/micro.yaml", *sets, *args]
    hosts = machines["hosts"]
    log = hosts.root(host) / f"{name}.log"
    return hosts.start(host, command, machines["env"](host), ROOT, log), log


def r1flow_only(machines: dict, host: str, stage: str, *more: str):
    return r1flow(machines, host, stage, *[a for o in more for a in ("--set", o)], "--only", stage)


@pytest.fixture(scope="module")
def inputs(machines):
    """The training stages' inputs, made once on machine 0 (one run) and uploaded to the store."""
    process, log = r1flow(machines, "m0", "inputs", "--set", "stages=[data,base]")
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("stage", ["cold_start", "r1_zero"])  # SFT, then GRPO
def test_a_training_stage_spans_two_machines(machines, inputs, stage):
    hosts = machines["hosts"]
    started = [r1flow_only(machines, name, stage) for name in hosts.names]
    for process, log in started:
        assert process.wait(timeout=900) == 0, log.read_text()[-4000:]
    folders = list((hosts.root("m0") / ".r1flow" / "stages" / stage).glob("[0-9a-f]*"))
    # one key on this side (no place in the environment, as an orchestrator sending the stage) and on both machines
    key = planned_keys(load_profile(ROOT / "configs/micro.yaml", machines["overrides"]))[stage]
    assert [f.name for f in folders] == [key]
    assert f"recorded by machine rank 0 (stage key {key})" in started[1][1].read_text()
    result = json.loads((folders[0] / "result.json").read_text())
    assert result["world_size"] == 4 and result["machines"] == 2 and result["deepspeed_zero_stage"] == 2
    assert AutoModelForCausalLM.from_pretrained(folders[0] / "model").num_parameters() > 0
    # rank 0's machine recorded the stage in MLflow, with the world size and the machine count
    with sqlite3.connect(hosts.root("m0") / ".r1flow" / "mlflow.db") as db:
        recorded = dict(db.execute("SELECT m.key, m.value FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
                                   "WHERE r.name = ? AND m.key IN ('world_size', 'machines')", (stage,)).fetchall())
    assert recorded == {"world_size": 4.0, "machines": 2.0}
    # the other machine fetched the inputs and trained its share, and recorded nothing
    assert (hosts.root("m1") / ".r1flow" / "stages" / "base").exists()
    assert not list((hosts.root("m1") / ".r1flow" / "stages" / stage).iterdir())  # no output, no scratch left
    assert not (hosts.root("m1") / ".r1flow" / "mlflow.db").exists()
    assert "recorded by machine rank 0" in (hosts.root("m1") / f"{stage}.log").read_text()


def test_a_stage_across_machines_resumes_from_its_checkpoint_on_two_fresh_machines(machines, inputs):
    """Each machine puts its ranks' part of a checkpoint into the store, and rank 0 marks it complete;
    both machines die, two with empty folders take over, and each fetches its own part."""
    hosts, store = machines["hosts"], Store.at("s3://r1flow/machines")
    longer = ("grpo.max_steps=4", "grpo.save_steps=2", "grpo.heldout_every=0")
    key = planned_keys(load_profile(ROOT / "configs/micro.yaml", [*machines["overrides"], *longer]))["r1_zero"]
    checkpoint = f"checkpoints/r1_zero/{key}/checkpoint-2"
    with pytest.MonkeyPatch.context() as env:
        for name, value in machines["store_env"].items():
            env.setenv(name, value)
        started = [r1flow_only(machines, name, "r1_zero", *longer) for name in hosts.names]
        for _ in range(1200):  # until the first checkpoint is complete in the store: at most 10 min
            if store.manifest(checkpoint) is not None or any(p.poll() is not None for p, _ in started):
                break
            time.sleep(0.5)
        manifest = store.manifest(checkpoint)
        assert manifest is not None, started[0][1].read_text()[-3000:]
        assert {name.split("/")[0] for name in manifest["files"]} == {"machine-0", "machine-1"}
        for name in hosts.names:  # both machines die; two fresh ones (empty folders) take the stage up
            hosts.kill(name)
            shutil.rmtree(hosts.root(name) / ".r1flow")
        resumed = [r1flow_only(machines, name, "r1_zero", *longer) for name in hosts.names]
        for process, log in resumed:
            assert process.wait(timeout=900) == 0, log.read_text()[-4000:]
        result = json.loads(store.read_text(f"stages/r1_zero/{key}/result.json"))
        assert result["resumed_from_step"] >= 2 and result["steps"] == 4 and result["world_size"] == 4
        checkpoints = f"checkpoints/r1_zero/{key}"  # dropped once the stage is in the store
        assert not any(store.manifest(f"{checkpoints}/{c}") for c in store.folders(checkpoints))
