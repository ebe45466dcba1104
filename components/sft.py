"""SFT stage (TRL SFTTrainer): cold start, R1 stage-2 SFT, and distillation into a student.

    python -m components.sft --spec SPEC.json

All three are the same operation on different inputs: a model folder (``inputs.model``) and a
jsonl of R1-format traces (``inputs.data``); loss on the completion only.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from components.config import SFTConfig, TrainConfig
from components.modeling import load_model, load_tokenizer, pick_device, render_prompt, save_model
from components.stage_io import MetricsLog, StageSpec, parse_spec, seed_everything, write_result


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trl_arguments(cfg: TrainConfig, output: Path, seed: int, device: str) -> dict:
    """Arguments every TRL trainer here gets; CPU needs fp32 and no checkpointing (FINDINGS 1)."""
    on_cpu = device == "cpu"
    fields = ("learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
              "lr_scheduler_type", "warmup_steps", "logging_steps")
    return {
        **{name: getattr(cfg, name) for name in fields},
        "output_dir": str(output / "trainer"), "seed": seed, "data_seed": seed, "report_to": "none",
        "save_strategy": "no", "use_cpu": on_cpu, "bf16": not on_cpu, "gradient_checkpointing": False,
        "disable_tqdm": True, **cfg.trl_args,
    }


def loss_summary(history: list[dict], key: str = "loss") -> dict:
    values = [row[key] for row in history if key in row]
    return {f"first_{key}": values[0], f"last_{key}": values[-1]} if values else {}


def run(spec: StageSpec) -> dict:
    cfg = SFTConfig(**spec.config)
    seed_everything(spec.seed)
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(spec.inputs["model"], padding_side="right")
    records = read_jsonl(spec.inputs["data"])
    dataset = Dataset.from_list([
        {"prompt": render_prompt(tokenizer, r["question"], spec.prompt_template), "completion": r["completion"]}
        for r in records
    ])
    args = TRLSFTConfig(**trl_arguments(cfg, spec.output, spec.seed, device), max_length=cfg.max_length,
                        completion_only_loss=True)
    log = MetricsLog(spec.output / "metrics.jsonl")
    trainer = SFTTrainer(model=load_model(spec.inputs["model"], device), args=args, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[log])
    trainer.train()
    model_dir = save_model(trainer.model, tokenizer, spec.output / "model")
    result = {"model": str(model_dir), "examples": len(records), "steps": trainer.state.global_step,
              **loss_summary(trainer.state.log_history)}
    write_result(spec.output, result)
    return result


if __name__ == "__main__":
    run(parse_spec())
