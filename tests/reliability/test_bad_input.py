"""Bad input: broken, mistyped, empty, duplicated, oversized or foreign-encoded data files; model
folders that would run code when loaded; a truncated GGUF; registry references that do not exist
or climb out of the workspace. Each is refused in one line that names the file, the line or
field and what to change, before anything trains, and without a traceback."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import small_gguf

from components.config import load_profile
from components.sections import ModelConfig
from flows.keys import inputs_of
from flows.recipe import recipe_step
from flows.stages import StageFailed, run_stage

PROJECT = Path(__file__).resolve().parents[2]
MICRO = PROJECT / "configs" / "micro.yaml"
CLI = [sys.executable, "-m", "flows.cli"]

GOOD = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 5 boxes?",
     "answer": "6 * 5 = 30\n#### 30"},
    {"question": "Sam reads 12 pages a day for 3 days. How many pages does he read?",
     "answer": "12 * 3 = 36\n#### 36"},
]
TEST = [{"question": "Ann walks 2 km each morning and 3 km each evening. How far in a day?",
         "answer": "2 + 3 = 5\n#### 5"}]


def _lines(path: Path, rows: list) -> Path:
    """Rows as JSONL; a str row is written as it is (a deliberately broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# Stages run as plain `python -m components.<stage>` processes (as on a GPU worker): the warm fork
# server would preload every stage's imports, and restarts whenever a component's source changes.
PLAIN = f"runtime.stage_python={sys.executable}"


def _cpu(*overrides: str):
    return load_profile(MICRO, ["runtime.device=cpu", PLAIN, *overrides])


def _profile(train: Path, test: Path, *overrides: str):
    return _cpu("data.source=gsm8k", f"data.train_path={train}", f"data.test_path={test}",
                "data.n_validation=0", *overrides)


def _run_data(profile, workspace: Path) -> Path:
    """The data stage as the pipeline runs it: its own process, its inputs keyed by content."""
    inputs = inputs_of(recipe_step("data"), {}, profile)
    return run_stage("data", "data", profile.data, inputs, profile, workspace).folder


def _refused(profile, workspace: Path, name: str = "data", config=None) -> str:
    """Run a stage that must fail on its input: its one-line message, nothing left behind."""
    with pytest.raises(StageFailed) as failed:
        if name == "data":
            _run_data(profile, workspace)
        else:
            run_stage(name, name, config, {}, profile, workspace)
    message = str(failed.value)
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert message.startswith(f"stage {name!r}: ") and "(log: " in message
    stages = workspace / "stages" / name
    assert not stages.exists() or list(stages.iterdir()) == []  # no output, no scratch left behind
    return message


def _data_refusal(tmp_path: Path, train_rows: list | None = None,
                  test_rows: list | None = None) -> str:
    train = _lines(tmp_path / "train.jsonl", GOOD if train_rows is None else train_rows)
    test = _lines(tmp_path / "test.jsonl", TEST if test_rows is None else test_rows)
    return _refused(_profile(train, test), tmp_path / "ws")


# --- 13-17: the data stage refuses a broken training or test file -----------------------------


def test_a_malformed_json_line_is_refused_naming_file_and_line(tmp_path):
    """A training file with a malformed JSON line stops the data stage with one line naming the
    file and the line and saying each line must be one JSON object; no stage folder is left."""
    broken = '{"question": "How many?", "answer": oops}'
    message = _data_refusal(tmp_path, [GOOD[0], broken, GOOD[1]])
    assert f"{tmp_path / 'train.jsonl'}, line 2: invalid JSON" in message
    assert "each line must be one JSON object" in message


def test_a_missing_field_is_refused_naming_file_line_and_field(tmp_path):
    """A test-file row without its 'answer' field stops the data stage with one line naming the
    file, the line and the field to add; no stage folder is left."""
    message = _data_refusal(tmp_path, test_rows=[TEST[0], {"question": "What is 2 + 2?"}])
    test = tmp_path / "test.jsonl"
    assert f"{test}, line 2: missing required field 'answer'; add it to the line" in message


def test_a_question_of_the_wrong_type_is_refused_naming_the_field_and_its_type(tmp_path):
    """A training row whose question is a number, and one whose question is a list, each stop the
    data stage with one line naming the file, line and field and asking for a JSON string."""
    for bad, kind in ((42, "number"), (["What is", "2 + 2?"], "array")):
        message = _data_refusal(tmp_path, [GOOD[0], {"question": bad, "answer": "#### 4"}])
        assert (f"{tmp_path / 'train.jsonl'}, line 2: field 'question' must be non-empty text, "
                f"got a JSON {kind}; write it as a JSON string") in message


def test_a_file_with_no_rows_is_refused_naming_the_file(tmp_path):
    """An empty test file (blank lines only) stops the data stage with one line naming the file
    and saying it needs one JSON object per line; no stage folder is left."""
    message = _data_refusal(tmp_path, test_rows=["", "  "])
    assert f"{tmp_path / 'test.jsonl'}: no rows" in message
    assert "one JSON object per line" in message


def test_duplicate_prompts_are_refused_naming_both_lines(tmp_path):
    """A training file that repeats a question (with another answer) stops the data stage with one
    line naming the file, the repeating line and the first one, and asking to remove one."""
    message = _data_refusal(tmp_path, [GOOD[0], GOOD[1], {**GOOD[0], "answer": "#### 8"}])
    assert (f"{tmp_path / 'train.jsonl'}, line 3: duplicate prompt (same question as line 1); "
            "remove one of the two lines") in message


def test_the_cli_reports_a_bad_data_file_in_one_line_without_traceback(tmp_path):
    """`r1flow run` on a training file whose question is a list exits 1 printing one `pipeline
    failed:` line naming the file and line, no traceback, and trains nothing."""
    _lines(tmp_path / "train.jsonl", [GOOD[0], {"question": ["a", "list"], "answer": "#### 1"}])
    _lines(tmp_path / "test.jsonl", TEST)
    settings = ["runtime.device=cpu", "data.source=gsm8k", "data.train_path=train.jsonl",
                "data.test_path=test.jsonl", "data.n_validation=0"]
    done = subprocess.run([*CLI, "run", "-c", str(MICRO), *(f"--set={s}" for s in settings)],
                          cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    failed = [line for line in output.splitlines() if "pipeline failed" in line]
    assert len(failed) == 1, output
    assert re.search(r"pipeline failed: stage 'data': train\.jsonl, line 2: field 'question' must "
                     r"be non-empty text, got a JSON array; write it as a JSON string \(log: .*\)$",
                     failed[0]), failed[0]
    assert list((tmp_path / ".r1flow" / "stages").glob("*/*")) == []  # no stage output, no scratch


# --- 18-19: what passes the import is decontaminated and validated ---------------------------


def test_a_test_prompt_in_the_training_file_is_removed_from_training_and_counted(tmp_path):
    """A training prompt that is also a test prompt is dropped from train.jsonl by decontamination,
    and the data stage's result counts it (decontaminated: 1)."""
    train = _lines(tmp_path / "train.jsonl", [*GOOD, TEST[0]])
    test = _lines(tmp_path / "test.jsonl", TEST)
    folder = _run_data(_profile(train, test), tmp_path / "ws")
    result = json.loads((folder / "result.json").read_text())
    assert result["decontaminated"] == 1 and result["train"] == len(GOOD) and result["test"] == 1
    kept = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert sorted(r["question"] for r in kept) == sorted(r["question"] for r in GOOD)


def test_a_gold_answer_the_grader_cannot_parse_is_named_by_the_validation_suite(tmp_path):
    """A training row whose gold answer no grader can parse ('#### $') fails the prompts suite,
    whose message names the expectation, the row and its id, which carries the source line."""
    from components.validate import DataValidationError, validate_file

    ungradeable = {"question": "What does the pen cost?", "answer": "It costs\n#### $"}
    train = _lines(tmp_path / "train.jsonl", [GOOD[0], ungradeable, GOOD[1]])
    folder = _run_data(_profile(train, _lines(tmp_path / "test.jsonl", TEST)), tmp_path / "ws")
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    row = next(i for i, r in enumerate(rows) if r["answer"] == "$")
    with pytest.raises(DataValidationError) as failed:
        validate_file(folder / "train.jsonl", "prompts", name="gsm8k/train")  # as the flow does
    message = str(failed.value)
    assert len(message.splitlines()) == 1
    # id gsm8k-train-1: line 2 of train.jsonl, wherever the shuffle put it
    assert (f"expect_column_values_to_be_in_set(answer_parseable): rows [{row}] "
            "(ids ['gsm8k-train-1'])") in message


# --- 20: encoding and size ---------------------------------------------------------------------


def test_a_file_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path):
    """A training file with a Latin-1 byte on line 2 stops the data stage with one line naming the
    file, the line and the byte, and asking for UTF-8."""
    train = tmp_path / "train.jsonl"
    latin1 = b'{"question": "How much is the caf\xe9 bill?", "answer": "#### 4"}\n'
    train.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + latin1)
    message = _refused(_profile(train, _lines(tmp_path / "test.jsonl", TEST)), tmp_path / "ws")
    assert f"{train}, line 2: not UTF-8 (byte 0xe9 at offset 33); save the file as UTF-8" in message


