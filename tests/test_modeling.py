import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from components.modeling import REASONING_TAGS, build_tiny_tokenizer, load_model, render_prompt

TEXT = "<|im_start|>user\nWhat is 12 + 3?  \tx é\n<|im_end|>\n<think>\n2+3=5\n</think>\n<answer>15</answer><|im_end|>"


def test_tiny_tokenizer_round_trips_through_autotokenizer(random_model):
    reloaded = AutoTokenizer.from_pretrained(random_model)  # how vLLM and users load it
    ids = reloaded(TEXT, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == TEXT  # spaces, tabs, newlines and UTF-8 survive
    assert ids == build_tiny_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]


def test_reasoning_tags_are_single_tokens_that_survive_skip_special_tokens(random_model):
    tokenizer = AutoTokenizer.from_pretrained(random_model)
    for tag in REASONING_TAGS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer("<think>\n1\n</think>\n<answer>1</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>\n1\n</think>\n<answer>1</answer>"


def test_chat_template_renders_chatml(random_model):
    tokenizer = AutoTokenizer.from_pretrained(random_model)
    assert render_prompt(tokenizer, "What is 1 + 2?", "Q: {question}") == (
        "<|im_start|>user\nQ: What is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_saved_model_is_safetensors_and_loads_without_remote_code(random_model):
    assert (random_model / "model.safetensors").exists()
    assert not list(random_model.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(random_model, trust_remote_code=False)
    assert model.config.model_type == "qwen2"


@pytest.mark.gpu
def test_on_gpu_training_keeps_fp32_master_weights_and_generation_runs_bf16(random_model):
    assert load_model(random_model, "cuda", for_training=True).dtype == torch.float32  # trainer autocasts
    assert load_model(random_model, "cuda").dtype == torch.bfloat16


def test_auto_precision_takes_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch):
    from components import modeling
    from components.vllm_engine import dtype

    def cpu(capability: str, bf16_instructions: bool) -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_instructions)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)

    cpu("AVX2", False)
    assert not modeling.use_bf16("cpu", "auto") and dtype({}, "cpu", "auto") == "float32"
    assert modeling.use_bf16("cpu", "bf16") and dtype({}, "cpu", "bf16") == "float32"  # vLLM crawls: never
    cpu("AVX512", False)  # AVX512 without its bf16 instructions
    assert not modeling.use_bf16("cpu", "auto")
    cpu("AVX512", True)
    assert modeling.use_bf16("cpu", "auto") and dtype({}, "cpu", "auto") == "bfloat16"
    assert not modeling.use_bf16("cpu", "fp32") and dtype({}, "cpu", "fp32") == "float32"
    assert modeling.use_bf16("cuda", "auto") and dtype({}, "cuda", "auto") == "auto"


def test_on_cpu_in_fp32_everything_loads_fp32_and_training_always_does(random_model):
    assert load_model(random_model, "cpu", precision="fp32").dtype == torch.float32
    assert load_model(random_model, "cpu", for_training=True, precision="bf16").dtype == torch.float32  # autocast
