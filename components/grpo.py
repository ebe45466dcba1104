"""GRPO stage (TRL GRPOTrainer) with rule rewards: R1-Zero from the base, R1 from the cold start.

    python -m components.grpo --spec SPEC.json

Inputs: ``inputs.model`` (a model folder), ``inputs.data`` (training prompts jsonl) and, optionally,
``inputs.heldout`` (prompts never trained on: pass@1 on them every ``heldout_every`` steps is the
curve of R1's figure 2). Rewards are the pure functions of ``components.rewards``, weighted as the
profile says.
"""

from __future__ import annotations

from statistics import mean

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from components.generation import Sampling, sample
from components.jsonl import load_jsonl
from components.modeling import load_model, load_tokenizer, pick_device, render_prompt
from components.rewards import REWARDS, final_answer, grade
from components.sections import GRPOSection
from components.stage_io import StageSpec, main, seed_everything, write_result
from components.trainer import (
    TrainerLog,
    callbacks,
    loss_summary,
    save_trained,
    train_resumable,
    trl_arguments,
)
from components.vllm_engine import colocate_settings


def prompt_dataset(records: list[dict], tokenizer, template: str | list[dict]) -> Dataset:
    """Rendered prompts plus the columns the rewards read (TRL passes every column to them)."""
    rows = [{"prompt": render_prompt(tokenizer, r["question"], template), "answer": r["answer"], "task": r["task"]}
            for r in records]
    for column, empty in (("numbers", []), ("entry", None)):  # Countdown's numbers, reasoning-gym's items
        if any(column in r for r in records):
            for row, record in zip(rows, records):
                row[column] = record.get(column, empty)
    return Dataset.from_list(rows)


class HeldOutPass(TrainerCallback):
    """pass@1 (one sample at T=0.6, top-p 0.95: R1's protocol) and mean completion length on
    held-out prompts, at step 0 and every ``every`` steps, logged as ``heldout/*`` metrics.

    Under ``accelerate launch`` each process samples its share of the prompts and rank 0 logs the
    whole. Sampling runs on a forked RNG (CPU and GPU), so training draws the same random numbers
    with or without it.
    """

    def __init__(self, records: list[dict], tokenizer, template: str, every: int, max_new_tokens: int, seed: int,
                 log: TrainerLog):
        self.records, self.tokenizer, self.every, self.seed, self.log = records, tokenizer, every, seed, log
        self.prompts = [render_prompt(tokenizer, r["question"], template) for r in records]
        self.max_new_tokens = max_new_tokens

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(model, state.global_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # not on resume: step 0 was measured by the first attempt
            self.measure(model, 0)

    def measure(self, model, step: int) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        mine = list(range(rank, len(self.prompts), world))
        # Every rank samples as many prompts (its first one again where it is a prompt short): under
        # ZeRO-3 each holds a shard of the weights, and all step through generation together.
        share = -(-len(self.prompts) // world)
        padded = mine + [mine[0] if mine else 0] * (share - len(mine))
        was_training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + rank)
            samples = sample(model, self.tokenizer, [self.prompts[i] for i in padded],
                             Sampling(max_new_tokens=self.max_new_tokens), label="held-out pass@1",
                             synced_gpus=world > 1)
        model.train(was_training)
        print(f"held-out pass@1 at step {step}: rank {rank} sampled {len(mine)} of {len(self.prompts)} prompts",
              flush=True)
        measured = [(grade(final_answer(s.text), self.records[i]), s.tokens) for i, (s,) in zip(mine, samples)]
        if world > 1:
            shares = [None] * world
            torch.distributed.all_gather_object(shares, measured)
            measured = [m for share in shares for m in share]
        self.log.write(step, **{"heldout/pass@1": mean(c for c, _ in measured),
                                "heldout/mean_length": mean(t for _, t in measured)})


VLLM_FIELDS = ("vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_server_host",
               "vllm_server_port")


def grpo_arguments(cfg: GRPOSection, spec: StageSpec, device: str) -> GRPOConfig:
    """TRL's GRPO config for a stage; rollouts by TRL's vLLM integration when the profile asks
    (no generation code of r1flow's own on that path)."""
    vllm = {"use_vllm": True, **{name: getattr(cfg, name) for name in VLLM_FIELDS},
            "vllm_max_model_length": spec.vllm.get("max_model_len")} if cfg.use_vllm else {}
    return GRPOConfig(
        **trl_arguments(cfg, spec, device),
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=cfg.top_p, beta=cfg.beta, epsilon=cfg.epsilon,
        loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        reward_weights=[cfg.rewards[n] for n in cfg.rewards], **vllm,
    )


def weight_sync(history: list[dict]) -> dict:
    """With vLLM rollouts: how far vLLM's log-probs of its own samples were from the trained policy's
    (|difference| per token; the worst step's mean, and the largest of all). vLLM samples from the
    weights TRL pushed to it at that step: near zero says they arrived at every step (fp32 on this
    CPU: under 1e-6), stale weights widen it (1e-2 after 3 steps without a push). bf16 engines
    differ from the trainer's numerics by more, even in sync."""
    gap = "sampling/sampling_logp_difference/"
    rows = [row for row in history if f"{gap}mean" in row]
    if not rows:
        return {}
    return {"vllm_logp_gap_mean": max(row[f"{gap}mean"] for row in rows),
            "vllm_logp_gap_max": max(row[f"{gap}max"] for row in rows)}


def lora_config(cfg: GRPOSection):
    """peft's LoRA on every linear layer when the profile asks for it (``lora_r``), else None."""
    if not cfg.lora_r:
        return None
    from peft import LoraConfig  # seconds to import; full fine-tuning never needs it

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, target_modules="all-linear",
                      lora_dropout=0.0, task_type="CAUSAL_LM")


def run(spec: StageSpec) -> dict:
    cfg = GRPOSection(**spec.config)
    seed_everything(spec.seed)
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(spec.inputs["model"], padding_side="left")
    names = list(cfg.rewards)
    args = grpo_arguments(cfg, spec, device)
    if cfg.use_vllm:
        colocate_settings(spec.vllm, device, spec.precision)
    trainer = GRPOTrainer(
        model=load_model(spec.inputs["model"], device, for_training=True), args=args, processing_class=tokenizer,
        peft_config=lora_config(cfg),
        reward_funcs=[REWARDS[n] for n in names],
        train_dataset=prompt_dataset(load_jsonl(spec.inputs["data"]), tokenizer, spec.prompt_template),
        callbacks=callbacks(spec),
    )
    heldout = load_jsonl(spec.inputs["heldout"]) if spec.inputs.get("heldout") else []
    if heldout and cfg.heldout_every:
        log = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainerLog))
        trainer.add_callback(HeldOutPass(heldout, tokenizer, spec.prompt_template, cfg.heldout_every,
                                         cfg.max_completion_length, spec.seed, log))
    resumed = train_resumable(trainer, spec)
    history = trainer.state.log_history
    result = {**save_trained(trainer, tokenizer, spec.output / "model"), "steps": trainer.state.global_step,
              "resumed_from_step": resumed,
              **loss_summary(history, "reward"),
              **loss_summary(history, "completions/mean_length"), **weight_sync(history)}
    write_result(spec.output, result)
    return result


if __name__ == "__main__":
    main(run)
