"""dsmath.grading on answers it was not tuned on: extraction as a human grader reads, equivalence families
(each with true and false cases), the wrong "yes" verdicts a last-number grader gives, and a realistic set of
completions written the way open models write them (lenient mode: all right, zero wrong "yes")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dsmath.grading import GradingPool, extract_answer, math_equal

REALISTIC = Path(__file__).parent / "data" / "grading_realistic.jsonl"


@pytest.fixture(scope="module")
def pool():
    with GradingPool(1, timeout_s=10.0) as p:
        yield p


# ------------------------------------------------------------------ extraction

@pytest.mark.parametrize("completion, mode, expected", [
    ("Final Answer: The largest $n$ is 34.", "strict", "34"),
    ("Answer $ 9 $", "strict", "9"),
    ("**Final Answer**\n\nThe number of apples is 12.", "strict", "12"),
    ("The answer is: 5", "strict", "5"),
    ("The answer is 160 minutes.", "strict", "160"),
    ("The answer is 5<|im_end|>\n<|im_start|>user\nWhat is 3? The answer is 3", "strict", "5"),
    ("\\boxed{3}<|eot_id|><|start_header_id|>user<|end_header_id|>\\boxed{7}", "strict", "3"),
    ("Final Answer: The final answer is $1$. I hope it is correct.\n\nProblem:\nNext?\nFinal Answer: The final answer is $3$.",
     "strict", "1"),
    ("We conclude \\[ 9 \\]", "strict", None),  # strict: a span is not a stated answer
    ("We conclude \\[ 9 \\]", "lenient", "9"),
    ("So the total becomes \\( (9+1) \\)", "lenient", "(9+1)"),
    ("Therefore $x \\geq 5$ is the solution.", "lenient", "x \\geq 5"),
    ("So $5 + 3 = 8$.", "lenient", "8"),  # an arithmetic chain states its result
    ("Then $2x + 3 = 11$.", "lenient", "2x + 3 = 11"),  # an equation is not its right side
    ("So there are 12 ways to choose $k$ from $n$ and the count is $12$.", "lenient", "12"),
    ("She pays $5 for apples and $3 for pears, so 8 in total.", "lenient", "8"),  # currency, not math
    ("it equals \\frac{1+\\sqrt{5}}{2}", "lenient", None),  # never a digit pulled out of LaTeX
    ("We get 5 + 3 = 8 apples.\nI hope it is correct.", "lenient", "8"),
    ("It could be either 3 or 4.", "lenient", "3 or 4"),  # a hedge is both answers, never the last
    ("the value in cell B2 is what we need", "lenient", None),  # a digit inside a word is not a number
])
def test_extraction(completion, mode, expected):
    assert extract_answer(completion, mode=mode) == expected


def test_all_boxes_only_when_the_gold_lists_several():
    text = "The roots are $x = \\boxed{3}$ and $x = \\boxed{-2}$."
    assert extract_answer(text, gold="3, -2") == "3, -2"
    assert extract_answer(text, gold="-2") == "-2"
    far = "Step 1 gives \\boxed{7}." + " filler" * 200 + " The answer is \\boxed{2}."
    assert extract_answer(far, gold="2, 3") == "2"  # a box far back is an intermediate result, not an answer


def test_extraction_is_linear_on_a_megabyte():
    text = "$x$ and 1 " * 100_000 + "\\( (" * 1000
    t0 = time.perf_counter()
    extract_answer(text, mode="lenient")
    assert time.perf_counter() - t0 < 2.0


# ------------------------------------------------------------------ equivalence families (true and false)

FAMILIES = {
    "percent words": [("28 pct", "28", True), ("28 percentage", "28\\%", True), ("28\\%", "0.28", True),
                      ("28 \\text{ percent}", "0.28", True), ("28 pct", "27", False), ("28\\%", "0.82", False)],
    "thousands with {,}": [("14{,}916", "14916", True), ("14{,}916", "14917", False)],
    "labelled answers": [("(p,q)=(3,2)", "(3,2)", True), ("(p,q)=(2,3)", "(3,2)", False),
                         ("AB=4, CD=5", "4, 5", True), ("AB=5, CD=4", "4, 5", False), ("AB=4, CD=6", "4, 5", False),
                         ("S:T = 7:32", "7:32", True), ("S:T = 7:33", "7:32", False),
                         ("k = \\frac13", "\\frac13", True), ("k = \\frac13", "3", False),
                         ("x=2, y=3", "(2,3)", True), ("x=3, y=2", "(2,3)", False), ("f(x) = 3", "3", False)],
    "ratios": [("14:7", "2:1", True), ("1:2", "2:1", False), ("7:32", "\\frac{7}{32}", True)],
    "several solutions": [("(7,11),(11,7)", "(11,7) or (7,11)", True), ("(7,11) \\text{ and } (11,7)", "(11,7), (7,11)", True),
                          ("(7,11),(11,7)", "(11,7) \\text{ or } (7,12)", False), ("(7,11)", "(11,7) or (7,11)", False),
                          ("(3;2)", "(3,2)", True), ("(3;2)", "(2,3)", False), ("(1,2); (3,4)", "(3,4), (1,2)", True)],
    "rounding to the gold's precision": [("0.3333333", "0.33", True), ("3.14159", "3.14", True), ("3.15", "3.14", False),
                                         ("0.34", "0.3", False), ("0.33", "0.3333333", False), ("3.1", "3.14", False)],
    "relations": [("x \\lt 3", "x<3", True), ("x <= 2", "x \\le 2", True), ("x <= 2", "x < 2", False),
                  ("x \\neq 3", "x \\ne 3", True), ("x \\neq 3", "x \\neq 4", False), ("x \\neq 3", "3", False),
                  ("x \\neq 3", "(-\\infty,3)\\cup(3,\\infty)", True), ("-x > -1", "x < 1", True),
                  ("-x > -1", "x \\le 1", False), ("x < 1", "x \\le 1", False), ("2x+1 > 3", "(1,\\infty)", True),
                  ("2x+1 > 3", "[1,\\infty)", False), ("y < 1", "-x > -1", False)],
    "approximately": [("x \\approx 11", "11", True), ("x \\approx 11", "12", False), ("\\approx 11", "11", True)],
    "intervals": [("[0,9)", "[0, 9)", True), ("[0,9)", "(0,9)", False), ("(0,9)", "[0,9)", False)],
    "sets": [("\\{-2021, 2021\\}", "2021", False), ("{-2021, 2021}", "\\{2021,-2021\\}", True),
             ("{-2021, 2021}", "2021", False), ("\\pm 2021", "\\{-2021, 2021\\}", True)],
    "matrices": [("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\left(\\begin{array}{cc}1&2\\\\3&4\\end{array}\\right)", True),
                 ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&5\\end{bmatrix}", False)],
    "never a wrong yes": [("\\frac{1+\\sqrt5}{2}", "2", False), ("\\sqrt3", "3", False), ("k = \\frac{1}{3}", "3", False)],
}
FLAT = [(k, p, g, w) for k, rows in FAMILIES.items() for p, g, w in rows]


def test_every_family_has_true_and_false_cases():
    for kind, rows in FAMILIES.items():
        if kind != "never a wrong yes":
            assert {w for _, _, w in rows} == {True, False}, kind


@pytest.mark.parametrize("kind, pred, gold, expected", FLAT, ids=[f"{k}:{p}|{g}" for k, p, g, _ in FLAT])
def test_family(pool, kind, pred, gold, expected):
    assert math_equal(pred, gold, pool=pool) is expected


# ------------------------------------------------------------------ whole completions, lenient

@pytest.mark.parametrize("completion, gold", [
    ("We have $\\frac{1+\\sqrt{5}}{2}$", "2"), ("so it is \\sqrt3", "3"), ("Since $3k=1$, $k = \\frac{1}{3}$.", "3"),
    ("The interval is $[0,9)$.", "(0,9)"), ("The set is $\\{-2021, 2021\\}$.", "2021"), ("Use the plan B2 now", "2"),
])
def test_lenient_never_grades_a_digit_of_an_answer_as_the_answer(pool, completion, gold):
    v = pool.grade(completion, gold, mode="lenient")
    assert v.correct is False, v


def test_realistic_completions_all_right_and_no_wrong_yes(pool):
    rows = [json.loads(line) for line in REALISTIC.read_text().splitlines()]
    assert len(rows) >= 150 and {r["style"] for r in rows} >= {"qwen", "llama", "deepseek", "minerva", "gsm8k"}
    verdicts = pool.grade_many([(r["completion"], r["gold"]) for r in rows], mode="lenient")
    wrong = [(r["id"], r["gold"], v.extracted, v.reason) for r, v in zip(rows, verdicts) if v.correct != r["correct"]]
    assert wrong == []
    assert not any(v.timed_out for v in verdicts)


def test_strict_still_refuses_unstated_answers_on_the_realistic_set(pool):
    rows = [json.loads(line) for line in REALISTIC.read_text().splitlines()]
    verdicts = pool.grade_many([(r["completion"], r["gold"]) for r in rows], mode="strict")
    assert not any(v.correct and not r["correct"] for r, v in zip(rows, verdicts))  # no wrong yes either
    unstated = [r for r in rows if r["correct"] and extract_answer(r["completion"], mode="strict", gold=r["gold"]) is None]
    assert unstated and all(not v.correct for r, v in zip(rows, verdicts) if r in unstated)
