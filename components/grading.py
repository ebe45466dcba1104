"""Math answers graded by math-verify, bounded and hard to game.

    math_correct(prediction, gold)   # both reduced to their final expression, then compared
    math_parses(gold)                # whether a gold answer can be graded at all

A policy under RL finds any answer that math-verify is slow on (up to its 5 s timeout each, a
timeout that only works on the main thread) or lenient about. So an answer is reduced to its last
``\\boxed{…}``, refused unparsed when costly (``_too_costly``), and on the main thread bounded by a
CPU timer of our own; a calculation over numerals (``12 + 30`` for 42) is not an answer. Nothing
here echoes an answer into a log.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
from collections.abc import Callable
from itertools import pairwise

from math_verify import parse, verify

# Refusal caps, from the 500 MATH-500 gold answers (sources/math500/test.jsonl.gz) and from
# math-verify's parse times on this project's 2-core machine.
MAX_CHARS = 200  # ~4x the longest gold answer: 53 characters (a 3-vector pmatrix)
MAX_DEPTH = 4  # gold answers nest brackets 2 deep; parsing 8 nested parentheses took 0.55 s
MAX_GROUPS = 16  # gold answers open at most 5 brackets; a (…) holding 60 groups took 2.3 s
MAX_OPERAND = 9999  # allows 2^{2005}; 1000000! and 9^{999999999} each ran into the 5 s timeout
MAX_GROUP_POWER = 12  # (x+y+z)^{12} took 0.5 s to compare, (x+1)^{500} 1.7 s, (x+y+z)^{99} > 5 s
MAX_BOXES = 4  # distinct boxed texts compared by value; more is a hedge whatever they hold
GRADE_SECONDS = 0.8  # CPU seconds; the slowest MATH-500 gold answer grades in 0.35 s

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_OPERAND = re.compile(r"\\?[A-Za-z]+|\d+|.", re.DOTALL)
_DIGITS = re.compile(r"\d+")
_CLOSE = {"(": ")", "[": "]", "{": "}"}
_OPEN = {close: open_ for open_, close in _CLOSE.items()}


def _boxes(text: str) -> list[tuple[int, int, int]]:
    """``(command, start, end)`` of every closed ``\\boxed{…}`` (or ``\\fbox``): where the command
    starts and the span of its content, ordered by opening; one linear pass."""
    commands = {m.end(): m.start() for m in _BOX_OPEN.finditer(text)}
    boxes, stack, i = [], [], 0
    while commands and i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character: \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            stack.append(i + 1)
        elif ch == "}" and stack:
            start = stack.pop()
            if start in commands:
                boxes.append((commands[start], start, i))
        i += 1
    return sorted(boxes, key=lambda box: box[1])


def _differ(text: str, boxes: list[tuple[int, int, int]]) -> bool:
    """Whether the boxes hold different values: different text that the grader does not find
    equal ("055" and "\\textbf{(55)}", "1/2" and "0.5" are one value; "41" and "42" two).
    Reads at most MAX_BOXES + 1 distinct texts, so nested boxes cost a few slices, not one per
    level; more distinct texts, one too costly to parse, or a box inside a box (two answers in
    one: "\\boxed{41 \\boxed{42}}") count as different."""
    if any(inner < outer_end for (_, _, outer_end), (inner, _, _) in pairwise(boxes)):
        return True
    distinct: list[str] = []
    for _, start, end in boxes:
        value = " ".join(text[start:end].split())
        if value not in distinct:
            distinct.append(value)
            if len(distinct) > MAX_BOXES:
                return True
    if len(distinct) < 2:
        return False
    return any(_too_costly(value) for value in distinct) or not _one_value(tuple(distinct))


@functools.lru_cache(maxsize=256)
def _one_value(texts: tuple[str, ...]) -> bool:
    """Whether the grader finds every text equal to the first, within one GRADE_SECONDS budget.
    Cached: a completion's boxes are compared when its commitment is checked and again when it
    is graded, and the second look must not spend a second budget."""
    first, *others = texts
    return _bounded(lambda: all(_equivalent(first, value) for value in others)) is True


def _final_expression(text: str) -> str:
    """What to grade: the boxed value when there is one (a whole solution grades by its box), the
    stretch from the first box to the last when they differ (math-verify reads "\\boxed{1} or
    \\boxed{2}" as a set, which matches neither), else the whole text."""
    boxes = _boxes(text)
    if not boxes:
        return text.strip()
    if _differ(text, boxes):
        return text[boxes[0][0]:max(end for _, _, end in boxes) + 1].strip()
    _, start, end = boxes[-1]
    return text[start:end].strip()


def _group_end(text: str, i: int) -> int:
    """Index just past the bracket group opening at text[i] (len(text) when unclosed)."""
    depth, close = 0, _CLOSE[text[i]]
    for j in range(i, len(text)):
        depth += (text[j] == text[i]) - (text[j] == close)
        if depth == 0:
            return j + 1
    return len(text)


def _group_start(text: str, i: int) -> int:
    """Index of the bracket opening the group that closes at text[i] (0 when unopened)."""
    depth, opener = 0, _OPEN[text[i]]
    for j in range(i, -1, -1):
        depth += (text[j] == text[i]) - (text[j] == opener)
        if depth == 0:
            return j
    return 0


def _exponent(text: str, i: int) -> tuple[str, int]:
    """The operand of the ``^`` at text[i], and the index just past it."""
    j = i + 1
    while j < len(text) and text[j].isspace():
        j += 1
    if j < len(text) and text[j] in "({":
        end = _group_end(text, j)
        return text[j + 1:end - 1], end
    match = _OPERAND.match(text, j)
    return (match.group(), match.end()) if match else ("", j)


def _huge(operand: str, limit: int) -> bool:
    return any(int(n) > limit for n in _DIGITS.findall(operand))


def _costly_power(text: str) -> bool:
    """A tower (an exponent inside or right after an exponent), or a literal exponent so large
    that evaluating or expanding the power runs long."""
    text = text.replace("**", "^")
    for i in (i for i, ch in enumerate(text) if ch == "^"):
        operand, end = _exponent(text, i)
        if "^" in operand or text[end:].lstrip().startswith("^"):
            return True
        grouped = text[:i].rstrip().endswith((")", "]"))
        if _huge(operand, MAX_GROUP_POWER if grouped else MAX_OPERAND):
            return True
    return False


def _costly_factorial(text: str) -> bool:
    """A factorial of a factorial (``!!``, ``(5!)!``) or of a literal above MAX_OPERAND."""
    text = text.replace("\\!", "")  # LaTeX's negative thin space, as in "10,\!080"
    for i in (i for i, ch in enumerate(text) if ch == "!"):
        if text[i + 1:i + 2] == "!":
            return True
        head = text[:i].rstrip()
        if head.endswith((")", "]", "}")):
            operand = head[_group_start(head, len(head) - 1):]
        else:
            operand = re.search(r"\d*$", head).group()
        if "!" in operand or _huge(operand, MAX_OPERAND):
            return True
    return False


def _bracket_load(text: str) -> bool:
    depth = deepest = opened = 0
    for ch in text:
        if ch in "([{":
            depth, opened = depth + 1, opened + 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest > MAX_DEPTH or opened > MAX_GROUPS


def _too_costly(text: str) -> bool:
    """Whether math-verify might take long on this (reduced) answer: it is then graded wrong,
    unparsed. Cheap checks in this order: length first, so the others scan at most MAX_CHARS."""
    return (len(text) > MAX_CHARS or _bracket_load(text) or _costly_power(text)
            or _costly_factorial(text))


_NOISE = re.compile(r"\\[,!;: ]|\\left|\\right|\\\$|\$|\s")
_WORD_OPS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "÷": "/", "**": "^"}
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FRACTION = re.compile(r"[+-]?\(?[+-]?(\d+)\)?/\(?(\d+)\)?")


