"""Program-of-thought rewards and tool-integrated helpers."""

from __future__ import annotations

import pytest

from dsmath.sandbox import ExecResult, SandboxPool, extract_program, format_tool_output, pot_reward, split_tool_call
from dsmath.sandbox.pot import _local_equal


def _res(stdout="", stderr="", exit_code=0, timed_out=False, memory=False, sig=None):
    return ExecResult(stdout=stdout, stderr=stderr, exit_code=exit_code, timed_out=timed_out, memory_exceeded=memory,
                      output_truncated=False, signal=sig, wall_s=0.01)


def test_extract_program_takes_the_last_closed_block():
    text = "try:\n```python\nprint(1)\n```\nno, better:\n```python\nprint(2)\n```\nand ```python\nunclosed"
    assert extract_program(text) == "print(2)\n"
    assert extract_program("no code here") is None
    assert extract_program("```py\nprint(1)\n```") is None


@pytest.mark.parametrize("text, code", [
    ("Let me compute.\n```python\nprint(2+2)\n```", "print(2+2)\n"),
    ("Let me compute.\n```python\nprint(2+2)\n```\n", "print(2+2)\n"),
    ("x\n```python\nprint(2+2)\n```\n```output", "print(2+2)\n"),
    ("x\n```python\nprint(2+2)\n```\n```output\n4\n```\nSo 4.", None),  # already answered
    ("x\n```python\nprint(2+2)\n", None),  # still being written
    ("x\n```python\nprint(1)\n```\nthen prose", None),
    ("plain text", None),
    ("```python\na=1\n```\n```output\n\n```\n```python\nprint(a)\n```", "print(a)\n"),
])
def test_split_tool_call(text, code):
    assert split_tool_call(text) == code


def test_format_tool_output():
    assert format_tool_output(_res(stdout="4\n")) == "```output\n4\n```\n"
    err = _res(stderr="Traceback (most recent call last):\n  File x\nNameError: name 'y' is not defined\n", exit_code=1)
    assert format_tool_output(err) == "```output\nNameError: name 'y' is not defined\n```\n"
    assert "TimeoutError" in format_tool_output(_res(exit_code=None, timed_out=True, sig=9))
    assert "MemoryError" in format_tool_output(_res(exit_code=1, memory=True))
    assert "signal 11" in format_tool_output(_res(exit_code=None, sig=11))
    long = format_tool_output(_res(stdout="a" * 500 + "b" * 500), max_chars=101)
    body = long[len("```output\n"):-len("\n```\n")]
    assert len(body) <= 101 and body.startswith("a" * 48) and body.endswith("b" * 48) and "\n...\n" in body


def test_local_equal():
    assert _local_equal("0.5", "1/2") and _local_equal("1,000", "1000") and _local_equal(" 7 ", "7")
    assert _local_equal("3.0000000001", "3") and not _local_equal("3.01", "3") and not _local_equal("x", "y")


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(size=1) as p:
        yield p


def test_pot_reward_end_to_end(pool):
    good = "We solve it.\n```python\nimport sympy\nx = sympy.Symbol('x')\nprint(max(sympy.solve(x**2 - 9, x)))\n```"
    v = pot_reward(good, "3", runner=pool)
    assert (v.reward, v.correct, v.answer, v.reason) == (1.0, True, "3", "correct")
    wrong = pot_reward("```python\nprint('debug')\nprint(4)\n```", "3", runner=pool)
    assert (wrong.reward, wrong.answer, wrong.reason) == (0.0, "4", "wrong")
    assert pot_reward("The answer is 3.", "3", runner=pool).reason == "no_program"
    assert pot_reward("```python\n1/0\n```", "3", runner=pool).reason == "error"
    assert pot_reward("```python\nx = 3\n```", "3", runner=pool).reason == "no_output"
    slow = pot_reward("```python\nwhile True: pass\n```", "3", runner=pool, timeout_s=0.5)
    assert slow.reason == "timeout" and slow.reward == 0.0
    custom = pot_reward("```python\nprint('III')\n```", "3", runner=pool, equal=lambda a, b: a == "III")
    assert custom.correct and custom.reward == 1.0

def test_default_equal_is_usable():
    from dsmath.sandbox.pot import _default_equal

    eq = _default_equal()  # dsmath.grading.math_equal once it exists, else the local stand-in
    assert eq('1/2', '0.5') and not eq('2', '3')
