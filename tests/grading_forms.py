"""Generated answer forms for the differential test against math-verify and for the grading bench.

``generated_cases(seed)`` writes each answer of a small bank (integers, fractions, decimals, radicals, π,
relations, intervals, sets, tuples, labelled answers, matrices, percents, units) in the ways models state it
(paraphrased final-answer sentences, every LaTeX delimiter, boxed, chat tokens and sign-offs after it), against
its gold (label True) and against a different gold of the same kind (label False). Deterministic for a seed.
"""

from __future__ import annotations

import random

# (kind, answer as the model writes it, gold, a wrong gold of the same kind)
BANK = [
    ("integer", "42", "42", "24"), ("integer", "-7", "-7", "7"), ("integer", "1{,}000", "1000", "100"),
    ("integer", "14,916", "14916", "14961"), ("fraction", "\\frac{3}{4}", "\\frac34", "\\frac43"),
    ("fraction", "\\dfrac{1}{3}", "\\frac{1}{3}", "\\frac{1}{4}"), ("fraction", "0.75", "\\frac{3}{4}", "\\frac{2}{3}"),
    ("decimal", "3.50", "3.5", "3.05"), ("decimal", "0.3333", "0.33", "0.34"), ("decimal", "3.14159", "3.14", "3.15"),
    ("radical", "2\\sqrt{3}", "\\sqrt{12}", "\\sqrt{3}"), ("radical", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}", "\\sqrt2"),
    ("radical", "\\frac{1+\\sqrt{5}}{2}", "\\frac{1+\\sqrt5}{2}", "2"), ("pi", "2\\pi", "2\\pi", "\\pi"),
    ("pi", "\\frac{\\pi}{3}", "\\frac{\\pi}{3}", "\\frac{\\pi}{6}"), ("expression", "x^2 + 2x + 1", "(x+1)^2", "(x-1)^2"),
    ("relation", "x \\lt 3", "x < 3", "x \\le 3"), ("relation", "x <= 2", "x \\le 2", "x < 2"),
    ("relation", "x \\geq 5", "[5, \\infty)", "(5, \\infty)"), ("relation", "-x > -1", "x < 1", "x \\le 1"),
    ("relation", "x \\neq 3", "x \\ne 3", "x \\ne -3"), ("relation", "x \\approx 11", "11", "12"),
    ("interval", "[0, 9)", "[0,9)", "(0,9)"), ("interval", "(-\\infty, 2] \\cup (3, \\infty)", "(3,\\infty)\\cup(-\\infty,2]", "(-\\infty,2)\\cup(3,\\infty)"),
    ("set", "\\{-2021, 2021\\}", "\\{2021, -2021\\}", "2021"), ("set", "-2, 3", "3, -2", "-2, 4"),
    ("set", "x = 2 \\text{ or } x = -5", "-5, 2", "2, 5"), ("tuple", "(3, 2)", "(3,2)", "(2,3)"),
    ("tuple", "(7,11),(11,7)", "(11,7) \\text{ or } (7,11)", "(7,11)"),
    ("labelled", "(p,q)=(3,2)", "(3,2)", "(2,3)"), ("labelled", "AB=4, CD=5", "4, 5", "5, 4"),
    ("labelled", "S:T = 7:32", "7:32", "7:23"), ("labelled", "k = \\frac13", "\\frac13", "3"),
    ("matrix", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}"),
    ("matrix", "\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}-1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\-1\\end{pmatrix}"),
    ("percent", "28\\%", "28", "82"), ("percent", "28 \\text{ percent}", "28\\%", "2.8\\%"), ("percent", "12.5\\%", "0.125", "0.25"),
    ("units", "18 \\text{ dollars}", "18", "81"), ("units", "\\$18.00", "18", "17"), ("units", "45^\\circ", "45", "90"),
    ("units", "12 \\text{ cm}^2", "12", "21"), ("text", "\\text{Monday}", "\\text{Monday}", "\\text{Tuesday}"),
]

# how a model states an answer ``{a}`` (a LaTeX expression)
TEMPLATES = [
    ("boxed", "So the result follows.\nThe answer is $\\boxed{{{a}}}$."),
    ("minerva", "Final Answer: The final answer is ${a}$. I hope it is correct."),
    ("final_heading", "Putting it together.\n\n**Final Answer**\n\\[\n\\boxed{{{a}}}\n\\]"),
    ("final_heading_prose", "Putting it together.\n\n**Final Answer**\n\nThe answer is ${a}$."),
    ("answer_is_colon", "Thus we are done. The answer is: ${a}$"),
    ("answer_label", "Answer: ${a}$"),
    ("therefore_display", "Therefore,\n$$ {a} $$"),
    ("paren_delims", "Hence the result is \\( {a} \\)."),
    ("bracket_delims", "We conclude\n\\[ {a} \\]"),
    ("chat_tokens", "The answer is $\\boxed{{{a}}}$.<|im_end|>\n<|im_start|>user\nNext: what is 2+2?"),
    ("eot", "Therefore, the final answer is $\\boxed{{{a}}}$. I hope it is correct.<|eot_id|>"),
]


def generated_cases(seed: int = 0, per_answer: int = 4) -> list[dict]:
    """Cases {family, template, completion, gold, label}; each bank answer in ``per_answer`` templates, with
    its gold (True) and its wrong gold (False)."""
    rng = random.Random(seed)
    out = []
    for kind, answer, gold, wrong in BANK:
        for name, template in rng.sample(TEMPLATES, per_answer):
            completion = template.format(a=answer)
            out.append({"family": kind, "template": name, "completion": completion, "gold": gold, "label": True})
            out.append({"family": kind, "template": name, "completion": completion, "gold": wrong, "label": False})
    return out