PEAK = "peak-rss-kib "
# Runs the stage as `python -m ...` would and appends its peak resident memory to the stage log.
MEASURED_PYTHON = f"""#!{sys.executable}
import resource, subprocess, sys
code = subprocess.call([{sys.executable!r}, *sys.argv[1:]])
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("{PEAK}%d" % peak, file=sys.stderr, flush=True)
sys.exit(code)
"""


def _stage_peak_kib(tmp_path: Path, train: Path, test: Path, workspace: Path) -> tuple[str, int]:
    """Refuse a data file in a plain stage process, measured: its one-line message and its peak
    resident memory, KiB."""
    measured = tmp_path / "measured-python"
    measured.write_text(MEASURED_PYTHON)
    measured.chmod(0o755)
    profile = _profile(train, test, f"runtime.stage_python={measured}")
    message = _refused(profile, workspace)
    log = Path(re.search(r"\(log: (.*)\)$", message).group(1))
    return message, int(log.read_text().rsplit(PEAK, 1)[1].split()[0])


def test_a_100_mb_line_is_refused_in_one_line_with_bounded_memory(tmp_path):
    """A training file whose second line is 100 MB long stops the data stage with one line naming
    the file, the line and the size limit; the stage's peak memory stays within 64 MB of the same
    stage refusing a small bad file (reading the line whole would take over 200 MB)."""
    test = _lines(tmp_path / "test.jsonl", TEST)
    small = _lines(tmp_path / "small.jsonl", [GOOD[0], "{oops"])
    _, baseline = _stage_peak_kib(tmp_path, small, test, tmp_path / "ws-small")
    train = tmp_path / "train.jsonl"
    with train.open("w") as fh:
        fh.write(json.dumps(GOOD[0]) + '\n{"question": "')
        for _ in range(100):
            fh.write("x" * (1 << 20))
        fh.write('", "answer": "#### 1"}\n')
    message, peak = _stage_peak_kib(tmp_path, train, test, tmp_path / "ws")
    assert f"{train}, line 2: longer than 1048576 bytes, the limit for one record" in message
    print(f"data stage peak RSS: {peak / 1024:.0f} MiB for the 100 MB line, "
          f"{baseline / 1024:.0f} MiB for a small bad file")
    assert peak - baseline < 64 * 1024, (peak, baseline)


