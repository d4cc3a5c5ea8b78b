"""Final-answer extraction from a model completion (or a reference solution).

Pure string work, linear in the completion's length: safe on a 1 MB completion and never calls sympy.

Recognised, in priority order:
1. the last ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (also ``\\boxed 5``);
2. Minerva's "Final Answer: The final answer is X. I hope it is correct.";
3. "The answer is X" / "Answer: X" (the last one);
4. GSM8K's ``#### N``;
5. lenient mode only: the last number in the text.

When the gold answer is a multiple-choice letter, a stated letter ("(B)", "answer is B", ``\\boxed{B}``,
``\\boxed{(B) 42}``) wins over boxed option text. Not guaranteed: recovering a letter from option text alone
(we do not see the options).
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MC_GOLD = re.compile(r"^\s*\(?\s*([A-J])\s*\)?\s*\.?\s*$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
# "the answer is" / "answer:" (case-insensitive); we take the last occurrence.
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:|answer\s*:)\s*", re.IGNORECASE)
_MINERVA = re.compile(r"final answer is\s*", re.IGNORECASE)
_MAX_STATED_CHARS = 500  # a stated answer runs to the end of its line/sentence, but not forever


_MAX_BOX_CHARS = 10_000  # a boxed answer longer than this is not an answer; bounds the scan
_MAX_BOX_TRIES = 8  # unclosed boxes to step back over (truncation); bounds the work on hostile text


def _balanced_group(text: str, open_idx: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[open_idx] == '{'`` and the index after it."""
    depth = 0
    for j in range(open_idx, min(len(text), open_idx + _MAX_BOX_CHARS)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : j], j + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{}``/``\\fbox{}``; an unclosed (truncated) one is skipped."""
    end = len(text)
    for _ in range(_MAX_BOX_TRIES):
        start, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_COMMANDS)
        if start < 0:
            return None
        i = start + len(cmd)
        # \boxed{...}, or "\boxed 5" (argument up to '$' or whitespace)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            group = _balanced_group(text, i)
            if group is not None:
                return group[0].strip()
        elif i > start + len(cmd):
            m = re.match(r"[^\s$]+", text[i:i + _MAX_STATED_CHARS])
            if m:
                return m.group(0).strip()
        end = start
    return None


def _sentence(text: str) -> str:
    """The answer text after a cue: to the end of the line, cut before a sentence-ending period."""
    line = text[:_MAX_STATED_CHARS].split("\n", 1)[0]
    line = re.split(r"\.\s+I hope it is correct", line, maxsplit=1)[0]
    # a period followed by space/end ends the sentence; "3.5" does not
    for m in re.finditer(r"\.(?=\s|$)", line):
        if line.count("$", 0, m.start()) % 2 == 0:  # a period inside $...$ is not the sentence's end
            line = line[: m.start()]
            break
    line = line.strip().strip("*").strip()
    if len(line) >= 2 and line.startswith("$") and line.endswith("$"):
        line = line.strip("$").strip()
    elif line.startswith("\\(") and line.endswith("\\)"):
        line = line[2:-2].strip()
    return line.rstrip(".").strip()


def _stated(text: str) -> str | None:
    m = None
    for m in _MINERVA.finditer(text):
        pass
    if m is not None:
        ans = _sentence(text[m.end():])
        if ans:
            return ans
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is not None:
        ans = _sentence(text[last.end():])
        if ans:
            return ans
    k = text.rfind("####")
    if k >= 0:
        ans = text[k + 4 :].strip().split("\n", 1)[0].strip()
        if ans:
            return ans
    return None


def _letter(answer: str) -> str | None:
    """A letter stated as the answer: 'B', '(B)', '\\text{(B)}', '(B) 42', 'B: 42'."""
    s = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", answer).strip().strip("$").strip()
    m = re.match(r"^\(?([A-J])\)?(?:$|[\s.:)]|\s*\()", s)
    return m.group(1) if m else None


def gold_is_letter(gold: str | None) -> bool:
    return gold is not None and _MC_GOLD.match(gold) is not None


def extract_answer(completion: str, *, mode: str = "strict", gold: str | None = None) -> str | None:
    """The final answer a completion states, or None.

    ``mode="strict"`` (training rewards) needs a stated answer: boxed, "final answer is", "the answer is" or
    ``####``. ``mode="lenient"`` also falls back to the last number in the text. ``gold`` only matters for
    multiple choice: when it is a letter, a stated letter is returned in preference to boxed option text.
    """
    if mode not in ("strict", "lenient"):
        raise ValueError(f"mode must be 'strict' or 'lenient', got {mode!r}")
    if not completion:
        return None
    boxed = last_boxed(completion)
    stated = None if boxed is not None else _stated(completion)
    answer = boxed if boxed is not None else stated
    if gold_is_letter(gold):
        for candidate in (answer, _stated(completion) if boxed is not None else None):
            if candidate and _letter(candidate):
                return _letter(candidate)
        # "... so the correct option is (C)." without an answer cue
        letters = re.findall(r"\(([A-J])\)", completion[-2000:])
        if letters and answer is None:
            return letters[-1]
    if answer is not None:
        return answer
    if mode == "lenient":
        tail = completion[-20000:]  # the last number lies near the end; bound the work
        numbers = _NUMBER.findall(tail)
        if numbers:
            return numbers[-1].rstrip(",")
    return None
