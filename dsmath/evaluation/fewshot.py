"""Few-shot prompts for evaluating base models: k worked examples in the task's own template, then the question.

A shot is a (question, worked solution) pair read from a GSM8K/MATH-style JSONL file:

* chain-of-thought / tool-integrated: the record's ``solution`` (MATH, ends in ``\\boxed{}``) or its ``answer``
  rationale (GSM8K: the ``<<48/2=24>>`` calculator notes are removed and ``#### 72`` becomes
  ``The answer is \\boxed{72}.``), so every shot shows the answer format the grader reads; a record with only a
  final answer (CMATH's ``golden``) becomes the short shot ``The answer is \\boxed{…}.``;
* program-of-thought: a ``program`` / ``code`` field (wrapped in a ```python block), or a solution that already
  holds a ```python block; a file with neither is refused (a CoT shot would teach the wrong format).

The prompt is ``shot_1 + SEPARATOR + … + shot_k + SEPARATOR + format_prompt(question, mode)``, each shot being
``format_prompt(shot_question, mode) + " " + solution`` (Chinese questions get the Chinese instruction,
``language="auto"``): the same User/Assistant frame as zero-shot, so an
instruct model sees a familiar format and a base model sees the pattern to continue. Generation should stop at
:data:`FEWSHOT_STOP` (the next shot's ``User:``), which :func:`fewshot_stop` returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from dsmath.datasets import QUESTION_KEYS, DataError, iter_jsonl
from dsmath.prompts import format_prompt

SEPARATOR = "\n\n\n"
FEWSHOT_STOP = "\nUser:"
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_PYTHON_BLOCK = "```python"


@dataclass(frozen=True)
class Shot:
    """One worked example."""

    question: str
    solution: str


def _first(obj: dict, keys: Iterable[str]) -> object | None:
    return next((obj[k] for k in keys if obj.get(k) not in (None, "")), None)


def worked_solution(record: dict, mode: str) -> str | None:
    """The worked solution of a GSM8K/MATH-style record in the format ``mode`` expects, or None if it has none."""
    if mode == "pot":
        code = _first(record, ("program", "code"))
        if code is not None:
            return f"{_PYTHON_BLOCK}\n{str(code).strip()}\n```"
        text = _first(record, ("solution", "response"))
        return str(text).strip() if text is not None and _PYTHON_BLOCK in str(text) else None
    text = _first(record, ("solution", "response", "answer"))
    if text is None:  # only a final answer (CMATH's "golden"): a short shot that still shows the answer format
        final = _first(record, ("final_answer", "golden", "gold"))
        return None if final is None else f"The answer is \\boxed{{{str(final).strip()}}}."
    text = str(text)
    if "####" in text:  # GSM8K rationale: drop calculator notes, state the answer the way the grader reads it
        rationale, final = text.rsplit("####", 1)
        rationale = _CALCULATOR_NOTE.sub("", rationale).strip()
        text = f"{rationale}\nThe answer is \\boxed{{{final.strip()}}}."
    return text.strip()


def load_shots(path: str | Path, n: int, mode: str) -> list[Shot]:
    """The first ``n`` records of ``path`` as shots for ``mode``.

    Raises ``DataError`` (a ``UserError``) naming the file when it is missing, malformed, has fewer than ``n``
    usable records among its first ``n``, or (PoT) holds no programs.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    shots: list[Shot] = []
    if n == 0:
        return shots
    for lineno, obj in enumerate(iter_jsonl(path, required=("|".join(QUESTION_KEYS),)), 1):
        solution = worked_solution(obj, mode)
        if solution is None:
            need = "a 'program'/'code' field or a ```python block" if mode == "pot" else "a solution or an answer"
            raise DataError(f"{path}: record {lineno} has no worked solution for {mode} few-shot (needs {need})")
        shots.append(Shot(str(_first(obj, QUESTION_KEYS)), solution))
        if len(shots) == n:
            return shots
    raise DataError(f"{path}: asked for {n} few-shot examples, the file has only {len(shots)}")


def fewshot_prefix(shots: Sequence[Shot], mode: str) -> str:
    """The text that goes before the question's own prompt ('' without shots)."""
    return "".join(f"{format_prompt(s.question, mode, language='auto')} {s.solution}{SEPARATOR}" for s in shots)


def build_prompt(question: str, mode: str, prefix: str = "") -> str:
    """``prefix`` (from :func:`fewshot_prefix`) followed by the question in ``mode``'s template."""
    return prefix + format_prompt(question, mode, language="auto")


def fewshot_stop(num_shots: int) -> tuple[str, ...]:
    """Stop strings for a prompt with ``num_shots`` shots: the start of a next shot, when there are shots."""
    return (FEWSHOT_STOP,) if num_shots > 0 else ()
