import json
from pathlib import Path

import pytest
import yaml

from components.config import ConfigError, Profile, load_profile, plain_template
from components.modeling import build_tiny_tokenizer, render_prompt

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
GSM8K = Path(__file__).parents[1] / "sources" / "gsm8k" / "test.jsonl.gz"


def _set_in(raw: dict, keys: tuple = ()):
    """(keys, value) for every value a profile file sets: an empty mapping is a value too."""
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from _set_in(value, (*keys, key))
        else:
            yield (*keys, key), value


def test_every_shipped_profile_is_checked():
    assert {"default.yaml", "micro.yaml"} <= {p.name for p in CONFIGS}  # the glob below finds the profiles


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_profile_loads_with_the_values_its_file_sets(path):
    """Every value the file sets is the loaded profile's: none dropped, renamed or changed on the way."""
    raw = yaml.safe_load(path.read_text())
    profile = load_profile(path)
    assert isinstance(profile, Profile) and raw and profile.name == raw["name"]
    loaded = profile.model_dump(mode="json")
    differs = {}
    for keys, value in _set_in(raw):
        found = loaded
        for key in keys:
            found = found.get(key, "<missing>") if isinstance(found, dict) else "<missing>"
        if isinstance(value, str) and isinstance(found, float):  # YAML 1.1 reads 5e-5 as a string
            value = float(value)
        if found != value:
            differs[".".join(keys)] = (value, found)
    assert not differs, differs


def test_accelerate_configs_are_deepspeed_launch_files():
    files = sorted(Path(__file__).parents[1].glob("configs/accelerate/*.yaml"))
    assert files
    for path in files:
        launch = yaml.safe_load(path.read_text())
        assert launch["distributed_type"] == "DEEPSPEED" and launch["deepspeed_config"]["zero_stage"] in (2, 3)
        profile = load_profile(None, ["runtime.launcher=accelerate", f"runtime.accelerate_config={path}"])
        assert profile.runtime.accelerate_config == path


def test_overrides_apply_typed_values():
    profile = load_profile(None, ["grpo.learning_rate=5e-5", "grpo.rewards={accuracy: 1.0}", "seed=3"])
    assert profile.grpo.learning_rate == 5e-5 and profile.grpo.rewards == {"accuracy": 1.0} and profile.seed == 3


