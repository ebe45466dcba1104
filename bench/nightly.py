"""Three nights of `configs/nightly.yaml` at the default profile's scale, timed: night 1 from the
fallback (the default tiny base, pretrained in the run), night 2 after a new object lands,
night 3 with nothing new. Prints each night's wall time, what reran, the registry's history, and
night 3's time as a share of night 1's.

    .venv/bin/python bench/nightly.py [--seed 0] [--folder /tmp/r1flow-nightly]

A local SeaweedFS holds the data (as on a cluster); MLflow is the workspace's SQLite store. The
test of the same nights on every server (tests/test_nightly.py) runs at micro scale, where a
night's training is seconds and its fixed cost (registry, listing, DVC, report) dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/r1flow-nightly"))
    args = parser.parse_args()
    root = args.folder.resolve()
    root.mkdir(parents=True, exist_ok=True)
    from flows.environment import configure

    configure(root / ".r1flow")
    from components.config import load_profile
    from components.data import synthetic_addition
    from components.promotion import history
    from components.store import Store
    from components.tracking import Tracker
    from flows.servers import BUCKET, free_port, seaweedfs, stop
    from flows.workspace import locate

    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16)}
    port = free_port()
    server = seaweedfs(root / "seaweedfs", "127.0.0.1", port, keys)
    os.environ.update({**keys, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
    fs = Store.at(f"s3://{BUCKET}").fs
    for _ in range(60):  # the bucket is made just after S3 answers
        if fs.exists(BUCKET):
            break
        time.sleep(0.5)

    def land(name: str, records: list[dict]) -> None:
        body = "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records)
        fs.pipe_file(f"{BUCKET}/nightly/{name}", body.encode())

    default = load_profile(PROJECT / "configs" / "default.yaml")
    train, validation, test = synthetic_addition(default.data, seed=0)
    overrides = [f"seed={args.seed}", "data.n_validation=100", "data.n_test=200",
                 f"base.fallback={json.dumps(default.base.model_dump(mode='json'))}",
                 f"grpo={json.dumps(default.grpo.model_dump(mode='json'))}",
                 f"evaluate={json.dumps(default.evaluate.model_dump(mode='json'))}"]
    land("test.jsonl", test)
    land("train/night-1.jsonl", train[:1000] + validation)
    from flows.pipeline import r1_pipeline

    seconds = []
    try:
        for night in (1, 2, 3):
            if night == 2:
                land("train/night-2.jsonl", train[1000:])
            started = time.time()
            summary = r1_pipeline(config=str(PROJECT / "configs" / "nightly.yaml"), root=str(root),
                                  overrides=overrides)
            seconds.append(time.time() - started)
            reran = sorted(name for name, cached in summary["stages"].items() if not cached)
            print(f"night {night}: {seconds[-1]:.0f} s; reran {reran or 'nothing'}; "
                  f"pass@1 {json.dumps({k: round(v['pass@1'], 3) for k, v in summary['metrics'].items()})}; "
                  f"versions {json.dumps(summary['versions'])}", flush=True)
        place = locate(load_profile(PROJECT / "configs" / "nightly.yaml", overrides), root)
        for row in history(Tracker(place.tracking_uri, place.experiment), "nightly-r1-zero"):
            print(row)
        print(f"night 3 / night 1 wall time: {seconds[2] / seconds[0]:.3f}")
    finally:
        stop([server])


if __name__ == "__main__":
    main()
