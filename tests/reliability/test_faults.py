"""Faults: concurrent runs, a lost tracking server, signals, kills mid-save, a full disk, a
flipped byte. Each is set up for real; nothing finished is lost or retrained, nothing
half-written is ever used."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import finish, stage_processes, wait_until
from mlflow.tracking import MlflowClient

from components.stage_io import keep_checkpoint, latest_checkpoint, resume_from
from components.store import damage
from flows.servers import free_port

PROJECT = Path(__file__).resolve().parents[2]
MICRO = str(PROJECT / "configs" / "micro.yaml")
CLI = [sys.executable, "-m", "flows.cli", "run", "--config", MICRO, "--set", "runtime.device=cpu"]

pytestmark = pytest.mark.slow


def r1flow(root: Path, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """``r1flow run`` of the micro profile in ``root``, in its own process group."""
    return subprocess.Popen([*CLI, *args], cwd=root, env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **popen)


def mlflow(root: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{root / '.r1flow' / 'mlflow.db'}")
    return client, client.get_experiment_by_name("r1flow").experiment_id


def versions(root: Path) -> dict[str, list[str]]:
    client, _ = mlflow(root)
    return {m.name: sorted(str(v.version) for v in client.search_model_versions(f"name = '{m.name}'"))
            for m in client.search_registered_models()}


@pytest.fixture(scope="module")
def concurrent(tmp_path_factory):
    """Two runs of the micro profile on one fresh workspace, the second started 2 s after the first
    (a nightly schedule firing during a manual run): their summaries and the root."""
    root = tmp_path_factory.mktemp("concurrent")
    runs = []
    for i in range(2):
        runs.append(r1flow(root, "--summary-json", str(root / f"summary-{i}.json")))
        time.sleep(2)
    outputs = [finish(run) for run in runs]
    for run, out in zip(runs, outputs):
        assert run.returncode == 0, out[-4000:]
    return root, [json.loads((root / f"summary-{i}.json").read_text()) for i in range(2)], outputs


def test_two_runs_at_once_train_each_stage_once_and_register_once(concurrent):
    """Two runs of one profile started 2 s apart on a fresh workspace both exit 0; every stage was
    trained by exactly one of them (the other waited on the Prefect concurrency limit keyed by the
    stage key, then reused it), and every model has exactly one registered version."""
    root, summaries, outputs = concurrent
    for name in summaries[0]["stages"]:
        ran = [not s["stages"][name] for s in summaries]
        assert sum(ran) == 1, f"{name}: trained by {sum(ran)} runs"
    assert any("another run is making" in out for out in outputs)  # one did wait
    assert versions(root) and all(v == ["1"] for v in versions(root).values())


def test_file_lock_makes_a_second_holder_wait_without_a_prefect_server(tmp_path):
    """Without a Prefect server the stage lock is a file lock: a second process waits while the
    first holds it, and gets it as soon as the holder is killed."""
    holder = ("import sys, time; from pathlib import Path; from flows.locks import exclusive\n"
              "with exclusive('stage-x-1', Path(sys.argv[1]), 'waiting'):\n"
              "    print('held', flush=True); time.sleep(60)\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    first = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], cwd=PROJECT, env=env,
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "held"
    second = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], cwd=PROJECT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert second.stdout.readline().strip() == "waiting"
        first.kill()  # the kernel releases a dead holder's lock
        assert second.stdout.readline().strip() == "held"
    finally:
        for process in (first, second):
            process.kill()
            process.wait()


def test_unreachable_mlflow_fails_in_seconds_naming_the_uri_before_any_training(tmp_path):
    """With tracking.tracking_uri pointing where nothing listens, `r1flow run` ends within 10 s with
    one line naming the URI, no traceback, and no stage started."""
    uri = f"http://127.0.0.1:{free_port()}"  # closed again: nothing listens there
    started = time.time()
    out = finish(r1flow(tmp_path, "--set", f"tracking.tracking_uri={uri}"), timeout=120)
    seconds = time.time() - started
    assert seconds < 10, f"took {seconds:.1f} s"
    errors = [line for line in out.splitlines() if uri in line]
    assert errors and "unreachable" in errors[-1] and "Traceback" not in out
    assert not (tmp_path / ".r1flow" / "stages").exists()


def test_sigterm_stops_both_branches_fails_their_mlflow_runs_keeps_the_checkpoints_and_the_next_run_resumes(tmp_path):
    """SIGTERM to `r1flow run` (what a Prefect cancellation sends) while R1-Zero and R1's RL train at
    once: both stage processes are gone, their MLflow runs and the pipeline run are FAILED, their
    checkpoints stay, and the same command then resumes both from them and finishes."""
    args = ["--set", "grpo.max_steps=60", "--set", "grpo.save_steps=3", "--set", "stages=[r1_zero,r1_rl]",
            "--set", "runtime.max_parallel=2"]
    stages, both = tmp_path / ".r1flow" / "stages", ("r1_zero", "r1_rl")
    first = r1flow(tmp_path, *args)
    wait_until(lambda: all(list(stages.glob(f"{name}/.checkpoints-*/checkpoint-*")) for name in both), 600,
               "a GRPO checkpoint of both stages", first)
    os.kill(first.pid, signal.SIGTERM)
    finish(first, timeout=60)
    checkpoints = {name: latest_checkpoint(next(stages.glob(f"{name}/.checkpoints-*"))) for name in both}
    assert all(checkpoints.values()), checkpoints
    for name in both:
        assert not list(stages.glob(f"{name}/.tmp-*")) and not list(stages.glob(f"{name}/[!.]*"))
    assert stage_processes(tmp_path) == []
    client, experiment = mlflow(tmp_path)
    for name in both:
        assert [r.info.status for r in client.search_runs([experiment], f"attributes.run_name = '{name}'")] == \
            ["FAILED"]
    parents = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FAILED"]

    again = r1flow(tmp_path, *args)
    out = finish(again)
    assert again.returncode == 0, out[-3000:]
    for name in both:
        finished = client.search_runs([experiment], f"attributes.run_name = '{name}' and "
                                                    "attributes.status = 'FINISHED'")
        assert finished[0].data.metrics["resumed_from_step"] >= int(checkpoints[name].name.split("-")[1])


def running_stage(root: Path, name: str) -> int | None:
    """The process of stage ``name`` in this workspace, by the log it writes to, if one runs."""
    for pid in stage_processes(root):
        with contextlib.suppress(OSError):
            if f"/stages/{name}/.tmp-" in os.readlink(f"/proc/{pid}/fd/1"):
                return pid
    return None


def test_a_stage_killed_on_one_branch_fails_the_run_naming_it_while_the_other_branch_finishes(tmp_path):
    """R1-Zero's process killed from outside (the OOM killer's SIGKILL) while the student's base
    pretrains beside it: the student's branch runs to its end, R1-Zero's evaluation does not run,
    the run exits 1 naming r1_zero, and the same command then trains R1-Zero and evaluates it,
    reusing the rest."""
    args = ["--set", "grpo.max_steps=12", "--set", "student.pretrain_steps=400", "--set", "runtime.max_parallel=2",
            "--set", "stages=[eval_r1_zero,student_base]", "--summary-json", str(tmp_path / "summary.json")]
    first = r1flow(tmp_path, *args)
    wait_until(lambda: running_stage(tmp_path, "r1_zero"), 600, "R1-Zero's process", first)
    os.kill(running_stage(tmp_path, "r1_zero"), signal.SIGKILL)
    out = finish(first, timeout=600)
    assert first.returncode == 1 and "pipeline failed: stage 'r1_zero' failed (exit -9)" in out, out[-3000:]
    assert "not run, as they read a failed stage: eval_r1_zero" in out
    client, experiment = mlflow(tmp_path)
    runs = {r.info.run_name: r.info for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags}
    assert runs["r1_zero"].status == "FAILED" and runs["student_base"].status == "FINISHED"
    assert runs["student_base"].end_time > runs["r1_zero"].end_time  # it went on after the failure
    assert stage_processes(tmp_path) == []

    again = r1flow(tmp_path, *args)
    out = finish(again)
    assert again.returncode == 0, out[-3000:]
    ran = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert {name for name, cached in ran.items() if not cached} == {"r1_zero", "eval_r1_zero"}, ran


SAVER = """
import sys, time, torch
from pathlib import Path
from safetensors.torch import save_file
from components.stage_io import keep_checkpoint
written, folder = Path(sys.argv[1]), Path(sys.argv[2])
written.mkdir(parents=True)
for part in range(40):  # a large checkpoint, written shard by shard
    save_file({"w": torch.zeros(1 << 20)}, written / f"shard-{part}.safetensors")
    print(part, flush=True)
    time.sleep(0.05)
