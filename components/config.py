"""Typed profile configuration: one YAML per profile, validated when loaded.

    profile = load_profile("configs/default.yaml", ["grpo.learning_rate=5e-5"])

Each section's fields are in components.sections; here, the profile as a whole, overrides and
one-line errors: every error names the key and what to change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from components.sections import (
    ChatTurn,
    DataConfig,
    EvaluateConfig,
    GRPOSection,
    ModelConfig,
    PromotionConfig,
    RejectionSamplingConfig,
    RuntimeConfig,
    Section,
    SFTSection,
    TrackingConfig,
    has_credentials,
)

# The profile sections that configure a GRPO stage (r1_zero and r1_rl, r1_final, student_rl).
RL_SECTIONS = ("grpo", "final_rl", "student_rl")


class ConfigError(ValueError):
    """A profile that cannot be used; the message names the file, the key and the problem."""


class Profile(Section):
    name: str = "tiny-cpu"
    seed: int = 0
    workspace: Path = Field(Path(".r1flow"), description="generated state: stages, MLflow, Prefect, DVC remote")
    store: str | None = Field(
        None, description="stage store shared by workers: s3://bucket/prefix (stage outputs, checkpoints, the DVC "
        "remote; credentials and endpoint from AWS_* variables); none: the workspace alone")
    data_dir: Path = Field(Path("data"), description="datasets versioned by DVC (data.dvc beside it)")
    prompt_template: str | list[ChatTurn] = Field(
        "{question}", description="what the user turn says, with {question}; or chat turns ending in that user "
        "turn, e.g. a worked example (user, assistant) before it")
    stages: list[str] | None = Field(
        None, description="run only these stages and what they need (e.g. [eval_base, eval_r1_zero]); none: all")
    data: DataConfig = DataConfig()
    base: ModelConfig = ModelConfig()
    student: ModelConfig = ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    cold_start: SFTSection = SFTSection()
    grpo: GRPOSection = GRPOSection()
    rejection_sampling: RejectionSamplingConfig = RejectionSamplingConfig()
    sft: SFTSection = SFTSection()
    final_rl: GRPOSection = Field(GRPOSection(), description="R1's last stage: GRPO again, on the SFT-on-traces "
                                 "model (r1_final); apart from grpo, so its steps are its own")
    distill: SFTSection = SFTSection()
    student_rl: GRPOSection = Field(GRPOSection(), description="distillation's other side: GRPO on the student's "
                                    "own base (student_rl), R1-Zero's prompts and rewards; its steps its own")
    evaluate: EvaluateConfig = EvaluateConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()

    @model_validator(mode="after")
    def _check_profile(self) -> Profile:
        turns = [ChatTurn(role="user", content=self.prompt_template)] if isinstance(self.prompt_template, str) \
            else self.prompt_template
        if not turns or turns[-1].role != "user" or "{question}" not in turns[-1].content:
            raise ValueError("prompt_template must contain {question} (in its last turn, a user turn)")
        for key, uri, where in (("store", self.store, "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"),
                                ("tracking.tracking_uri", self.tracking.tracking_uri,
                                 "MLFLOW_TRACKING_USERNAME/PASSWORD, PGPASSWORD")):
            if uri is not None and has_credentials(uri):
                # The URI is not echoed: this message reaches terminals and logs.
                raise ValueError(f"{key}: credentials in the URI would be recorded with every run (MLflow, "
                                 f"Prefect); remove them and set them in the environment ({where})")
        if self.store is not None and not self.store.startswith("s3://"):
            raise ValueError(f"store: {self.store!r} is not s3://bucket/prefix")
        if (processes := self.runtime.known_processes()) is not None:  # else the stage checks, by TRL's rule
            for name in RL_SECTIONS:
                try:
                    getattr(self, name).generation_batch(processes)
                except ValueError as error:
                    raise ValueError(f"{name}: {error}") from None
        sections = {"cold_start": "SFTConfig", "sft": "SFTConfig", "distill": "SFTConfig",
                    **dict.fromkeys(RL_SECTIONS, "GRPOConfig")}  # the TRL class each passes trl_args to
        passed = {name: cls for name, cls in sections.items() if getattr(self, name).trl_args}
        if not passed:
            return self  # importing TRL (and torch) takes seconds; only trl_args need it
        import trl

        for section, name in passed.items():
            cls = getattr(trl, name)
            known = {f.name for f in dataclasses.fields(cls)}
            for key in getattr(self, section).trl_args:
                if key not in known:
                    raise ValueError(f"{section}.trl_args.{key}: not an argument of trl.{cls.__name__}")
        return self


def plain_template(profile: Profile) -> str | list[dict]:
    """The profile's prompt template as JSON (stage specs, stage keys)."""
    return profile.model_dump(mode="json")["prompt_template"]


def _apply_override(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. grpo.learning_rate=5e-5")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def _one_line(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = "".join(f"{p}: " for p in [".".join(str(p) for p in first["loc"])] if p)
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    got = f" (got {first['input']!r})" if first["type"] not in ("extra_forbidden", "missing") and not isinstance(
        first.get("input"), dict) else ""
    return f"{source}: {key}{message.removeprefix('Value error, ')}{got}{more}"


def load_profile(path: str | Path | None = None, overrides: list[str] | None = None) -> Profile:
    """Read a profile YAML (or the defaults), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    try:
        return Profile.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_one_line(error, source)) from None


def content_hash(*parts: Any) -> str:
    """Stable sha256 of JSON-able parts (pydantic models are dumped first)."""
    def plain(part: Any) -> Any:
        return part.model_dump(mode="json") if isinstance(part, BaseModel) else part
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
