"""Shared fixtures: tiny models and data built inside the test session, never downloaded."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

# Settings that must exist before Prefect/MLflow/DeepSpeed import: a private Prefect home per
# session, no telemetry, CPU DeepSpeed without its banner.
_SESSION = Path(tempfile.mkdtemp(prefix="r1flow-tests-"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One torch thread per process (stage processes inherit it): xdist's workers and their stages
# already share the cores. On 2 cores an earlier suite took 610 s this way, 789 s with torch's default.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["PREFECT_HOME"] = str(_SESSION / "prefect")
from flows.environment import configure

configure(_SESSION / "workspace")

import reliability_doc

from components.sections import DataConfig, ModelConfig


def pytest_addoption(parser):
    reliability_doc.addoption(parser)


def pytest_runtest_logreport(report):
    reliability_doc.collect(report)


def pytest_sessionfinish(session):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or a run without xdist) has every report
        reliability_doc.write(session.config.getoption("reliability_doc"))


def pytest_configure(config):
    """One Prefect server for the session's flows, in-process and launched (``r1flow run`` in a
    subprocess inherits PREFECT_API_URL): a flow then starts in ~3.5 s instead of the 15-25 s of
    an ephemeral server per process. Each xdist worker has its own; the controller none."""
    if config.getoption("numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return
    from flows.servers import BIN, free_port, wait_for  # it imports only the standard library

    port = free_port()
    log = (_SESSION / "prefect-server.log").open("w")
    config._prefect_server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "PREFECT_HOME": str(_SESSION / "prefect-server")}, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(f"{api}/health", config._prefect_server, 180)
    except (RuntimeError, TimeoutError) as error:
        config._prefect_server.kill()
        raise RuntimeError(f"the session's Prefect server did not start ({error}): {log.name}") from None
    os.environ["PREFECT_API_URL"] = api


def pytest_unconfigure(config):
    server = getattr(config, "_prefect_server", None)
    if server is not None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


# The longest files, longest first (their seconds with 3 workers on 2 cores, 2026-12-07: 601, 399, 355,
# test_vllm.py ~260 alone, test_nightly.py ~240 alone, 258, 168, 167, 142, 137, 125, 110, 66, 63, 53).
# xdist hands whole files to its workers in collection order: started first, none is left running
# alone at the end.
LONGEST = ("test_hosts.py", "test_faults.py", "test_multi_machine.py", "test_vllm.py", "test_nightly.py",
           "test_pipeline.py",
           "test_resume.py", "test_servers.py", "test_servers_down.py", "test_deepspeed.py", "test_data_sources.py",
           "test_bad_input.py", "test_schedule.py", "test_workspace.py", "test_security.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first; ``gpu`` tests need CUDA: skipped, with the reason shown, on machines
    without it."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: file order kept otherwise
    reliability_doc.describe(items)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


MICRO_BASE = ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, pretrain_examples=2000,
                         pretrain_steps=120, pretrain_batch_size=32, pretrain_max_digits=2, pretrain_ema=0.9)


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """An untrained tiny Qwen2 model with the built-in tokenizer, saved as a HF folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from components.modeling import build_tiny_tokenizer, save_model

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return save_model(Qwen2ForCausalLM(config), tokenizer, tmp_path_factory.mktemp("random") / "model")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny base pretrained briefly by the base stage: it already writes R1-format answers."""
    from components import base

    out = tmp_path_factory.mktemp("tiny_base")
    base.run(MICRO_BASE, seed=0, template="{question}", output=out)
    return out / "model"


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    from components.data import build_datasets

    out = tmp_path_factory.mktemp("data")
    build_datasets(DataConfig(n_train=120, n_validation=0, n_test=16, min_digits=1, max_digits=2,
                              cold_start_size=48), seed=0, out=out)
    return out


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_server():
    """Stop Prefect's ephemeral server while pytest's output is still open.

    Left to its atexit hook, the server logs its shutdown to a stream pytest has already closed.
    """
    yield
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()
