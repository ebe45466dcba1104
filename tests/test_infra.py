"""The cluster files in infra/ (no cluster or image build here): valid, requesting GPUs where the
GPU stages run, and pinning what the project pins."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from flows.recipe import STAGES

INFRA = Path(__file__).parents[1] / "infra"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)")


def pins(lines) -> dict[str, str]:
    return {m[1].lower().replace("_", "-"): m[2] for line in lines if (m := PIN.match(line.strip()))}


def project_pins() -> dict[str, str]:
    pyproject = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]
    extras = [dep for deps in pyproject["optional-dependencies"].values() for dep in deps]
    return {**pins((INFRA.parent / "constraints.txt").read_text().splitlines()),
            **pins(pyproject["dependencies"] + extras)}


def test_the_gpu_job_template_requests_gpus_and_takes_credentials_from_a_secret():
    template = json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())
    job = template["job_configuration"]["job_manifest"]
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0  # a failed stage is retried by the pipeline
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert template["variables"]["properties"]["gpu_count"]["default"] >= 1
    assert container["envFrom"] == [{"secretRef": {"name": "{{ s3_secret }}"}}]
    assert template["variables"]["properties"]["image"]["default"].startswith("r1flow-stage")
    placeholders = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"])  # every placeholder is a variable


def test_the_kubernetes_deployments_cover_every_stage_on_the_same_pools():
    k8s = yaml.safe_load((INFRA / "k8s" / "prefect.yaml").read_text())
    local = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    pools = {d["name"]: d["work_pool"]["name"] for d in local["deployments"]}
    on_k8s = {d["name"]: d for d in k8s["deployments"]}
    assert set(on_k8s) == set(pools) == {"nightly", "retrain", *STAGES}
    for name, deployment in on_k8s.items():
        assert deployment["work_pool"]["name"] == f"{pools[name]}-k8s"
        image = deployment["work_pool"]["job_variables"]["image"].split(":")[0]
        assert (INFRA / f"{image.removeprefix('r1flow-')}.Containerfile").exists()
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(deployment)


def test_the_images_pin_what_the_project_pins():
    project, stage = project_pins(), (INFRA / "stage-requirements.txt").read_text().splitlines()
    differs = {m[1].lower() for line in stage if "# differs:" in line and (m := PIN.match(line.strip()))}
    assert differs == {"transformers"}  # vllm 0.31 caps transformers < 5.18
    for name, version in pins(stage).items():
        assert name in project, f"{name} is pinned in the stage image but not by the project"
        assert name in differs or version == project[name], f"{name}: {version} vs the project's {project[name]}"
    assert {"vllm", "trl", "transformers", "torch", "deepspeed"} <= set(pins(stage))
    orchestrator = (INFRA / "orchestrator.Containerfile").read_text()
    assert f"torch=={project['torch']}" in orchestrator and "-c constraints.txt" in orchestrator
    image = (INFRA / "stage.Containerfile").read_text()
    assert "-r /tmp/stage-requirements.txt" in image and "--no-deps /opt/r1flow" in image


def test_the_stage_image_has_a_compiler_and_the_docs_state_the_driver():
    """Triton compiles its launcher with a C compiler when vLLM first runs; PyPI's torch and vLLM
    are CUDA 13 builds, so a GPU machine needs driver R580 or newer, and the docs say so."""
    installs = [line for line in (INFRA / "stage.Containerfile").read_text().splitlines() if "apt-get install" in line]
    assert installs and "gcc" in installs[0].split() and "libc6-dev" in installs[0].split()
    for doc in (INFRA / "README.md", INFRA.parent / "README.md"):
        text = " ".join(doc.read_text().split())
        assert "CUDA 13" in text and "R580 or newer" in text and "CUDA 12.9" in text, doc


def test_every_stage_has_its_deployment():
    """A stage the pipeline sends to `r1flow-stage/{stage}` must be deployed (infra/prefect.yaml)."""
    import yaml

    deployments = yaml.safe_load((Path(__file__).parents[1] / "infra" / "prefect.yaml").read_text())["deployments"]
    stages = {d["parameters"]["stage"]: d["name"] for d in deployments if d["entrypoint"].endswith(":stage_flow")}
    assert set(stages) == set(STAGES) and all(name == stage for stage, name in stages.items())
