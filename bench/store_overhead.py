"""What the S3 stage store costs: the micro pipeline with the workspace alone, then with an S3
store (SeaweedFS, started here on 127.0.0.1), alternating, in one run on this machine.

    .venv/bin/python bench/store_overhead.py [--repeats 1] [--config configs/micro.yaml]

Each run starts from an empty root, so every stage trains and, with the store, every completed
stage folder and checkpoint is uploaded. Prints each run's wall time and the ratio S3 / local.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.servers import BUCKET, free_port, seaweedfs, stop

BIN = Path(sys.executable).parent


def pipeline_seconds(config: str, root: Path, env: dict, store: str | None) -> float:
    command = [str(BIN / "r1flow"), "run", "--config", config, "--set", "runtime.device=cpu"]
    if store:
        command += ["--set", f"store={store}"]
    started = time.time()
    subprocess.run(command, env={**env, "R1FLOW_ROOT": str(root)}, check=True, capture_output=True)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/micro.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    with tempfile.TemporaryDirectory() as scratch:
        port = free_port()
        server = seaweedfs(Path(scratch) / "seaweedfs", "127.0.0.1", port, keys)
        env = {**os.environ, **keys, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
        try:
            times: dict[str, list[float]] = {"local": [], "s3": []}
            for repeat in range(args.repeats):
                for kind in ("local", "s3"):
                    store = f"s3://{BUCKET}/bench-{repeat}" if kind == "s3" else None
                    seconds = pipeline_seconds(args.config, Path(scratch) / f"{kind}-{repeat}", env, store)
                    times[kind].append(seconds)
                    print(f"{kind:>5} run {repeat + 1}: {seconds:6.1f} s", flush=True)
        finally:
            stop([server])
    local, s3 = sum(times["local"]), sum(times["s3"])
    print(f"S3 store / local workspace: {s3 / local:.3f} ({args.config}, {args.repeats} run(s) each)")


if __name__ == "__main__":
    main()
