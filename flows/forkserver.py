"""Stage processes forked from a warm interpreter: the imports every stage pays once, not per stage.

A launched stage spends most of its fixed cost importing torch, transformers and TRL (6-12 s each
on 2 cores, against 1-5 s of work for a small stage). The fork server imports the components once,
then forks one child per stage. The child runs as ``python -m components.<stage> --spec SPEC``
would (its own ``__main__``, argv, environment, working folder and log file), so a stage cannot
tell the difference. ``flows.launch`` uses it for CPU stages in the orchestrator's own
environment; a GPU worker or a separate stage environment starts plain processes.

    python -m flows.forkserver --preload components.base,components.sft    # started by ForkServer

Protocol, one JSON object per line: requests on stdin ``{module, spec, log, cwd, env}``; replies
on stdout ``{"ready": true}`` once, then ``{"pid": N}`` and ``{"pid": N, "exit": CODE}`` per stage.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path


# --- the server (its own process) -----------------------------------------------------------
def serve(preload: list[str]) -> None:
    from components.stage_io import die_with_parent

    die_with_parent()  # a killed pipeline takes its fork server, and the server its stages, along
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pipeline's to handle: it stops the stage
    for name in preload:
        importlib.import_module(name)
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            reply.close()  # the stage must not hold the server's reply pipe open
            _run_child(request)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}) + "\n")


def _run_child(request: dict) -> None:
    """Become ``python -m MODULE --spec SPEC``, writing to the stage's log; never returns."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], "--spec", request["spec"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (a stage's error, Ctrl-C included: its traceback goes to its log)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --- the client (the pipeline's process) ----------------------------------------------------
class ForkedStage:
    """A stage process forked by the server, with the part of ``subprocess.Popen`` the runner uses.

    A thread waits for the server's exit line: a select on the pipe could miss a line that an
    earlier read already took into Python's buffer (a stage that fails at once)."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None
        self.waiter = threading.Thread(target=self._wait_for_exit, daemon=True)
        self.waiter.start()

    def _wait_for_exit(self) -> None:
        self.returncode = self.server.read().get("exit", -signal.SIGKILL)
        self.server.busy.release()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        self.waiter.join()
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ForkServer:
    """A warm server for one Python, environment and components source; one stage at a time
    (``flows.launch`` starts one per stage running at once)."""

    def __init__(self, python: str, env: dict, preload: list[str]):
        self.process = subprocess.Popen([python, "-m", "flows.forkserver", "--preload", ",".join(preload)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                        cwd=Path(__file__).resolve().parents[1])
        self.busy = threading.Lock()
        if self.read() != {"ready": True}:
            raise RuntimeError("the stage fork server did not start")

    def alive(self) -> bool:
        return self.process.poll() is None

    def launch(self, module: str, spec: Path, log: Path, env: dict) -> ForkedStage:
        request = {"module": module, "spec": str(spec), "log": str(log), "cwd": os.getcwd(), "env": env}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = self.read()
        if "pid" not in reply:
            raise RuntimeError("the stage fork server exited before it started the stage")
        return ForkedStage(self, reply["pid"])

    def read(self) -> dict:
        """The server's next reply; ``{}`` once it died (killed, or its parent exited): its stage with it."""
        line = self.process.stdout.readline()
        return json.loads(line) if line else {}

    def close(self) -> None:
        """No more stages: the server exits once a stage still running on it ends."""
        self.process.stdin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Fork r1flow stage processes from a warm interpreter.")
    parser.add_argument("--preload", required=True, help="comma-separated modules to import once")
    serve(parser.parse_args().preload.split(","))
