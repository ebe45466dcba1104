"""SFT stage (TRL SFTTrainer): cold start, R1 stage-2 SFT, and distillation into a student.

    python -m components.sft --spec SPEC.json

All three are the same operation on different inputs: a model folder (``inputs.model``) and a
jsonl of R1-format traces (``inputs.data``); loss on the completion only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from components.benchmarks import load_jsonl
from components.config import SFTConfig, TrainConfig
from components.modeling import load_model, load_tokenizer, pick_device, render_prompt
from components.stage_io import (
    MetricsLog,
    StageSpec,
    checkpoint_step,
    keep_checkpoint,
    parse_spec,
    resume_from,
    seed_everything,
    write_result,
)


def trl_arguments(cfg: TrainConfig, spec: StageSpec, device: str) -> dict:
    """Arguments every TRL trainer here gets; CPU needs fp32 and no gradient checkpointing (FINDINGS 1).
    Checkpoints are written every ``save_steps`` when the stage has a checkpoint folder."""
    on_cpu = device == "cpu"
    fields = ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "lr_scheduler_type", "warmup_steps", "logging_steps")
    return {
        **{name: getattr(cfg, name) for name in fields},
        "output_dir": str(spec.output / "trainer"), "seed": spec.seed, "data_seed": spec.seed, "report_to": "none",
        "save_strategy": "steps" if spec.checkpoints else "no", "save_steps": cfg.save_steps, "use_cpu": on_cpu, "bf16": not on_cpu, "gradient_checkpointing": False,
        "disable_tqdm": True, **cfg.trl_args,
    }


class TrainerLog(MetricsLog, TrainerCallback):
    """The stage's metrics log, fed with every step the Trainer logs."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.write(state.global_step, **numbers)


class AtomicCheckpoints(TrainerCallback):
    """Moves each checkpoint the Trainer has finished writing into the stage's checkpoint folder."""

    def __init__(self, folder: Path, metrics: Path):
        self.folder, self.metrics = folder, metrics

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shard is written before the move
        if state.is_world_process_zero:
            keep_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.folder, self.metrics)


def callbacks(spec: StageSpec) -> list:
    """The metrics log, and atomic checkpoints when the stage keeps them."""
    log = TrainerLog(spec.output / "metrics.jsonl")
    return [log, AtomicCheckpoints(spec.checkpoints, log.path)] if spec.checkpoints else [log]


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
    trainer.save_model(str(out))
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the stage's spec.json says it all
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return {"model": str(out), "world_size": trainer.accelerator.num_processes,
            "deepspeed_zero_stage": plugin.zero_stage if plugin else None}


def run(spec: StageSpec) -> dict:
    cfg = SFTConfig(**spec.config)
    seed_everything(spec.seed)
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(spec.inputs["model"], padding_side="right")
    records = load_jsonl(spec.inputs["data"])
    dataset = Dataset.from_list([
        {"prompt": render_prompt(tokenizer, r["question"], spec.prompt_template), "completion": r["completion"]}
        for r in records
    ])
    args = TRLSFTConfig(**trl_arguments(cfg, spec, device), max_length=cfg.max_length, completion_only_loss=True)
    trainer = SFTTrainer(model=load_model(spec.inputs["model"], device, for_training=True), args=args,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks(spec))
    resumed = train_resumable(trainer, spec)
    result = {**save_trained(trainer, tokenizer, spec.output / "model"), "examples": len(records),
              "steps": trainer.state.global_step, "resumed_from_step": resumed,
              **loss_summary(trainer.state.log_history)}
    write_result(spec.output, result)
    return result


if __name__ == "__main__":
    run(parse_spec())
