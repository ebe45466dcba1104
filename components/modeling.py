"""Models and tokenizers: the built-in tiny tokenizer, loading, prompt rendering, devices.

Every model r1flow writes is a Hugging Face folder (safetensors, tokenizer, chat template) that
``AutoModelForCausalLM.from_pretrained`` and vLLM load without ``trust_remote_code``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

# ChatML, the template Qwen2 and SmolLM2 use, so the tiny base reads prompts like real models do.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REASONING_TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with no merges: one token per byte, plus ChatML and R1 tags.

    It is a genuine Qwen2-style tokenizer, so ``AutoTokenizer`` rebuilds it faithfully (a plain
    character-level vocabulary came back without spaces and newlines). R1 tags are single non-special
    tokens so they survive ``skip_special_tokens``.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.add_tokens(REASONING_TAGS)
    tokenizer.chat_template = CHATML
    return tokenizer


def pick_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device is 'cuda' but no CUDA GPU is visible; set runtime.device=cpu")
    return requested


# Weight formats that are Python pickles: loading one can run any code its author put in it.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_folder(path: str | Path) -> None:
    """Refuse a local model folder that loading would have to run code from: remote code named
    by ``auto_map``, or weights only as pickles. Checked on the files alone, before transformers
    reads anything; a hub id (no such folder) is left to ``from_pretrained``'s own refusals."""
    folder = Path(path)
    if not folder.is_dir():
        return
    for name in ("config.json", "tokenizer_config.json"):
        settings = _json_object(folder / name)
        if settings.get("auto_map"):
            raise ValueError(f"model folder {folder}: {name} has 'auto_map', code of its own "
                             f"({', '.join(sorted(settings['auto_map']))}); r1flow never runs a "
                             "model's own code: use a model whose architecture transformers ships")
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise ValueError(f"model folder {folder}: {found}; r1flow loads safetensors only "
                         "(unpickling can run code): convert the weights to safetensors")


def _json_object(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")  # noqa: TRY004 - bad input, not a bug
    return value


def load_tokenizer(path: str | Path, padding_side: str = "left") -> PreTrainedTokenizerBase:
    check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side=padding_side,
                                              trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Elsewhere torch emulates it:
    a forward and backward pass of SmolLM2-135M on 16 x 100 tokens took 22 s in fp32 and over
    225 s under bf16 autocast on an AVX2-only CPU, and vLLM 16 s for 4 tokens."""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):  # the kernels torch picked
        return False
    cpu = torch.cpu  # which AVX512 CPU: not every one has the bf16 instructions
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def use_bf16(device: str, precision: str = "auto") -> bool:
    """``runtime.precision`` resolved: bf16 when asked; by default on a GPU, and on a CPU that
    computes bf16 natively (``native_bf16``)."""
    return precision == "bf16" or (precision == "auto" and (device == "cuda" or (device == "cpu" and native_bf16())))


def load_model(path: str | Path, device: str = "cpu", for_training: bool = False, precision: str = "auto",
               dtype: str | torch.dtype | None = None):
    """A model from safetensors. Training keeps fp32 master weights (the trainer's ``bf16`` autocasts;
    bf16 weights would lose small AdamW updates); generation runs in bf16 where ``use_bf16``.
    ``dtype``: that one instead ("auto": the dtype its config names)."""
    check_model_folder(path)
    if dtype is None:
        dtype = torch.bfloat16 if use_bf16(device, precision) and not for_training else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=dtype,
                                                trust_remote_code=False).to(device)


def render_prompt(tokenizer: PreTrainedTokenizerBase, question: str,
                  template: str | list[dict] = "{question}") -> str:
    """The text a model sees for a question: the profile's template inside the chat template. A
    template of chat turns (a worked example, say) puts the question into its last, a user turn."""
    turns = [{"role": "user", "content": template}] if isinstance(template, str) else template
    # str.replace, not format: an example's own braces (sets, LaTeX) stay as written
    *examples, last = turns
    messages = [*examples, {**last, "content": last["content"].replace("{question}", question)}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "


def save_model(model, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """Save as a Hugging Face folder: safetensors weights, config, tokenizer, chat template."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
