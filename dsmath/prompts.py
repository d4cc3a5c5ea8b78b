"""Prompt templates (DeepSeekMath-Instruct formats) and the stop strings that go with them.

Sources: the chat frame ``User: …\\n\\nAssistant:`` is DeepSeekMath-Instruct's; the chain-of-thought and
tool-integrated instructions are verbatim from the DeepSeekMath evaluation code (deepseek-ai/DeepSeek-Math,
``evaluation/README.md`` / ``markup_question``), English and Chinese. The program-of-thought instruction is
dsmath's own: the paper evaluates PoT only few-shot on base models (PAL-style ``def solution()``); ours asks for
a program that *prints* its answer, which is what ``dsmath.sandbox.pot_reward`` grades.
"""

from __future__ import annotations

import re

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

# Chinese questions (CMATH, Gaokao) get the evaluation code's Chinese instructions.
TEMPLATES_ZH = {
    "cot": "User: {question}\n请通过逐步推理来解答问题，并把最终答案放置于\\boxed{{}}中。"
           "\n\nAssistant:",
    "tool": "User: {question}\n请结合自然语言和Python程序语言来解答问题，并把最终答案放置于\\boxed{{}}中。"
            "\n\nAssistant:",
}
_CJK = re.compile(r"[\u4e00-\u9fff]")


def question_language(question: str) -> str:
    """'zh' when the question contains CJK ideographs (the evaluation code's rule of thumb), else 'en'."""
    return "zh" if _CJK.search(question) else "en"


def format_prompt(question: str, mode: str = "cot", language: str = "en") -> str:
    """The prompt for ``question`` in ``mode`` ('cot', 'pot', 'tool' or 'tiny').

    ``language``: 'en' (default), 'zh' (the Chinese cot/tool instructions; other modes stay English) or 'auto'
    (:func:`question_language`).
    """
    try:
        template = TEMPLATES[mode]
    except KeyError:
        raise ValueError(f"unknown prompt mode {mode!r}; one of {', '.join(TEMPLATES)}") from None
    if language == "auto":
        language = question_language(question)
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en', 'zh' or 'auto', got {language!r}")
    if language == "zh":
        template = TEMPLATES_ZH.get(mode, template)
    return template.format(question=question)