# --- 21-23: model files that would run code, or are cut short --------------------------------


class _Planted:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


QWEN2_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 300,
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                "num_attention_heads": 2, "num_key_value_heads": 2}


def _hf_base(folder: Path):
    return _cpu(), ModelConfig(source="hf", path=str(folder))


def test_a_model_folder_with_only_pickle_weights_is_refused_without_unpickling(tmp_path):
    """A model folder whose only weights are pytorch_model.bin is refused by the base stage in one
    line naming the folder and the file and asking for safetensors; the pickle, which would
    write a marker file when unpickled, is never loaded."""
    folder, marker = tmp_path / "pickled", tmp_path / "UNPICKLED"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN2_CONFIG))
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    pickle.loads((folder / "pytorch_model.bin").read_bytes())  # the plant works ...
    assert marker.exists()
    marker.unlink()  # ... and is reset
    profile, config = _hf_base(folder)
    message = _refused(profile, tmp_path / "ws", "base", config)
    assert (f"model folder {folder}: only pickle weights (pytorch_model.bin); r1flow loads "
            "safetensors only") in message
    assert not marker.exists()


def test_a_model_folder_asking_for_remote_code_is_refused_without_running_it(tmp_path):
    """A model folder whose config.json has auto_map (its own modeling code, which writes a marker
    file when imported) is refused by the base stage in one line naming the folder and auto_map;
    the code is never imported."""
    folder, marker = tmp_path / "remote", tmp_path / "IMPORTED"
    folder.mkdir()
    plant = f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
    (folder / "configuration_planted.py").write_text(
        plant + "from transformers import PretrainedConfig\n\n"
        "class PlantedConfig(PretrainedConfig):\n    model_type = 'planted'\n")
    (folder / "modeling_planted.py").write_text(plant)
    (folder / "config.json").write_text(json.dumps({
        **QWEN2_CONFIG, "model_type": "planted",
        "auto_map": {"AutoConfig": "configuration_planted.PlantedConfig",
                     "AutoModelForCausalLM": "modeling_planted.PlantedModel"}}))
    (folder / "model.safetensors").write_bytes(b"")
    profile, config = _hf_base(folder)
    message = _refused(profile, tmp_path / "ws", "base", config)
    assert (f"model folder {folder}: config.json has 'auto_map', code of its own (AutoConfig, "
            "AutoModelForCausalLM); r1flow never runs a model's own code") in message
    assert not marker.exists()


