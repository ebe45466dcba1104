"""SFT stage (TRL SFTTrainer): cold start, R1 stage-2 SFT, and distillation into a student.

    python -m components.sft --spec SPEC.json

All three are the same operation on different inputs: a model folder (``inputs.model``) and a
jsonl of R1-format traces (``inputs.data``); loss on the completion only.
"""

from __future__ import annotations

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from components.jsonl import load_jsonl
from components.modeling import load_model, load_tokenizer, pick_device, render_prompt
from components.sections import SFTSection
from components.stage_io import StageSpec, main, seed_everything, write_result
from components.trainer import callbacks, loss_summary, save_trained, train_resumable, trl_arguments


def run(spec: StageSpec) -> dict:
    cfg = SFTSection(**spec.config)
    seed_everything(spec.seed)
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(spec.inputs["model"], padding_side="right")
    records = load_jsonl(spec.inputs["data"])
    dataset = Dataset.from_list([
        {"prompt": render_prompt(tokenizer, r["question"], spec.prompt_template), "completion": r["completion"]}
        for r in records
    ])
    args = SFTConfig(**trl_arguments(cfg, spec, device), max_length=cfg.max_length, completion_only_loss=True)
    trainer = SFTTrainer(model=load_model(spec.inputs["model"], device, for_training=True), args=args,
                         train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks(spec))
    resumed = train_resumable(trainer, spec)
    result = {**save_trained(trainer, tokenizer, spec.output / "model"), "examples": len(records),
              "steps": trainer.state.global_step, "resumed_from_step": resumed,
              **loss_summary(trainer.state.log_history)}
    write_result(spec.output, result)
    return result


if __name__ == "__main__":
    main(run)
