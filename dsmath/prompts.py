"""Prompt templates (DeepSeekMath-Instruct formats) and the stop strings that go with them."""

from __future__ import annotations

# The paper's chain-of-thought instruction (DeepSeekMath §5.1 / its evaluation code).
COT_TEMPLATE = "User: {question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n\nAssistant:"
POT_TEMPLATE = (
    "User: {question}\nPlease write a Python program that prints the final answer, in a ```python block.\n\nAssistant:"
)
TOOL_TEMPLATE = (
    "User: {question}\nPlease integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{{}}.\n\nAssistant:"
)
# The tiny built-in task uses a short template: every prompt token costs the 1M-parameter model capacity.
TINY_TEMPLATE = "Q: {question}\nA:"

TEMPLATES = {"cot": COT_TEMPLATE, "pot": POT_TEMPLATE, "tool": TOOL_TEMPLATE, "tiny": TINY_TEMPLATE}


def format_prompt(question: str, mode: str = "cot") -> str:
    """The prompt for ``question`` in ``mode`` ('cot', 'pot', 'tool' or 'tiny')."""
    try:
        template = TEMPLATES[mode]
    except KeyError:
        raise ValueError(f"unknown prompt mode {mode!r}; one of {', '.join(TEMPLATES)}") from None
    return template.format(question=question)
