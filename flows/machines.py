"""A training stage that spans machines: which components ``accelerate`` launches, and this
machine's place in such a launch (its rank and rank 0's address), from the environment or the
Prefect job variables' ``env``. Every machine runs the same stage with the same spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from components.config import Profile

DISTRIBUTED = ("sft", "grpo")  # the components `accelerate launch` starts; the rest run as one process


@dataclass(frozen=True)
class Machines:
    count: int
    rank: int
    main_ip: str
    main_port: int

    @property
    def follower(self) -> bool:
        """Not rank 0: it trains, but writes no stage output and no MLflow record."""
        return self.rank > 0


def accelerated(module: str, profile: Profile) -> bool:
    """Whether this component runs under ``accelerate launch`` for this profile."""
    return profile.runtime.launcher == "accelerate" and module in DISTRIBUTED


def machines() -> Machines | None:
    """This machine's place in a launch across machines; None on one machine."""
    count = int(os.environ.get("R1FLOW_NUM_MACHINES", "1"))
    if count < 2:
        return None
    try:
        return Machines(count, int(os.environ["R1FLOW_MACHINE_RANK"]), os.environ["R1FLOW_MAIN_PROCESS_IP"],
                        int(os.environ.get("R1FLOW_MAIN_PROCESS_PORT", "29500")))
    except KeyError as missing:
        raise ValueError(f"R1FLOW_NUM_MACHINES={count} needs {missing.args[0]} in the environment") from None
