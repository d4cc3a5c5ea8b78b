"""The symbolic path: sympy equality of two prepared answers. Imports sympy; runs inside pool workers.

Not guaranteed: time. ``symbolic_equal('10^{10^{10}}', '1')`` may run for minutes; callers go through
``dsmath.grading.pool.GradingPool``, which kills the worker at the deadline.
"""

from __future__ import annotations

import random

import sympy

from dsmath.grading.compare import compare, fast_scalar
from dsmath.grading.latex import LatexParseError, parse_latex
from dsmath.grading.normalize import Node, parse_number, parse_structure

_TRIALS = 4
_NUM_TOL = 1e-9


def _numeric(expr: sympy.Expr) -> complex | None:
    try:
        value = complex(sympy.N(expr, 30))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError):
        return None
    if value != value or abs(value) == float("inf"):  # nan / inf
        return None
    return value


def _close(x: complex, y: complex) -> bool:
    return abs(x - y) <= _NUM_TOL * max(1.0, abs(x), abs(y))


def _points(symbols, rng: random.Random):
    for _ in range(_TRIALS):
        yield {s: sympy.Rational(rng.randint(1, 97), rng.randint(2, 13)) + rng.randint(0, 3) for s in symbols}


def exprs_equal(ea: sympy.Expr, eb: sympy.Expr, text_a: str = "", text_b: str = "") -> bool:
    """Equality of two sympy expressions: structural, then numeric (constants: at a written decimal's
    precision; with symbols: at random rational points), then ``simplify(a - b) == 0``."""
    if ea == eb:
        return True
    if ea.has(sympy.oo, -sympy.oo, sympy.zoo) or eb.has(sympy.oo, -sympy.oo, sympy.zoo):
        return bool(sympy.simplify(ea - eb) == 0) if not (ea.is_infinite or eb.is_infinite) else ea == eb
    symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
    if not symbols:
        va, vb = _numeric(ea), _numeric(eb)
        if va is not None and vb is not None:
            for text, v_dec, v_other in ((text_a, va, vb), (text_b, vb, va)):
                num = parse_number(text.replace(" ", "")) if text else None
                if num is not None and num.decimals is not None and num.sig_digits >= 2:
                    # a decimal against an exact value: equal at the decimal's written precision
                    return abs(v_dec - v_other) <= 0.5 * 10 ** (-min(num.decimals, 50)) + 1e-12
            return _close(va, vb)
    else:
        rng = random.Random(0)
        decided = True
        for point in _points(symbols, rng):
            va, vb = _numeric(ea.subs(point)), _numeric(eb.subs(point))
            if va is None or vb is None:
                decided = False
                break
            if not _close(va, vb):
                return False
        if decided:
            return True
    try:
        return bool(sympy.simplify(ea - eb) == 0)
    except (TypeError, ValueError, NotImplementedError):
        return False


_unparsed: list[str] = []  # leaves the converter could not read during the current symbolic_equal call


def symbolic_scalar(a: str, b: str) -> bool:
    fast = fast_scalar(a, b)
    if fast is not None:
        return fast
    try:
        ea = parse_latex(a)
    except (LatexParseError, TypeError, ValueError, ZeroDivisionError):
        _unparsed.append(a)
        return False
    try:
        eb = parse_latex(b)
    except (LatexParseError, TypeError, ValueError, ZeroDivisionError):
        _unparsed.append(b)
        return False
    return exprs_equal(ea, eb, a, b)


_RELATION_OPS = {"<": sympy.Lt, ">": sympy.Gt, "\\le": sympy.Le, "\\ge": sympy.Ge, "<=": sympy.Le, ">=": sympy.Ge}


