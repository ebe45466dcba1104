"""New data from the bucket: ``data.train_path``/``test_path`` as ``s3://`` URLs on a real S3
server (SeaweedFS on 127.0.0.1), keyed by the listing, each error one line naming the URL; and
R1-Zero on a file without worked solutions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import s3_prefix

from components.config import ConfigError, load_profile
from components.store import data_objects, fetch_objects
from flows.servers import BUCKET

MICRO = str(Path(__file__).parents[1] / "configs" / "micro.yaml")
# TinyZero's Countdown columns, mapped by two keys; no worked solutions, so no cold-start traces.
COUNTDOWN = ["data.source=file", "data.task=countdown", "data.columns={numbers: nums, target: target}"]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A SeaweedFS S3 endpoint; the environment points s3fs (and the stages) at it. Yields a prefix
    of its bucket of this test's own."""
    with s3_prefix(tmp_path_factory.mktemp("seaweedfs"), "data-test") as store:
        yield store


def countdown_parquet(path: Path, problems: list[tuple[list[int], int]]) -> Path:
    import pandas as pd

    pd.DataFrame({"nums": [n for n, _ in problems], "target": [t for _, t in problems]}).to_parquet(path)
    return path


def problems(start: int, count: int) -> list[tuple[list[int], int]]:
    """Solvable Countdown problems, each distinct: a + b with a third number left over."""
    return [([a, a + 1, 7], 2 * a + 1) for a in range(start, start + count)]


def test_one_new_object_changes_the_key_of_data_and_what_reads_it_and_a_recipe_without_traces_stops_at_data(
        bucket, tmp_path):
    from flows.keys import planned_keys
    from flows.pipeline import r1_pipeline
    from flows.recipe import downstream

    for i, chunk in enumerate((problems(10, 120), problems(200, 100))):  # two nights' data so far
        local = countdown_parquet(tmp_path / f"part-{i}.parquet", chunk)
        bucket.fs.put(str(local), bucket.path(f"countdown/train/part-{i}.parquet"))
    bucket.fs.put(str(countdown_parquet(tmp_path / "test.parquet", problems(500, 24))),
                  bucket.path("countdown/test.parquet"))
    overrides = ["runtime.device=cpu", *COUNTDOWN, f"data.train_path={bucket.path('countdown/train/')}",
                 f"data.test_path={bucket.path('countdown/test.parquet')}", "data.n_validation=8", "data.n_train=1000"]
    profile = load_profile(MICRO, overrides)
    before = planned_keys(profile)
    assert planned_keys(profile) == before  # nothing new: every key the same
    bucket.fs.put(str(countdown_parquet(tmp_path / "part-2.parquet", problems(300, 10))),
                  bucket.path("countdown/train/part-2.parquet"))
    after = planned_keys(profile)
    assert {name for name in before if before[name] != after[name]} == {"data", *downstream("data")}
    # The whole recipe on data without worked solutions stops after the data stage, saying why;
    # the data stage read every object (R1-Zero alone runs on it: tests/test_nightly.py).
    root = tmp_path / "project"
    with pytest.raises(ValueError, match=r"data.source 'file': no training record has a worked solution, so there "
                                         r"are no cold-start traces; .* or run R1-Zero alone"):
        r1_pipeline(config=MICRO, root=str(root), overrides=overrides)
    (folder,) = (root / ".r1flow" / "stages" / "data").iterdir()
    assert [len((folder / f"{name}.jsonl").read_text().splitlines()) for name in ("train", "validation", "test",
                                                                                 "cold_start")] == [222, 8, 24, 0]


def test_each_bad_data_url_is_one_line_naming_it(bucket, tmp_path):
    bucket.fs.pipe_file(bucket.path("solo/train.jsonl"), b'{"question": "1+1?", "answer": "2"}\n')
    bucket.fs.mkdir(bucket.path("empty"))
    cases = {
        bucket.path("solo/none.jsonl"): r"no such object; upload the file, or end the URL with / to read every object",
        bucket.path("nothing-here/"): "no objects under this prefix; upload a data file there",
        "s3://no-such-bucket/train.jsonl": "no such bucket 'no-such-bucket'; create it or correct the URL",
    }
    for url, message in cases.items():
        with pytest.raises(FileNotFoundError, match=rf"^data.train_path {url}: {message}"):
            data_objects(url, "data.train_path")
    # as `r1flow run` shows it: one line, no traceback, before anything runs
    sets = ["runtime.device=cpu", *COUNTDOWN, f"data.train_path={bucket.path('solo/none.jsonl')}",
            f"data.test_path={bucket.path('solo/')}"]
    shown = subprocess.run([str(Path(sys.executable).parent / "r1flow"), "run", "-c", MICRO,
                            *(arg for s in sets for arg in ("-s", s))], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, check=False)
    output = shown.stdout + shown.stderr
    assert shown.returncode == 1 and "Traceback" not in output, output
    assert f"pipeline failed: data.train_path {bucket.path('solo/none.jsonl')}: no such object" in output
    assert not (tmp_path / ".r1flow" / "stages").exists()
    (one,) = data_objects(bucket.path("solo/train.jsonl"), "data.train_path")
    assert one["name"] == "train.jsonl" and one["size"] == 36 and len(one["etag"]) == 32
    # A name the bucket gives never picks the local path: "../" or a leading "/" stays in the folder.
    for name in ("../../escaped.jsonl", "/tmp/escaped.jsonl"):
        (path,) = fetch_objects([{**one, "name": name}], tmp_path / "fetched")
        assert path.parent == tmp_path / "fetched" and path.name == "00000-escaped.jsonl" and path.read_bytes()
    with pytest.raises(ConfigError, match="data: train_path: credentials in the URL would be recorded"):
        load_profile(MICRO, [*COUNTDOWN, f"data.train_path=s3://key:secret@{BUCKET}/x/", "data.test_path=s3://b/t"])
    from components import store

    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        store._s3.cache_clear()  # a client per key: the wrong secret gets its own
        with pytest.raises(PermissionError, match=r"^data.train_path s3://.*: access denied; the keys in "
                                                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be allowed"):
            data_objects(bucket.path("solo/"), "data.train_path")
    store._s3.cache_clear()