keep_checkpoint(written, folder, written / "metrics.jsonl")
"""


def test_sigkill_during_a_checkpoint_save_never_loads_the_partial_one(tmp_path):
    """SIGKILL while a checkpoint's files are being written: the partial checkpoint is never found,
    and a resume continues from the complete one before it."""
    folder, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "model.safetensors").write_bytes(b"complete")
    metrics.write_text('{"step": 4}\n')
    keep_checkpoint(tmp_path / "checkpoint-4", folder, metrics)
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path / "trainer" / "checkpoint-8"), str(folder)],
                             cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    for _ in range(5):  # some shards written, most not
        saver.stdout.readline()
    saver.kill()
    saver.wait()
    assert len(list((tmp_path / "trainer" / "checkpoint-8").iterdir())) >= 5  # the partial save is there...
    assert latest_checkpoint(folder) == folder / "checkpoint-4"  # ...and never found
    assert resume_from(folder, metrics) == folder / "checkpoint-4"
    assert metrics.read_text() == '{"step": 4}\n'


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs as the workspace's disk (root only)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=False,
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_stage_in_one_line_naming_the_folder_and_keeps_earlier_outputs(small_disk, tmp_path):
    """A disk that fills during a stage: one line naming the folder, no partial stage folder, the
    earlier stage folders intact (their manifests verify), and the next run with space completes."""
    tracking = ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # off the small disk
    first = r1flow(small_disk, *tracking, "--set", "stages=[base]")
    out = finish(first)
    assert first.returncode == 0, out[-3000:]
    stages = small_disk / ".r1flow" / "stages"
    earlier = sorted(p for p in stages.glob("*/*") if not p.name.startswith("."))
    filler = small_disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 16))
    filler.write_bytes(filler.read_bytes()[: -(200 << 10)])  # ~200 KB left: less than a checkpoint

    full = r1flow(small_disk, *tracking, "--set", "stages=[cold_start]")
    out = finish(full)
    assert full.returncode != 0
    errors = [line for line in out.splitlines() if "pipeline failed" in line]
    assert errors and "no space left" in errors[-1] and str(small_disk) in errors[-1], out[-3000:]
    assert "Traceback" not in out
    # No partial stage folder: no output and no scratch left, at most the checkpoints kept so far, each whole
    # (the Trainer writes trainer_state.json last; a checkpoint the full disk cut short is never kept).
    left = list(stages.glob("cold_start/*"))
    assert all(p.name.startswith(".checkpoints-") for p in left), left
    kept = [c for p in left for c in p.iterdir()]
    assert all(c.name.removeprefix("checkpoint-").isdigit() and (c / "trainer_state.json").exists() for c in kept), kept
    assert sorted(p for p in stages.glob("*/*") if not p.name.startswith(".")) == earlier
    assert all(damage(folder) is None for folder in earlier)

    filler.unlink()
    again = r1flow(small_disk, *tracking, "--set", "stages=[cold_start]")
    out = finish(again)
    assert again.returncode == 0, out[-3000:]


def test_a_flipped_byte_in_a_cached_model_is_detected_and_the_stage_reruns(concurrent):
    """One flipped byte in a cached stage's model.safetensors: the next run names the file, discards
    the folder and trains that stage again (never uses it silently); nothing else reruns."""
    root, _, _ = concurrent
    model = next((root / ".r1flow" / "stages" / "cold_start").glob("[!.]*/model/model.safetensors"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    run = r1flow(root, "--summary-json", str(root / "summary-flipped.json"))
    out = finish(run)
    assert run.returncode == 0, out[-3000:]
    assert f"{model}: differs from its manifest" in out
    ran = {name for name, cached in json.loads((root / "summary-flipped.json").read_text())["stages"].items()
           if not cached}
    assert ran == {"cold_start"}  # same key, same result: everything downstream stays valid
    assert damage(model.parents[1]) is None


KILLED_AT_ALIAS = """
import os, signal, sys
from mlflow.tracking import MlflowClient
# The fault: SIGKILL at the first alias move, right after the first version is created.
MlflowClient.set_registered_model_alias = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
from flows.cli import app
sys.argv = ["r1flow", *sys.argv[1:]]
app()
"""


def test_a_kill_between_registering_and_aliasing_is_completed_by_the_rerun_without_duplicates(concurrent):
    """SIGKILL right after a version is created, before its alias: the rerun finds that version by
    stage key, gives it its alias, registers the rest, and no model has a duplicate version."""
    root, _, _ = concurrent
    # Same stages (cached), a registry of its own; two registered models are enough.
    prefix = ["--set", "tracking.registry_prefix=killed", "--set", "stages=[eval_cold_start, eval_r1_zero]"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_ALIAS, *CLI[3:], *prefix], cwd=root,
                            capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    client, _ = mlflow(root)
    half = {n: v for n, v in versions(root).items() if n.startswith("killed-")}
    assert list(half.values()) == [["1"]] and not client.get_model_version(next(iter(half)), "1").aliases

    out = finish(r1flow(root, *prefix, "--summary-json", str(root / "summary-killed.json")))
    registered = {n: v for n, v in versions(root).items() if n.startswith("killed-")}
    summary = json.loads((root / "summary-killed.json").read_text())
    assert set(registered) == {v["name"] for v in summary["versions"].values()}, out[-3000:]
    assert len(registered) >= 2 and all(v == ["1"] for v in registered.values())
    assert client.get_model_version(next(iter(half)), "1").aliases  # the interrupted one got its alias


def test_a_truncated_object_in_the_dvc_remote_is_reported_by_rerun_naming_the_file(concurrent, tmp_path):
    """A fresh clone reruns a recorded run whose DVC remote holds a truncated object: `r1flow rerun`
    fails in one line naming the file (DVC verifies what it downloads), and trains nothing."""
    root, summaries, _ = concurrent
    remote = tmp_path / "remote"
    shutil.copytree(root / ".r1flow" / "dvc-remote", remote)
    victim = max((p for p in remote.rglob("*") if p.is_file() and not p.name.endswith(".dir")),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    clone = tmp_path / "clone"
    (clone / ".r1flow").mkdir(parents=True)
    os.symlink(remote, clone / ".r1flow" / "dvc-remote")  # the clone's remote: the damaged copy
    rerun = subprocess.run([sys.executable, "-m", "flows.cli", "rerun", summaries[0]["run_id"], "--config", MICRO,
                            "--tracking-uri", summaries[0]["tracking_uri"]], cwd=clone, capture_output=True,
                           text=True, timeout=600, check=False)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode != 0
    errors = [line for line in out.splitlines() if "rerun failed" in line]
    assert errors and victim.name in errors[-1] and "Traceback" not in out, out[-3000:]
    assert not (clone / ".r1flow" / "stages").exists()


KILLED_IN_PUSH = """
import os, signal, sys
from dvc_objects.fs.local import LocalFileSystem
put = LocalFileSystem.put_file
def put_one_then_die(self, *args, **kwargs):  # the fault: SIGKILL after the push's first object
    if getattr(LocalFileSystem, "pushed_one", False):
        os.kill(os.getpid(), signal.SIGKILL)
    LocalFileSystem.pushed_one = True
    return put(self, *args, **kwargs)
LocalFileSystem.put_file = put_one_then_die
from flows.cli import app
sys.argv = ["r1flow", *sys.argv[1:]]
app()
"""


def test_a_kill_during_the_dvc_push_is_completed_by_the_next_run(concurrent):
    """SIGKILL during `dvc push` (one object of the data version in the remote, the rest not): the
    next run pushes the rest, and `dvc status -c` is clean."""
    from components.versioning import remote_status

    root, _, _ = concurrent
    remote = root / ".r1flow" / "dvc-remote"
    shutil.rmtree(remote)  # a new, empty remote: this run's push has every object to send
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_PUSH, *CLI[3:]], cwd=root, capture_output=True,
                            text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert len([p for p in remote.rglob("*") if p.is_file()]) == 1
    assert remote_status(root)  # not in sync

    again = r1flow(root)
    out = finish(again)
    assert again.returncode == 0, out[-3000:]
    assert remote_status(root) == {}
