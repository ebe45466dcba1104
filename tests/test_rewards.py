from components.rewards import (
    accuracy_reward,
    extract_answer,
    format_reward,
    gold_parses,
    is_correct,
    language_reward,
)

GOOD = "<think>\n8+5=13\n7+6+1=14\n</think>\n<answer>143</answer>"


def test_accuracy_reward_grades_each_task():
    completions = [GOOD, GOOD.replace("143", "142"), "<answer>\\frac{1}{2}</answer>", "<answer>(100-93)+30</answer>"]
    rewards = accuracy_reward(completions, answer=["143", "143", "0.5", "37"],
                              task=["addition", "addition", "math", "countdown"],
                              numbers=[None, None, None, [30, 100, 93]])
    assert rewards == [1.0, 0.0, 1.0, 1.0]


def test_accuracy_reward_is_none_for_unknown_task():
    assert accuracy_reward([GOOD], answer=["143"], task=["chess"]) == [None]


def test_countdown_rejects_reused_or_foreign_numbers():
    assert not is_correct("100-93+30+30", "67", "countdown", [30, 100, 93])
    assert not is_correct("100-93+7", "14", "countdown", [30, 100, 93])
    assert not is_correct("__import__('os')", "1", "countdown", [1])


def test_format_reward_requires_one_think_then_one_answer():
    bad = ["<answer>143</answer>", "<think>a</think>", "<think>a<think>b</think><answer>1</answer>",
           "<think>a</think><answer>1</answer> trailing", "<think>a</think><answer>1</think></answer>",
           "<think>a</think><answer>1</answer></answer>", "<think>a</think></think><answer>1</answer>"]
    assert format_reward([GOOD, *bad]) == [1.0] + [0.0] * len(bad)


def test_language_reward_is_share_of_target_script_letters():
    assert language_reward(["<think>carry один</think><answer>1</answer>"]) == [5 / 9]
    assert language_reward([GOOD]) == [1.0]


def test_extract_answer_takes_the_last_tag():
    assert extract_answer("<answer>1</answer> <answer> 2 </answer>") == "2"
    assert extract_answer("no tags") is None


def test_gold_parses():
    assert gold_parses("143", "addition") and gold_parses("\\frac{1}{2}", "math")
    assert not gold_parses("abc", "addition")