def _calculation(text: str) -> bool:
    """Whether text is arithmetic over numerals (``12 + 30``, ``2^{10}``) rather than a number.

    A lone fraction is a number unless it comes out whole (``\\frac{1}{2}`` is, ``84/2`` is not).
    """
    text = _NOISE.sub("", text)
    for word, op in _WORD_OPS.items():
        text = text.replace(word, op)
    while (replaced := _FRAC.sub(r"(\1)/(\2)", text)) != text:
        text = replaced
    text = text.replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[\d.,+\-*/^()]+", text):
        return False
    if fraction := _FRACTION.fullmatch(text):
        return int(fraction[2]) == 0 or int(fraction[1]) % int(fraction[2]) == 0
    return re.search(r"[\d.)][+\-*/^]", text) is not None


class _Overtime(BaseException):
    """The grading timer fired; a BaseException so math-verify's ``except Exception`` lets it by."""


def _expire(signum, frame):
    raise _Overtime


# One math-verify call at a time: its ANTLR parser shares prediction caches across threads, and
# the GIL runs them one at a time anyway.
_MATH_LOCK = threading.Lock()


@functools.cache
def _warm_up() -> None:
    """math-verify builds its parser on first use (~0.25 s CPU): done once, untimed, so the timer
    never cuts a right answer short or leaves a half-built parser."""
    verify(_math("\\frac{1}{2}"), _math("(1, 2)"), timeout_seconds=None)


