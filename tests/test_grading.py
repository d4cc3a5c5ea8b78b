"""dsmath.grading: extraction and equality for every answer kind, true and false cases."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from dsmath.grading import GradingPool, Verdict, extract_answer, grade, math_equal
from dsmath.grading.compare import compare, fast_scalar
from dsmath.grading.normalize import normalize, parse_structure, prepare


@pytest.fixture(scope="module")
def pool():
    with GradingPool(1, timeout_s=10.0) as p:
        yield p


# ------------------------------------------------------------------ extraction

@pytest.mark.parametrize("completion, mode, gold, expected", [
    ("so \\boxed{\\frac{1}{2}} done", "strict", None, "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{\\frac{a}{\\sqrt{b}}}", "strict", None, "\\frac{a}{\\sqrt{b}}"),
    ("\\fbox{42}", "strict", None, "42"),
    ("$\\boxed 7$", "strict", None, "7"),
    ("\\boxed{3} and a truncated \\boxed{4", "strict", None, "3"),  # unclosed last box skipped
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "strict", None, "\\frac{3}{4}"),
    ("Thus the answer is 3.5.", "strict", None, "3.5"),
    ("The answer is $x = 2$. Next line", "strict", None, "x = 2"),
    ("Answer: 12", "strict", None, "12"),
    ("She makes 9 * 2 = $18.\n#### 18", "strict", None, "18"),
    ("we get 10 apples and then 12 pears", "strict", None, None),  # strict needs a stated answer
    ("we get 10 apples and then 1,200 pears", "lenient", None, "1,200"),
    ("no numbers at all", "lenient", None, None),
    ("", "strict", None, None),
    # multiple choice: a stated letter wins over boxed option text when the gold is a letter
    ("The answer is (B). So \\boxed{42}", "strict", "B", "B"),
    ("\\boxed{(C) 17}", "strict", "C", "C"),
    ("\\boxed{\\text{D}}", "strict", "(D)", "D"),
    ("\\boxed{(C) 17}", "strict", "17", "(C) 17"),  # gold not a letter: the boxed text as written
])
def test_extract_answer(completion, mode, gold, expected):
    assert extract_answer(completion, mode=mode, gold=gold) == expected


def test_extract_rejects_bad_mode():
    with pytest.raises(ValueError):
        extract_answer("x", mode="loose")


# ------------------------------------------------------------------ normalisation

@pytest.mark.parametrize("raw, expected", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\tfrac12", "\\frac12"), ("\\left( 1, 2 \\right)", "(1,2)"),
    ("\\text{Monday}", "Monday"), ("5\\text{ cm}", "5"), ("90^\\circ", "90"), ("90^{\\circ}", "90"),
    ("\\$1,000", "1000"), ("1{,}000", "1000"), ("1\\,000", "1000"), ("3.50", "3.5"), ("3.0", "3"),
    ("\\!2\\,x", "2x"), ("$\\pi r$", "\\pi r"), (".5", "0.5"), ("12 square units", "12"),
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


# ------------------------------------------------------------------ equality, per answer kind

CASES = {
    "integers": [("42", "42", True), ("42", "43", False), ("-7", "−7".replace("−", "-"), True)],
    "decimals and trailing .0": [("3.0", "3", True), ("2.50", "2.5", True), ("2.51", "2.5", False)],
    "fractions": [("\\frac{1}{2}", "0.5", True), ("\\dfrac12", "1/2", True), ("\\frac{360}7", "\\frac{360}{7}", True),
                  ("\\frac{1}{3}", "0.33", True), ("\\frac{1}{3}", "0.3", False), ("\\frac{2}{3}", "\\frac{3}{2}", False)],
    "percents": [("50\\%", "0.5", True), ("50\\%", "50", True), ("50\\%", "5", False)],
    "money, units, degrees": [("\\$18.00", "18", True), ("5\\text{ cm}", "5", True), ("90^\\circ", "90", True),
                              ("45^\\circ", "90", False), ("7 \\text{ dollars}", "8", False),
                              ("3 cm", "3", True), ("3m", "3", False), ("12\\text{ m}^2", "12", True)],
    "thousands separators": [("1,000", "1000", True), ("1{,}000,000", "1000000", True), ("1,001", "1000", False)],
    "relative tolerance": [("1e-3", "0.001", True), ("1.0000000001", "1", True), ("1.001", "1", False)],
    "radicals": [("2\\sqrt{2}", "\\sqrt{8}", True), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}", True),
                 ("\\sqrt[3]{8}", "2", True), ("2\\sqrt{3}", "\\sqrt{8}", False)],
    "pi": [("2\\pi", "\\pi+\\pi", True), ("\\frac{\\pi}{2}", "90", False), ("3.14", "\\pi", True), ("3.15", "\\pi", False)],
    "symbolic expressions": [("x^2+10x+25", "(x+5)^2", True), ("9c+6", "3(3c+2)", True), ("x^2+1", "(x+1)^2", False),
                             ("2*x**2", "2x^2", True), ("\\sin^2 x + \\cos^2 x", "1", True), ("3+4i", "4i+3", True),
                             ("\\binom{5}{2}", "10", True), ("5!", "120", True), ("|-3|", "3", True), ("\\log_2 8", "3", True)],
    "equations": [("x = 3", "3", True), ("x=3", "4", False), ("y = 2x + 1", "2x - y + 1 = 0", True),
                  ("y = 2x + 1", "y = 2x - 1", False), ("f(x) = 3", "3", False)],
    "intervals": [("(1,3]", "(1, 3]", True), ("(1,3]", "[1,3]", False), ("[2,\\infty)", "[2, \\infty)", True),
                  ("(-\\infty, 2) \\cup (3, \\infty)", "(3,\\infty)\\cup(-\\infty,2)", True),
                  ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty, 2] \\cup (3, \\infty)", False),
                  ("\\left[ \\frac{1}{2}, 4 \\right)", "[0.5, 4)", True)],
    "tuples (ordered)": [("(1,2)", "(1, 2)", True), ("(1,2)", "(2,1)", False),
                         ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True), ("(1,2,3)", "(1,2)", False)],
    "solution sets (unordered)": [("1, 2", "2, 1", True), ("\\{1, 2\\}", "\\{2, 1\\}", True), ("1, 2", "1, 3", False),
                                  ("x=1 \\text{ or } x=2", "2, 1", True), ("1 \\pm \\sqrt{2}", "1+\\sqrt2, 1-\\sqrt2", True),
                                  ("1, 2, 2", "1, 2", False), ("7, -2, \\text{ and } -5", "-5, -2, 7", True),
                                  ("x \\in [-2,7]", "[-2, 7]", True), ("\\frac{12}{5,\\!525}", "\\frac{12}{5525}", True)],
    "matrices": [("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
                 ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\4&3\\end{pmatrix}", False),
                 ("\\begin{pmatrix} \\frac12 \\\\ -1 \\end{pmatrix}", "(0.5, -1)", True),
                 ("\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False)],
    "inequalities": [("x \\le 3", "(-\\infty, 3]", True), ("x < 3", "(-\\infty, 3]", False), ("3 > x", "x < 3", True),
                     ("1 < x \\leq 5", "(1, 5]", True), ("x \\geq 2", "[2,\\infty)", True), ("x > 2", "[2,\\infty)", False)],
    "text": [("\\text{Monday}", "monday", True), ("\\text{east wing}", "East Wing", True), ("Tuesday", "Monday", False),
             ("\\text{yes}", "7", False)],
    "base-n numbers": [("1011_2", "1011_{2}", True), ("1011_2", "11_{10}", True), ("1011", "1011_2", True),
                       ("1010_2", "1011_2", False), ("A3_{16}", "163_{10}", True)],
}
FLAT = [(kind, p, g, want) for kind, rows in CASES.items() for p, g, want in rows]


def test_every_kind_has_true_and_false_cases():
    for kind, rows in CASES.items():
        assert {want for _, _, want in rows} == {True, False}, kind


@pytest.mark.parametrize("kind, pred, gold, expected", FLAT, ids=[f"{k}:{p}|{g}" for k, p, g, _ in FLAT])
def test_math_equal(pool, kind, pred, gold, expected):
    assert math_equal(pred, gold, pool=pool) is expected


def test_fast_path_decides_plain_cases_without_sympy():
    for pred, gold, want in [("1,000", "1000", True), ("\\frac{1}{2}", "0.5", True), ("(1,3]", "(1,3)", False),
                             ("\\text{Monday}", "Tuesday", False), ("x \\le 3", "(-\\infty,3]", True)]:
        assert compare(parse_structure(prepare(pred)), parse_structure(prepare(gold)), fast_scalar) is want
    # a radical is left to sympy, not guessed
    assert compare(parse_structure(prepare("2\\sqrt2")), parse_structure(prepare("\\sqrt8")), fast_scalar) is None


def test_importing_grading_does_not_import_sympy():
    code = "import sys, dsmath.grading; print('sympy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ verdicts

def test_verdict_explains_itself(pool):
    v = pool.grade("Adding them, \\boxed{\\dfrac{1}{2}}.", "0.5")
    assert isinstance(v, Verdict)
    assert (v.correct, v.extracted, v.pred, v.gold, v.kind, v.path) == (True, "\\dfrac{1}{2}", "\\frac{1}{2}", "0.5", "number", "fast")
    assert not v.timed_out and 0 <= v.seconds < 1
    assert "CORRECT" in v.explain() and "\\frac{1}{2}" in v.explain()
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.correct = False  # type: ignore[misc]


def test_verdict_without_a_stated_answer(pool):
    v = pool.grade("I think it is 5", "5")
    assert (v.correct, v.extracted, v.path) == (False, None, "none")
    assert "no stated answer" in v.reason
    assert pool.grade("I think it is 5", "5", mode="lenient").correct


def test_symbolic_verdict_and_cache(pool):
    v1 = pool.grade("\\boxed{3\\sqrt{3}}", "\\sqrt{27}")
    v2 = pool.grade("The answer is $3 \\sqrt{3}$.", "\\sqrt{27}")  # same normalised pair
    assert (v1.correct, v1.path, v1.kind) == (True, "symbolic", "expression")
    assert (v2.correct, v2.path) == (True, "cache")


def test_module_level_grade_uses_default_pool():
    v = grade("\\boxed{x^2-1}", "(x-1)(x+1)")
    assert v.correct and v.path in ("symbolic", "cache")
