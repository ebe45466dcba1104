"""Separate hosts on one machine for tests: Linux network namespaces joined by veth pairs to a
bridge in the test's own subnet, each host with its own folder. The servers bind to the bridge's
address; from a namespace, 127.0.0.1 is that host's own loopback, so nothing else is reachable.

Where namespaces are refused (no root, no iproute2), each host is a folder and every address is
127.0.0.1; ``Hosts.isolated`` says which, and the test prints it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


class Hosts:
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
