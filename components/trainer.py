"""What every TRL trainer of r1flow shares: its arguments, the metrics log, atomic checkpoints,
resuming, and saving the trained model as a Hugging Face folder.

Used by ``components.sft`` and ``components.grpo``; its own module so that an edit to the SFT
stage changes no GRPO stage key, and the other way round.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from components.modeling import save_model, use_bf16
from components.sections import TrainSection
from components.stage_io import (
    MetricsLog,
    StageSpec,
    checkpoint_step,
    keep_checkpoint,
    resume_from,
)
from components.store import Store


def trl_arguments(cfg: TrainSection, spec: StageSpec, device: str) -> dict:
    """Arguments every TRL trainer here gets: bf16 autocast where ``runtime.precision`` resolves to
    it (by default on GPU only), gradient checkpointing where the section asks (off by default: it
    doubled GRPO step time on CPU). Checkpoints are written every ``save_steps`` when the stage has a
    checkpoint folder."""
    on_cpu = device == "cpu"
    machines, _ = machine_place()
    fields = ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "lr_scheduler_type", "warmup_steps", "logging_steps")
    return {
        **{name: getattr(cfg, name) for name in fields},
        "output_dir": str(spec.output / "trainer"), "seed": spec.seed, "data_seed": spec.seed, "report_to": "none",
        "save_strategy": "steps" if spec.checkpoints else "no", "save_steps": cfg.save_steps,
        "use_cpu": on_cpu, "bf16": use_bf16(device, spec.precision), "disable_tqdm": True,
        # always said: TRL's SFTConfig turns it on by default (transformers 5.24 warns that it is renamed)
        "gradient_checkpointing": cfg.gradient_checkpointing,
        # machines share no disk: each saves its own ranks' part of a checkpoint (DeepSpeed's node-local storage)
        "save_on_each_node": machines > 1, **cfg.trl_args,
    }


def machine_place() -> tuple[int, int]:
    """(machines in this launch, this machine's rank), as torchrun tells every process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world // int(os.environ.get("LOCAL_WORLD_SIZE", world)), int(os.environ.get("GROUP_RANK", "0"))


class TrainerLog(MetricsLog, TrainerCallback):
    """The stage's metrics log, fed with every step the Trainer logs."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        self.write(state.global_step, **numbers)


class AtomicCheckpoints(TrainerCallback):
    """Moves each checkpoint the Trainer has finished writing into the stage's checkpoint folder;
    across machines, puts every machine's part of it into the store as one checkpoint."""

    def __init__(self, folder: Path, metrics: Path, store: str | None = None):
        self.folder, self.metrics, self.store = folder, metrics, store

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shard is written before the move
        written = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        machines, machine = machine_place()
        if machines > 1:
            keep_parts(written, self.metrics, self.store, state, machine)
        elif state.is_world_process_zero:
            keep_checkpoint(written, self.folder, self.metrics, self.store)


def keep_parts(written: Path, metrics: Path, store: str, state, machine: int) -> None:
    """A checkpoint across machines: each holds its own ranks' shards, and uploads them under
    ``machine-<rank>/``; rank 0 marks it complete with one manifest once every part is in, then
    drops the older ones. A machine that resumes fetches its own part."""
    remote = Store.at(store)
    part = None
    if state.is_world_process_zero and metrics.exists():
        shutil.copyfile(metrics, written / "metrics.jsonl")
    if state.is_local_process_zero:
        # DeepSpeed writes its `latest` tag file on global rank 0 only, node-local storage or not; every
        # machine's part needs it to load its own shards
        tags = [d.name for d in written.glob("global_step*") if d.is_dir()]
        if not (written / "latest").exists() and len(tags) == 1:
            (written / "latest").write_text(tags[0])
        files = remote.put_files(written, f"{written.name}/machine-{machine}")["files"]
        part = {f"machine-{machine}/{name}": entry for name, entry in files.items()}
        shutil.rmtree(written, ignore_errors=True)  # in the store now: the scratch keeps none of them
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    if state.is_world_process_zero:
        remote.mark_complete(written.name, {"files": {name: e for p in parts if p for name, e in p.items()}})
        for older in remote.folders(""):
            if older != written.name:
                remote.remove(older)


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
    world, (machines, _) = trainer.accelerator.num_processes, machine_place()
    return {"model": str(out), "world_size": world, "machines": machines,
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "deepspeed_zero_stage": plugin.zero_stage if plugin else None, "lora": lora}
