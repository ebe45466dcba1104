"""What every TRL trainer of r1flow shares: its arguments, the metrics log, atomic checkpoints,
resuming, and saving the trained model as a Hugging Face folder.

Used by ``components.sft`` and ``components.grpo``; its own module so that an edit to the SFT
stage changes no GRPO stage key, and the other way round.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from components.config import TrainSection
from components.modeling import save_model, use_bf16
from components.stage_io import (
    MetricsLog,
    StageSpec,
    checkpoint_step,
    keep_checkpoint,
    resume_from,
)


def trl_arguments(cfg: TrainSection, spec: StageSpec, device: str) -> dict:
    """Arguments every TRL trainer here gets: bf16 autocast where ``runtime.precision`` resolves to
    it (by default on GPU only), gradient checkpointing where the section asks (off by default: it
    doubled GRPO step time on CPU). Checkpoints are written every ``save_steps`` when the stage has a
    checkpoint folder."""
    on_cpu = device == "cpu"
    fields = ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "lr_scheduler_type", "warmup_steps", "logging_steps", "gradient_checkpointing")
    return {
        **{name: getattr(cfg, name) for name in fields},
        "output_dir": str(spec.output / "trainer"), "seed": spec.seed, "data_seed": spec.seed, "report_to": "none",
        "save_strategy": "steps" if spec.checkpoints else "no", "save_steps": cfg.save_steps,
        "use_cpu": on_cpu, "bf16": use_bf16(device, spec.precision), "disable_tqdm": True, **cfg.trl_args,
    }


class TrainerLog(MetricsLog, TrainerCallback):
    """The stage's metrics log, fed with every step the Trainer logs."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.write(state.global_step, **numbers)


class AtomicCheckpoints(TrainerCallback):
    """Moves each checkpoint the Trainer has finished writing into the stage's checkpoint folder."""

    def __init__(self, folder: Path, metrics: Path, store: str | None = None):
        self.folder, self.metrics, self.store = folder, metrics, store

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shard is written before the move
        if state.is_world_process_zero:
            keep_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.folder, self.metrics,
                            self.store)


def callbacks(spec: StageSpec) -> list:
    """The metrics log, and atomic checkpoints when the stage keeps them."""
    log = TrainerLog(spec.output / "metrics.jsonl")
    return [log, AtomicCheckpoints(spec.checkpoints, log.path, spec.checkpoint_store)] if spec.checkpoints else [log]


def train_resumable(trainer, spec: StageSpec) -> int:
    """Train, continuing from the last complete checkpoint an earlier attempt left; returns its step."""
    checkpoint = resume_from(spec.checkpoints, spec.output / "metrics.jsonl")
    if checkpoint is not None:
        print(f"resuming from {checkpoint.name}", flush=True)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    return checkpoint_step(checkpoint)


def loss_summary(history: list[dict], key: str = "loss") -> dict:
    values = [row[key] for row in history if key in row]
    return {f"first_{key}": values[0], f"last_{key}": values[-1]} if values else {}


def save_trained(trainer, tokenizer, out: Path) -> dict:
    """Save the trained model as a HF folder and say how it was trained.

    ``trainer.save_model`` writes from the main process only and gathers ZeRO-3 shards, so this
    works the same under ``accelerate launch`` with DeepSpeed as in a plain process.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    lora = hasattr(model, "merge_and_unload")
    if lora:  # a LoRA adapter, merged into the weights: the folder loads like any model's
        if trainer.is_world_process_zero():
            save_model(model.merge_and_unload(), tokenizer, out)
    else:
        trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the stage's spec.json says it all
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    world = trainer.accelerator.num_processes
    # torchrun sets LOCAL_WORLD_SIZE: the processes on this machine (every machine starts as many)
    machines = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return {"model": str(out), "world_size": world, "machines": machines,
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "deepspeed_zero_stage": plugin.zero_stage if plugin else None, "lora": lora}
