"""Program-of-thought rewards and tool-integrated-reasoning helpers (pure text functions + one sandbox run).

Formats (DeepSeekMath §5 / ToRA): a completion holds fenced ```python blocks; in tool-integrated mode the
generator stops after a closed python block, runs it, appends a ```output block and continues.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from dsmath.sandbox.result import ExecResult

_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)
_OPEN = "```python"


def extract_program(completion: str) -> str | None:
    """The last closed ```python block of ``completion`` (its body), or None if there is none."""
    blocks = _BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def split_tool_call(text: str) -> str | None:
    """The code of a python block that ``text`` has just closed and that has no output yet, else None.

    True when the last ```python block is closed by ``` and only whitespace follows it (the generator
    stopped on the closing fence, or on a following "```output" it was told to stop at).
    """
    start = text.rfind(_OPEN)
    if start < 0:
        return None
    body_start = text.find("\n", start)
    if body_start < 0:
        return None
    close = text.find("```", body_start + 1)
    if close < 0:
        return None
    tail = text[close + 3:].strip()
    if tail not in ("", "```output"):
        return None
    return text[body_start + 1:close]


def format_tool_output(result: ExecResult, max_chars: int = 1024) -> str:
    """The ```output block to append after a tool call: stdout, or the error's last line, or a timeout note.

    Long output keeps its head and tail around a "..." so the model sees both; never more than max_chars.
    """
    if result.timed_out:
        text = "TimeoutError: the program ran past its time limit"
    elif result.memory_exceeded:
        text = "MemoryError: the program ran out of memory"
    elif result.exit_code != 0:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        if lines:
            text = lines[-1]
        elif result.signal is not None:
            text = f"the program was killed by signal {result.signal}"
        else:
            text = f"the program exited with status {result.exit_code}"
    else:
        text = result.stdout.rstrip("\n")
    if len(text) > max_chars:
        half = max(0, (max_chars - 5) // 2)
        text = text[:half] + "\n...\n" + text[len(text) - half:]
    return f"```output\n{text}\n```\n"


def _local_equal(pred: str, gold: str) -> bool:
    """Stand-in for dsmath.grading.math_equal: exact string, else exact rational, else float within 1e-6."""
    a, b = pred.strip().strip("$").replace(",", ""), gold.strip().strip("$").replace(",", "")
    if a == b:
        return True
    try:
        x, y = Fraction(a), Fraction(b)
    except (ValueError, ZeroDivisionError):
        return False
    return x == y or abs(x - y) <= Fraction(1, 10**6) * max(1, abs(y))


def _default_equal() -> Callable[[str, str], bool]:
    try:
        from dsmath.grading import math_equal
    except ImportError:
        return _local_equal
    return math_equal


@dataclass(frozen=True)
class PotReward:
    """One program-of-thought verdict: reward, the answer the program printed, and why."""

    reward: float
    correct: bool
    answer: str | None
    reason: str  # "correct", "wrong", "no_program", "no_output", "error", "timeout", "memory"
    result: ExecResult | None = None


def pot_reward(completion: str, gold: str, *, runner=None, timeout_s: float = 5.0, memory_mb: int = 512,
               correct_reward: float = 1.0, incorrect_reward: float = 0.0,
               equal: Callable[[str, str], bool] | None = None) -> PotReward:
    """Run the completion's last ```python block in the sandbox and grade the last line it printed.

    ``runner`` is anything with ``run(code, timeout_s=, memory_mb=, max_output_bytes=) -> ExecResult``: a
    SandboxPool or a SandboxClient (default: the module-level pool). ``equal`` defaults to
    ``dsmath.grading.math_equal`` when importable, else a local numeric/string comparison.
    """
    program = extract_program(completion)
    if program is None:
        return PotReward(incorrect_reward, False, None, "no_program")
    if runner is None:
        from dsmath.sandbox.pool import default_pool

        runner = default_pool()
    result = runner.run(program, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=16 * 1024)
    if result.timed_out:
        return PotReward(incorrect_reward, False, None, "timeout", result)
    if result.memory_exceeded:
        return PotReward(incorrect_reward, False, None, "memory", result)
    if result.exit_code != 0:
        return PotReward(incorrect_reward, False, None, "error", result)
    lines = [ln.strip() for ln in result.stdout.splitlines() if ln.strip()]
    if not lines:
        return PotReward(incorrect_reward, False, None, "no_output", result)
    answer = lines[-1]
    ok = bool((equal or _default_equal())(answer, gold))
    return PotReward(correct_reward if ok else incorrect_reward, ok, answer, "correct" if ok else "wrong", result)
