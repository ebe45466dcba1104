"""GRPO stage (TRL GRPOTrainer) with rule rewards: R1-Zero from the base, R1 from the cold start.

    python -m components.grpo --spec SPEC.json

Inputs: ``inputs.model`` (a model folder) and ``inputs.data`` (training prompts jsonl). Rewards
are the pure functions of ``components.rewards``, weighted as the profile says.
"""

from __future__ import annotations

from datasets import Dataset
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer

from components.benchmarks import load_jsonl
from components.config import GRPOConfig
from components.modeling import load_model, load_tokenizer, pick_device, render_prompt
from components.rewards import REWARDS
from components.sft import callbacks, loss_summary, save_trained, train_resumable, trl_arguments
from components.stage_io import StageSpec, parse_spec, seed_everything, write_result


def prompt_dataset(records: list[dict], tokenizer, template: str) -> Dataset:
    """Rendered prompts plus the columns the rewards read (TRL passes every column to them)."""
    rows = [{"prompt": render_prompt(tokenizer, r["question"], template), "answer": r["answer"], "task": r["task"]}
            for r in records]
    if any("numbers" in r for r in records):
        for row, record in zip(rows, records):
            row["numbers"] = record.get("numbers", [])
    return Dataset.from_list(rows)


def run(spec: StageSpec) -> dict:
    cfg = GRPOConfig(**spec.config)
    seed_everything(spec.seed)
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(spec.inputs["model"], padding_side="left")
    names = list(cfg.rewards)
    args = TRLGRPOConfig(
        **trl_arguments(cfg, spec, device),
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta, epsilon=cfg.epsilon,
        loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        reward_weights=[cfg.rewards[n] for n in names],
    )
    trainer = GRPOTrainer(
        model=load_model(spec.inputs["model"], device, for_training=True), args=args, processing_class=tokenizer,
        reward_funcs=[REWARDS[n] for n in names],
        train_dataset=prompt_dataset(load_jsonl(spec.inputs["data"]), tokenizer, spec.prompt_template),
        callbacks=callbacks(spec),
    )
    resumed = train_resumable(trainer, spec)
    history = trainer.state.log_history
    result = {**save_trained(trainer, tokenizer, spec.output / "model"), "steps": trainer.state.global_step,
              "resumed_from_step": resumed,
              **loss_summary(history, "reward"),
              **loss_summary(history, "completions/mean_length")}
    write_result(spec.output, result)
    return result


if __name__ == "__main__":
    run(parse_spec())