@pytest.mark.parametrize(("overrides", "message"), [
    (["grpo.lr=1"], "grpo.lr: unknown key"),
    (["grpo.learning_rate=fast"], "grpo.learning_rate: Input should be a valid number"),
    (["grpo.rewards={speed: 1}"], "unknown reward(s) ['speed']"),
    (["grpo.trl_args={not_a_trl_arg: 1}"], "grpo.trl_args.not_a_trl_arg: not an argument of trl.GRPOConfig"),
    (["grpo.num_generations=3"], ("grpo: a generation batch of 16 completions (per_device_train_batch_size 16 x 1 "
                                  "processes x steps per generation) does not hold whole groups of num_generations 3")),
    (["runtime.launcher=accelerate", "runtime.accelerate_config=configs/accelerate/zero2.yaml", "runtime.device=cpu",
      "runtime.machines=2", "final_rl.per_device_train_batch_size=3"], "final_rl: a generation batch of 6"),
    (["runtime.machines=2"], "machines and processes_per_machine size an accelerate launch; set launcher: accelerate"),
    (["final_rl.lora_alpha=32"], "final_rl: lora_alpha scales a LoRA adapter, and lora_r is 0"),
    (["data.source=gsm8k"], "needs train_path and test_path"),
    (["data.source=gsm8k", "data.train_path=/nowhere.jsonl", "data.test_path=/nowhere.jsonl"],
     "data: train_path: file not found: /nowhere.jsonl"),
    (["data.source=file", f"data.train_path={GSM8K}", f"data.test_path={GSM8K}"], "source 'file' needs task"),
    (["data.source=file", "data.task=math", f"data.train_path={GSM8K}", f"data.test_path={GSM8K}",
      "data.answer_format=boxed", "data.columns={question: question}"], "columns needs question and solution"),
    (["data.source=file", "data.task=gsm8k", f"data.train_path={GSM8K}", f"data.test_path={GSM8K}",
      "data.columns={question: question, answer: answer}"], "task 'gsm8k' needs answer_format: hash"),
    (["data.source=gsm8k", f"data.train_path={GSM8K}", f"data.test_path={GSM8K}", "data.answer_format=plain"],
     "source 'gsm8k' has its own columns and answer format; to map a file's columns yourself set source: file"),
    (["data.source=gsm8k", f"data.train_path={GSM8K}", "data.test_path=README.md"],
     "README.md: not a format the importer reads; use .jsonl, .json, .csv (each also .gz), .parquet, .arrow"),
    (["base.source=gguf", "base.path=/nowhere"], "needs gguf_file"),
    (["base.pretrain_steps=100"], "pretrain_ema 0.995 averages over ~200 steps, more than pretrain_steps 100"),
    (["rejection_sampling.top_p=1.5"], "rejection_sampling.top_p: Input should be less than or equal to 1"),
    (["rejection_sampling.temperature=0"], "rejection_sampling.temperature: Input should be greater than 0"),
    (["nonsense"], "expected key=value"),
])
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_profile(None, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_group_check_is_trls_rule(tmp_path):
    """Whole prompt groups in a generation batch over all processes: a per-device batch may be
    smaller than the group, as TRL allows."""
    from trl import GRPOConfig

    launch = ["runtime.launcher=accelerate", "runtime.accelerate_config=configs/accelerate/zero2.yaml"]
    profile = load_profile(None, [*launch, "runtime.device=cpu", "runtime.processes_per_machine=2",
                                  "grpo.per_device_train_batch_size=4", "grpo.num_generations=8"])
    assert profile.grpo.generation_batch(2) == 8
    # on GPUs the process count is the worker's: the profile loads, and TRL checks when the stage starts
    assert load_profile(None, [*launch, "runtime.device=cuda", "grpo.per_device_train_batch_size=3"])
    one = load_profile(None, ["grpo.per_device_train_batch_size=4", "grpo.num_generations=2",
                              "grpo.gradient_accumulation_steps=3"]).grpo
    trl = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=2,
                     gradient_accumulation_steps=3)
    assert one.generation_batch(1) == trl.generation_batch_size == 12


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_profile(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("grpo: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(tmp_path / "bad.yaml")


def test_a_file_source_with_a_column_mapping_loads(tmp_path):
    (tmp_path / "qa.csv").write_text("q,a\nWhat is 1 + 2?,3\n")
    profile = load_profile(None, ["data.source=file", "data.task=math", "data.answer_format=plain",
                                  f"data.train_path={tmp_path / 'qa.csv'}", f"data.test_path={tmp_path / 'qa.csv'}",
                                  "data.columns={question: q, answer: a}"])
    assert profile.data.columns == {"question": "q", "answer": "a"} and profile.data.task == "math"


def test_a_worked_example_turn_in_the_prompt_template(tmp_path):
    turns = [{"role": "user", "content": "2 + 2 = ?"}, {"role": "assistant", "content": "<answer>4</answer>"},
             {"role": "user", "content": "{question} Braces {stay}."}]
    config = tmp_path / "p.yaml"
    config.write_text(json.dumps({"prompt_template": turns}))
    profile = load_profile(config)
    assert plain_template(profile) == turns
    text = render_prompt(build_tiny_tokenizer(), "3 + 5 = ?", plain_template(profile))
    assert text == ("<|im_start|>user\n2 + 2 = ?<|im_end|>\n<|im_start|>assistant\n<answer>4</answer><|im_end|>\n"
                    "<|im_start|>user\n3 + 5 = ? Braces {stay}.<|im_end|>\n<|im_start|>assistant\n")
    # the old single-string template renders as before
    assert render_prompt(build_tiny_tokenizer(), "q", "{question}") == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")
    config.write_text(json.dumps({"prompt_template": turns[:2]}))
    missing = r"prompt_template must contain \{question\} \(in its last turn, a user turn\)"
    with pytest.raises(ConfigError, match=missing):
        load_profile(config)
