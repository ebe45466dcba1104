"""Rule-based rewards and graders: the R1 recipe's only teachers.

Every reward has TRL's reward signature ``(completions, **columns) -> list[float | None]`` and
returns ``None`` for a sample it cannot verify. Records carry ``task`` (``addition``,
``countdown``, ``gsm8k``, ``math``, ``reasoning_gym``), ``answer`` (the gold answer as text), for
Countdown ``numbers``, and for reasoning-gym ``entry`` (the generated item its verifier reads).
Completions follow R1's output format::

    <think> reasoning </think>
    <answer> final answer </answer>

Accuracy counts only the one answer a completion commits to (``final_answer``); math answers
are graded by ``components.grading``, bounded in time and refusing calculations for answers.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Sequence

from components import gym
from components.grading import committed, math_correct, math_parses

R1_FORMAT = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TAG = re.compile(r"</?(think|answer)>")
TASKS = ("addition", "countdown", "gsm8k", "math", gym.TASK)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MATH_TASKS = ("gsm8k", "math")


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>`` tag, stripped; None when there is none."""
    found = ANSWER_TAG.findall(completion)
    return found[-1].strip() if found else None


def last_number(completion: str) -> str | None:
    """The last number anywhere in a completion: lenient grading, which tells a model that
    computes right but ignores the format from one that computes wrong."""
    found = NUMBER.findall(completion.replace(",", ""))
    return found[-1] if found else None


def lenient_answer(completion: str, gold: str) -> str | None:
    """What lenient grading reads: the last number when the gold is a number, else the ``<answer>``
    (a last number says nothing of an equation or a LaTeX fraction)."""
    return last_number(completion) if NUMBER.fullmatch(gold.replace(",", "").strip()) else extract_answer(completion)


def final_answer(completion: str) -> str | None:
    """The one answer a completion commits to, stripped; None when it hedges or hides it.

    Exactly one ``<answer>`` tag, outside any ``<think>`` and last in the completion, holding at
    most one distinct ``\\boxed`` value. ``extract_answer`` stays lenient for evaluation records.
    """
    if completion.count("<answer>") != 1 or completion.count("</answer>") != 1:
        return None  # several answers: a hedge
    head, _, rest = completion.partition("<answer>")
    inner, _, tail = rest.partition("</answer>")
    if tail.strip() or "think>" in rest:
        return None  # text after the answer, or the answer sits inside <think>
    if head.rfind("<think>") > head.rfind("</think>"):
        return None  # the answer tag opens inside an unclosed <think>
    return inner.strip() if committed(inner) else None


def _integer(text: str) -> int | None:
    text = text.strip().replace(",", "").removeprefix("$").removesuffix(".")
    return int(text) if re.fullmatch(r"-?\d+", text) else None


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _countdown_value(expression: str, numbers: Sequence[int]) -> float | None:
    """Value of an arithmetic expression that uses each of ``numbers`` at most once, else None."""
    if not re.fullmatch(r"[\d\s+\-*/()]+", expression):
        return None
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    used: list[int] = []

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            used.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("unsupported expression")

    try:
        result = value(tree)
    except (ValueError, ZeroDivisionError):
        return None
    pool = list(numbers)
    for n in used:
        if n not in pool:
            return None
        pool.remove(n)
    return result


def is_correct(prediction: str | None, answer: str, task: str, numbers: Sequence[int] | None = None,
               entry: str | None = None) -> bool:
    """Grade one extracted prediction against the gold answer of its task (reasoning-gym: its
    task's own verifier on the generated ``entry``)."""
    if prediction is None or not prediction.strip():
        return False
    if task == "addition":
        return _integer(prediction) is not None and _integer(prediction) == _integer(answer)
    if task == "countdown":
        got = _countdown_value(prediction, numbers or [])
        return got is not None and abs(got - float(answer)) < 1e-9
    if task in MATH_TASKS:
        return math_correct(prediction, answer)
    if task == gym.TASK:
        return entry is not None and gym.score(prediction, entry) == 1.0
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def gold_parses(answer: str, task: str, entry: str | None = None) -> bool:
    """Whether a gold answer can be graded at all (checked by the data validation suites);
    reasoning-gym's verifier must accept its own gold answer."""
    if task in ("addition", "countdown"):
        return _integer(answer) is not None
    if task in MATH_TASKS:
        return math_parses(answer)
    if task == gym.TASK:
        return is_correct(answer, answer, task, entry=entry)
    return False


def grade(prediction: str | None, record: dict) -> bool:
    """``is_correct`` for a prompt record, whatever columns its task needs."""
    return is_correct(prediction, record["answer"], record["task"], record.get("numbers"), record.get("entry"))


def accuracy_reward(completions: list[str], answer: list[str], task: list[str], **kwargs) -> list[float | None]:
    """1.0 when the completion's one final answer is right, else 0.0 (None: task unknown)."""
    numbers = kwargs.get("numbers") or [None] * len(completions)
    entries = kwargs.get("entry") or [None] * len(completions)
    rewards: list[float | None] = []
    for completion, gold, kind, nums, entry in zip(completions, answer, task, numbers, entries):
        if kind not in TASKS:
            rewards.append(None)
            continue
        rewards.append(float(is_correct(final_answer(completion), gold, kind, nums, entry)))
    return rewards


def well_formed(completion: str) -> bool:
    """Exactly one ``<think>…</think>`` followed by one ``<answer>…</answer>``, nothing around them."""
    match = R1_FORMAT.match(completion)
    return match is not None and not any(TAG.search(part) for part in match.groups())


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """R1's format reward: 1.0 for a well-formed completion, else 0.0."""
    return [float(well_formed(c)) for c in completions]


def language_reward(completions: list[str], **kwargs) -> list[float]:
    """R1's language-consistency reward: share of the reasoning's letters in the target script.

    The target is English (ASCII letters); reasoning with no letters is consistent by default.
    """
    rewards = []
    for completion in completions:
        match = R1_FORMAT.match(completion)
        thought = match.group(1) if match else completion
        letters = [c for c in thought if c.isalpha()]
        rewards.append(sum(c.isascii() for c in letters) / len(letters) if letters else 1.0)
    return rewards


REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "language": language_reward}