def _bounded(fn: Callable, *args):
    """fn(*args); on the main thread None once it has used GRADE_SECONDS of CPU. Signals reach
    only the main thread, so elsewhere (or under another CPU timer) the refusals are the bound."""
    with _MATH_LOCK:
        _warm_up()
        if (threading.current_thread() is not threading.main_thread()
                or signal.getitimer(signal.ITIMER_PROF)[0] > 0):
            return fn(*args)
        previous = signal.signal(signal.SIGPROF, _expire)
        try:
            # CPU time, not wall time: on a busy machine a right answer still gets its full share.
            signal.setitimer(signal.ITIMER_PROF, GRADE_SECONDS)
            try:
                return fn(*args)
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)  # one shot: no signal can come after
        except _Overtime:
            return None
        finally:
            signal.signal(signal.SIGPROF, previous)


class _NoEcho(logging.Filter):
    """Keeps math-verify's log events, not the answers they quote (a policy's can be huge)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Timeout is disabled"):
            return False  # its timeouts are off on purpose: _bounded bounds it
        record.msg, record.args = message.partition(": ")[0], None  # "Error parsing: <answer>"
        record.exc_info = record.exc_text = None  # tracebacks quote the answer too
        return True


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoEcho())


def _math(text: str) -> list:
    # Bare strings parse wrongly: wrap them in $…$ unless already delimited. math-verify's own
    # timeouts use signal.alarm (whole seconds, main thread only): off, _bounded bounds it.
    delimited = re.search(r"(?<!\\)\$", text) is not None or "\\boxed" in text
    return parse(text if delimited else f"${text}$", parsing_timeout=None)


def _equivalent(gold: str, prediction: str) -> bool:
    return verify(_math(gold), _math(prediction), timeout_seconds=None)


def math_correct(prediction: str, answer: str) -> bool:
    """Whether a prediction means the gold answer; False, unparsed, for a costly or calculated one."""
    prediction, answer = _final_expression(prediction), _final_expression(answer)
    if _too_costly(prediction) or _too_costly(answer):
        return False
    if _calculation(prediction) and not _calculation(answer):
        return False  # "12 + 30" for 42: the prompt's numbers handed back, not an answer
    return bool(_bounded(_equivalent, answer, prediction))




def math_parses(answer: str) -> bool:
    answer = _final_expression(answer)
    return not _too_costly(answer) and bool(_bounded(_math, answer))


def committed(answer: str) -> bool:
    """Whether an answer holds at most one distinct ``\\boxed`` value (two is a hedge)."""
    return not _differ(answer, _boxes(answer))
