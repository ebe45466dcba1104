"""The stage store against a real S3 server (SeaweedFS, started here on 127.0.0.1): complete only
once the manifest is written, every download checked against it, checkpoints that move between
workers."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest
import torch
from helpers import s3_prefix
from safetensors.torch import load_file

from components import base
from components.sections import ModelConfig
from components.stage_io import fetch_checkpoint
from components.store import CorruptObject
from flows.cache import stage_folder
from flows.stages import reuse

TINY = ModelConfig(hidden_size=16, num_hidden_layers=1, intermediate_size=32, pretrain_examples=64,
                   pretrain_steps=6, pretrain_batch_size=8, save_steps=2, pretrain_ema=0.5)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS S3 endpoint with its bucket; the environment points s3fs at it."""
    with s3_prefix(tmp_path_factory.mktemp("seaweedfs"), "store-test") as store:
        yield store


def folder_with(path: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(content)
    return path


def test_a_folder_is_complete_once_its_manifest_is_written_and_reads_back_verified(s3, tmp_path):
    source = folder_with(tmp_path / "out", {"result.json": b"{}", "model/model.safetensors": os.urandom(5000)})
    assert s3.manifest("stages/x/k") is None and not s3.get("stages/x/k", tmp_path / "none")
    manifest = s3.put(source, "stages/x/k")
    assert set(manifest["files"]) == {"result.json", "model/model.safetensors"}
    assert s3.get("stages/x/k", tmp_path / "copy")
    assert (tmp_path / "copy/model/model.safetensors").read_bytes() == (source / "model/model.safetensors").read_bytes()
    # Files without their manifest (an upload cut short) are not a folder anyone reads.
    s3.fs.put_file(str(source / "result.json"), s3.path("stages/x/partial/result.json"))
    assert s3.manifest("stages/x/partial") is None and not s3.get("stages/x/partial", tmp_path / "partial")


def test_a_corrupted_object_is_named_and_nothing_is_left_behind(s3, tmp_path):
    source = folder_with(tmp_path / "out", {"a.bin": os.urandom(1000), "b.bin": os.urandom(1000)})
    s3.put(source, "stages/y/k")
    s3.fs.pipe_file(s3.path("stages/y/k/b.bin"), os.urandom(1000))  # same size, other bytes
    with pytest.raises(CorruptObject, match="stages/y/k/b.bin"):
        s3.get("stages/y/k", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_an_upload_cut_short_leaves_the_folder_incomplete_not_stale(s3, tmp_path, monkeypatch):
    first = folder_with(tmp_path / "first", {"a.bin": b"old", "b.bin": b"old"})
    s3.put(first, "stages/z/k")
    second = folder_with(tmp_path / "second", {"a.bin": b"new!", "b.bin": b"new!"})
    fs, calls = s3.fs, []  # one client per process: the store's own

    def dies_after_first_file(local, remote, **kwargs):
        calls.append(remote)
        fs.put_file(local[0], remote[0])
        raise ConnectionError("network gone")

    monkeypatch.setattr(fs, "put", dies_after_first_file)
    with pytest.raises(ConnectionError):
        s3.put(second, "stages/z/k")
    monkeypatch.undo()
    assert calls and s3.manifest("stages/z/k") is None  # a forced rerun's upload: the old manifest went first


def test_a_stage_is_fetched_into_an_empty_workspace_and_a_local_only_one_is_uploaded(s3, tmp_path):
    worker_a, worker_b = tmp_path / "a", tmp_path / "b"
    folder_with(stage_folder(worker_a, "sft", "k1"), {"result.json": b'{"steps": 3}', "model/w.bin": b"w"})
    assert reuse(s3, worker_a, "sft", "k1")  # finished here, never uploaded (killed in between): uploaded now
    assert s3.manifest("stages/sft/k1") is not None
    assert reuse(s3, worker_b, "sft", "k1")
    assert json.loads((stage_folder(worker_b, "sft", "k1") / "result.json").read_text()) == {"steps": 3}
    assert not reuse(s3, worker_b, "sft", "other-key")


def test_pretraining_killed_on_one_worker_resumes_on_another_from_the_store(s3, tmp_path, monkeypatch):
    for name in ("straight", "first", "second"):
        (tmp_path / name).mkdir()
    base.run(TINY, seed=0, template="{question}", output=tmp_path / "straight")
    checkpoints = s3.path("checkpoints/base/k")
    keep = base.keep_checkpoint

    def crash_after_first(*args):
        keep(*args)
        raise KeyboardInterrupt  # the worker dies right after the step-2 checkpoint

    monkeypatch.setattr(base, "keep_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        base.run(TINY, 0, "{question}", tmp_path / "first", tmp_path / "worker-a", checkpoints)
    monkeypatch.setattr(base, "keep_checkpoint", keep)
    # Another worker, its checkpoint folder empty: the store's checkpoint carries the run on.
    fetch_checkpoint(tmp_path / "worker-b", checkpoints)  # what the runner does before starting a stage
    assert [p.name for p in (tmp_path / "worker-b").iterdir()] == ["checkpoint-2"]
    result = base.run(TINY, 0, "{question}", tmp_path / "second", tmp_path / "worker-b", checkpoints)
    assert result["resumed_from_step"] == 2
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "second" / "model" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_base_model_from_the_store_is_checked_keyed_by_its_manifest_and_keeps_its_dtype(s3, random_model, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from components.config import load_profile
    from components.modeling import load_tokenizer, save_model
    from flows.cli import app
    from flows.keys import inputs_of, planned_keys
    from flows.recipe import recipe_step
    from flows.stages import StageFailed, run_stage

    bf16 = save_model(AutoModelForCausalLM.from_pretrained(random_model, dtype=torch.bfloat16),
                      load_tokenizer(random_model), tmp_path / "bf16")
    url = s3.path("models/tiny")
    upload = CliRunner().invoke(app, ["upload", str(bf16), url])
    files = sum(1 for f in Path(bf16).rglob("*") if f.is_file())
    assert upload.exit_code == 0 and f"uploaded {files} files" in upload.output, upload.output
    profile = load_profile(Path(__file__).parents[1] / "configs" / "micro.yaml",
                           ["runtime.device=cpu", "base.source=hf", f"base.path={url}"])

    def base_stage(workspace: Path):
        return run_stage("base", "base", profile.base, inputs_of(recipe_step("base"), {}, profile), profile, workspace)

    key = planned_keys(profile)["base"]
    out = base_stage(tmp_path / "worker")
    assert out.key == key and out.result["dtype"] == "bfloat16" and out.result["source"] == url
    weights = load_file(out.folder / "model" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # not widened to fp32: half the bytes to move
    assert not (out.folder / "download").exists()
    # a flipped byte in the store is named, and the stage leaves nothing behind
    blob = s3.path("models/tiny/model.safetensors")
    data = bytearray(s3.fs.cat_file(blob))
    data[-1] ^= 1
    s3.fs.pipe_file(blob, bytes(data))
    with pytest.raises(StageFailed, match="model.safetensors: differs from its manifest"):
        base_stage(tmp_path / "other")
    assert not list((tmp_path / "other" / "stages" / "base").glob("*"))
    # another model at the URL is another key; no model there, an error naming the URL and the command
    assert CliRunner().invoke(app, ["upload", str(random_model), url]).exit_code == 0
    assert planned_keys(profile)["base"] != key
    nowhere = profile.model_copy(update={"base": profile.base.model_copy(update={"path": s3.path("models/none")})})
    with pytest.raises(FileNotFoundError, match=r"base.path s3://.*/models/none: no complete folder there .*"
                                                r"`r1flow upload FOLDER"):
        planned_keys(nowhere)


def test_machines_sent_a_stage_meet_in_the_store(s3, monkeypatch):
    """Rank 0 writes the address it reaches the store from; another machine waits for it there."""
    import threading

    from components.config import load_profile
    from flows.machines import Machines, machines, main_address

    zero2 = Path(__file__).parents[1] / "configs" / "accelerate" / "zero2.yaml"
    profile = load_profile(None, ["runtime.launcher=accelerate", f"runtime.accelerate_config={zero2}",
                                  "runtime.device=cpu", "runtime.machines=2", f"store={s3.url}"])
    monkeypatch.setenv("R1FLOW_MACHINE_RANK", "1")
    monkeypatch.setenv("R1FLOW_RENDEZVOUS", secrets.token_hex(4))
    follower = machines("grpo", profile)
    assert follower.main_ip is None and follower.rank == 1
    found = []
    waiting = threading.Thread(target=lambda: found.append(main_address(follower, profile)))
    waiting.start()  # before rank 0 has said anything
    time.sleep(1.5)
    assert not found
    rank0 = Machines(2, 0, None, 29500, follower.rendezvous)
    assert main_address(rank0, profile) == "127.0.0.1"  # the store answers on loopback here
    waiting.join(timeout=30)
    assert found == ["127.0.0.1"]
    with pytest.raises(ValueError, match="needs a store"):
        main_address(follower, profile.model_copy(update={"store": None}))