def _relation_set(node: Node) -> tuple[sympy.Set, str | None]:
    """(the real solution set, its variable's name) of an inequality, interval, union or open pair."""
    if node.kind == "union":
        parts = [_relation_set(i) for i in node.items]
        names = {n for _, n in parts if n is not None}
        if len(names) > 1:
            raise ValueError("a union over two variables")
        return sympy.Union(*[s for s, _ in parts]), (names.pop() if names else None)
    if node.kind in ("interval", "tuple") and len(node.items) == 2:
        lo, hi = parse_latex(node.items[0].text), parse_latex(node.items[1].text)
        if lo.free_symbols or hi.free_symbols:
            raise ValueError("an interval with a symbolic end")
        return sympy.Interval(lo, hi, not node.left_closed, not node.right_closed), None
    if node.kind != "inequality":
        raise ValueError(f"not a relation: {node.kind}")
    exprs = [parse_latex(e.text) for e in node.items]
    symbols = set().union(*(e.free_symbols for e in exprs))
    if len(symbols) != 1:
        raise ValueError("an inequality in more or less than one variable")
    x = symbols.pop()
    xr = sympy.Symbol(x.name, real=True)
    exprs = [e.subs(x, xr) for e in exprs]
    solution = sympy.S.Reals
    for lhs, op, rhs in zip(exprs, node.ops, exprs[1:]):
        rel = _RELATION_OPS[op](lhs, rhs)
        solution = solution.intersect(sympy.solve_univariate_inequality(rel, xr, relational=False))
    return solution, x.name


def symbolic_relation(pred: Node, gold: Node) -> bool:
    """Inequalities, intervals and unions as real solution sets: ``-x > -1`` = ``x < 1`` = ``(-\\infty, 1)``;
    ``x < 1`` is not ``x \\le 1``. Two inequalities in different variables differ."""
    try:
        sp, vp = _relation_set(pred)
        sg, vg = _relation_set(gold)
    except (LatexParseError, TypeError, ValueError, ZeroDivisionError, NotImplementedError, KeyError):
        return pred.text == gold.text
    if vp is not None and vg is not None and vp != vg:
        return False
    if sp == sg:
        return True
    return sympy.Complement(sp, sg) == sympy.S.EmptySet and sympy.Complement(sg, sp) == sympy.S.EmptySet


_RELATIONAL = ("inequality", "interval", "union")


def symbolic_equation(pred: Node, gold: Node) -> bool:
    """Equivalent equations (``y = 2x + 1`` vs ``2x - y + 1 = 0``): lhs−rhs agree up to a nonzero constant;
    inequalities, intervals and unions: equal real solution sets (``symbolic_relation``)."""
    if pred.kind in _RELATIONAL or gold.kind in _RELATIONAL:
        return symbolic_relation(pred, gold)
    if pred.kind != "equation" or gold.kind != "equation":
        return pred.text == gold.text
    if pred.items[1].kind != "scalar" or gold.items[1].kind != "scalar":
        return False
    try:
        fa = parse_latex(pred.items[0].text) - parse_latex(pred.items[1].text)
        fb = parse_latex(gold.items[0].text) - parse_latex(gold.items[1].text)
    except (LatexParseError, TypeError, ValueError, ZeroDivisionError):
        return False
    symbols = sorted(fa.free_symbols | fb.free_symbols, key=str)
    if fb == 0 or fa == 0:
        return fa == fb
    ratios = []
    for point in _points(symbols, random.Random(1)):
        va, vb = _numeric(fa.subs(point)), _numeric(fb.subs(point))
        if va is None or vb is None or abs(vb) < 1e-12:
            continue
        ratios.append(va / vb)
    if len(ratios) >= 2:
        return abs(ratios[0]) > 1e-12 and all(_close(r, ratios[0]) for r in ratios)
    ratio = sympy.simplify(fa / fb)
    return bool(ratio.is_number and ratio != 0)


def symbolic_equal(pred_prepared: str, gold_prepared: str) -> tuple[bool, str]:
    """(equal, reason) for two ``prepare``-d answers; decides every pair (no 'undecided')."""
    p, g = parse_structure(pred_prepared), parse_structure(gold_prepared)
    _unparsed.clear()
    result = compare(p, g, symbolic_scalar, symbolic_equation)
    if result:
        return True, "symbolically equal"
    if _unparsed:
        return False, f"not a math expression the grader can read: {_unparsed[0][:80]!r}"
    return False, "symbolically different"
