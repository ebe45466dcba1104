"""A training stage under ``accelerate launch``: which components it starts that way, how many
processes it starts on this machine (one per GPU the stage environment sees, unless the profile
says), and this machine's place when the stage spans several (``runtime.machines``): its rank and
rank 0's address, from the environment or the Prefect job variables' ``env``. Every machine runs
the same stage with the same profile, so all of them compute the same stage key.

Where no machine knows rank 0's address in advance (the pipeline sent the stage to N workers of a
pool, ``flows.remote``), they meet in the stage store: rank 0 writes the address it reaches the
store from under ``rendezvous/<id>``, and the others read it there.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from urllib.parse import urlsplit

from components.config import Profile

DISTRIBUTED = ("sft", "grpo")  # the components `accelerate launch` starts; the rest run as one process


RENDEZVOUS_SECONDS = 1800  # how long the others wait for rank 0's machine to start and say where it is


@dataclass(frozen=True)
class Machines:
    count: int
    rank: int
    main_ip: str | None  # None: found through the store (``rendezvous``)
    main_port: int
    rendezvous: str | None = None

    @property
    def follower(self) -> bool:
        """Not rank 0: it trains, but writes no stage output and no MLflow record."""
        return self.rank > 0


def accelerated(module: str, profile: Profile) -> bool:
    """Whether this component runs under ``accelerate launch`` for this profile."""
    return profile.runtime.launcher == "accelerate" and module in DISTRIBUTED


def machines(module: str, profile: Profile) -> Machines | None:
    """This machine's place in a launch of ``module`` across machines; None where it runs on one."""
    if "R1FLOW_NUM_MACHINES" in os.environ:  # an environment set up for an older r1flow
        raise ValueError("R1FLOW_NUM_MACHINES is not read: the machine count is the profile's runtime.machines "
                         "(the environment gives only R1FLOW_MACHINE_RANK and R1FLOW_MAIN_PROCESS_IP/_PORT)")
    count = profile.runtime.machines
    if count < 2 or not accelerated(module, profile):
        return None
    main_ip, rendezvous = os.environ.get("R1FLOW_MAIN_PROCESS_IP"), os.environ.get("R1FLOW_RENDEZVOUS")
    try:
        rank = int(os.environ["R1FLOW_MACHINE_RANK"])
        if main_ip is None and rendezvous is None:
            raise KeyError("R1FLOW_MAIN_PROCESS_IP")
    except KeyError as missing:
        raise ValueError(f"runtime.machines is {count}: each machine needs {missing.args[0]} in its environment "
                         "(its rank, and rank 0's address)") from None
    if not 0 <= rank < count:
        raise ValueError(f"R1FLOW_MACHINE_RANK {rank} is not a rank of runtime.machines {count} (0..{count - 1})")
    return Machines(count, rank, main_ip, int(os.environ.get("R1FLOW_MAIN_PROCESS_PORT", "29500")), rendezvous)


def main_address(group: Machines, profile: Profile) -> str:
    """Rank 0's address: given, or met in the store (rank 0 writes its own, the others wait for it)."""
    if group.main_ip is not None:
        return group.main_ip
    if profile.store is None:
        raise ValueError("a stage across machines that find each other (R1FLOW_RENDEZVOUS) needs a store; set store, "
                         "or give every machine R1FLOW_MAIN_PROCESS_IP")
    from components.store import Store, endpoint

    board, note = Store.at(profile.store), f"rendezvous/{group.rendezvous}"
    if group.rank == 0:
        address = own_address(endpoint())
        board.write_text(note, address)
        return address
    for _ in range(RENDEZVOUS_SECONDS):  # bounded: rank 0's machine may still be starting
        if (address := board.read_text(note)) is not None:
            return address
        time.sleep(1)
    raise TimeoutError(f"rank 0 of rendezvous {group.rendezvous} wrote no address to {board.path(note)} "
                       f"in {RENDEZVOUS_SECONDS} s")


def own_address(towards: str | None) -> str:
    """The address this machine reaches ``towards`` (the store's endpoint) from: one the others,
    which reach the same store, can reach it at. No packet is sent (a UDP socket only routes)."""
    parts = urlsplit(towards or "https://s3.amazonaws.com")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((parts.hostname, parts.port or 443))
        return probe.getsockname()[0]


def on_cpu(profile: Profile) -> bool:
    """Whether stages run on the CPU: ``runtime.device`` cpu, or auto where the stage environment
    sees no GPU."""
    device = profile.runtime.device
    return device == "cpu" or (device == "auto" and not visible_gpus(stage_python(profile)))


def processes_per_machine(profile: Profile) -> int:
    """The training processes ``accelerate launch`` starts on this machine."""
    if profile.runtime.processes_per_machine is not None:
        return profile.runtime.processes_per_machine
    if on_cpu(profile):
        return 1
    if not (gpus := visible_gpus(stage_python(profile))):
        raise ValueError(f"runtime.device is cuda and {stage_python(profile)} sees no GPU; set runtime.device: cpu, "
                         "or runtime.processes_per_machine")
    return gpus


def stage_python(profile: Profile) -> str:
    return profile.runtime.stage_python or sys.executable


@cache
def visible_gpus(python: str) -> int:
    """GPUs that ``python``'s torch sees. Asked of the stage environment itself: the orchestrator's
    own torch may be a CPU build on a GPU machine."""
    if python == sys.executable:
        import torch

        return torch.cuda.device_count()
    asked = subprocess.run([python, "-c", "import torch; print(torch.cuda.device_count())"], check=False,
                           capture_output=True, text=True, timeout=300)
    if asked.returncode != 0:
        raise ValueError(f"runtime.stage_python {python} cannot import torch: {asked.stderr.strip()[-300:]}")
    return int(asked.stdout.split()[-1])
