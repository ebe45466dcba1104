"""The synthetic task both the data stage and the tiny base are built from: multi-digit addition,
its held-out partition, and the column-by-column scratchpad, in R1's output format.

A module of its own so that changing how prompt sets are drawn (``components.data``) does not
change the tiny base's code version, and with it every cached stage downstream.
"""

from __future__ import annotations

import zlib

HELD_OUT_SHARE = 10  # one unordered operand pair in this many is reserved for evaluation


def held_out(a: int, b: int) -> bool:
    """Whether ``a + b`` (in either order) is reserved for the test split.

    A fixed partition of the problem space, so the test problems are never trained on: not in the
    train split, and not in the tiny base's pretraining corpus, which is built in another stage.
    """
    low, high = sorted((a, b))
    return zlib.crc32(f"{low}+{high}".encode()) % HELD_OUT_SHARE == 0


def addition_work(a: int, b: int) -> str:
    """Column-by-column addition as a scratchpad a tiny model can follow, one line per column.

    ``478 + 365`` → ``478+365: 8+5=13 3`` / ``47+36: 7+6+1=14 43`` / ``4+3: 4+3+1=8 843``. Each
    line restates what is left of the operands, so the digits to add sit right before ``+`` and
    ``:`` (a local look-up, not a count of lines), adds them with the carry, and prepends the new
    digit to the answer so far; the last column keeps its whole total, so the last line ends with
    the sum.
    """
    lines, carry, partial = [], 0, ""
    da, db = str(a), str(b)
    columns = max(len(da), len(db))
    da, db = da.zfill(columns), db.zfill(columns)
    for i in range(columns):
        rest_a, rest_b = da[: columns - i], db[: columns - i]
        x, y = int(rest_a[-1]), int(rest_b[-1])
        total = x + y + carry
        partial = (str(total) if i == columns - 1 else str(total % 10)) + partial
        lines.append(f"{rest_a}+{rest_b}: {x}+{y}{'+1' if carry else ''}={total} {partial}")
        carry = total // 10
    return "\n".join(lines)


def r1_completion(thought: str, answer: str) -> str:
    """A completion in R1's output format (an empty thought: a direct answer)."""
    return f"<think>\n{thought}\n</think>\n<answer>{answer}</answer>" if thought else \
        f"<think>\n</think>\n<answer>{answer}</answer>"


def addition_question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


# What the tiny base's pretraining prompts add when they ask for the work. The task's own prompts
# never say it: whether to work the columns is the base's habit, which RL can change.
WORK_HINT = " Show your work."