def test_a_truncated_gguf_file_is_refused_in_one_line(tmp_path):
    """A GGUF file cut inside its tensor data is refused by the base stage in one line naming the
    file, its size and the size its tensor table needs; one cut inside its metadata is refused
    naming the metadata key; the whole file passes the check."""
    from components.base import check_gguf

    whole = small_gguf(tmp_path / "whole.gguf").read_bytes()
    check_gguf(tmp_path / "whole.gguf")
    (tmp_path / "short.gguf").write_bytes(whole[:60])
    cut = (r"short\.gguf: GGUF file cut short \(60 bytes\) inside metadata "
           r"'general\.architecture'; download or copy it again")
    with pytest.raises(ValueError, match=cut):
        check_gguf(tmp_path / "short.gguf")
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(whole[:-100])
    config = ModelConfig(source="gguf", path=str(folder), gguf_file="model.gguf")
    message = _refused(_cpu(), tmp_path / "ws", "base", config)
    assert (f"{folder / 'model.gguf'}: GGUF file cut short: {len(whole) - 100} bytes, its tensors "
            f"need {len(whole)}; download or copy it again") in message


# --- 24: registry references -----------------------------------------------------------------


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cli_refusal(tmp_path: Path, *args: str) -> str:
    """Run an r1flow command that must fail in a fresh folder: its one line of output, once
    nothing outside its workspace (.r1flow) was written."""
    cwd = tmp_path / "project"
    cwd.mkdir(parents=True)
    (tmp_path / "x").mkdir()  # what `../x` would reach
    before = _tree(tmp_path)
    done = subprocess.run([*CLI, *args, "-c", str(MICRO)], cwd=cwd, capture_output=True,
                          text=True, check=False, timeout=300, env={**os.environ, "COLUMNS": "400"})
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output, output
    written = {p for p in _tree(tmp_path) - before if not p.startswith("project/.r1flow")}
    assert written == set(), written
    lines = [line for line in output.splitlines()
             if " failed: " in line or "expected NAME" in line]
    assert len(lines) == 1, output
    return lines[0]


def test_eval_of_a_registered_version_that_does_not_exist_fails_in_one_line(tmp_path):
    """`r1flow eval r1flow-missing/3` exits non-zero with one line saying there is no such
    registered version, no traceback, and writes nothing outside the workspace."""
    line = _cli_refusal(tmp_path, "eval", "r1flow-missing/3", "-b", "gsm8k")
    assert "eval failed: model 'r1flow-missing/3': no such registered version" in line


def test_eval_with_dotdot_in_a_registry_name_fails_in_one_line(tmp_path):
    """`r1flow eval ../x@champion` (a registry name climbing out of the workspace) exits non-zero
    with one line saying what a registry name is made of, and writes nothing outside the
    workspace."""
    line = _cli_refusal(tmp_path, "eval", "../x@champion", "-b", "gsm8k")
    assert "eval failed: model '../x@champion'" in line and "letters, digits" in line


def test_promote_of_a_version_that_does_not_exist_fails_in_one_line(tmp_path):
    """`r1flow promote r1flow-missing/3 --yes` exits non-zero with one line naming the missing
    version, no traceback, and writes nothing outside the workspace."""
    line = _cli_refusal(tmp_path, "promote", "r1flow-missing/3", "--yes")
    assert "promote failed: no registered model version r1flow-missing/3" in line


def test_promote_with_dotdot_in_the_name_or_version_fails_in_one_line(tmp_path):
    """`r1flow promote ../3` and `r1flow promote r1flow-r1-final/../3` each exit non-zero with one line
    (a name is letters, digits, '.', '-', '_'; a version is NAME/NUMBER) and write nothing outside
    the workspace."""
    line = _cli_refusal(tmp_path, "promote", "../3", "--yes")
    assert "promote failed: '..'/'3': a registered model name and version are letters" in line
    line = _cli_refusal(tmp_path / "again", "promote", "r1flow-r1-final/../3", "--yes")
    assert "version 'r1flow-r1-final/../3': expected NAME/VERSION" in line
