"""Structural answer comparison, shared by the fast path and the symbolic path.

``compare(pred, gold, scalar)`` walks two ``Node`` trees; ``scalar(a, b)`` decides leaves and returns
True, False or None (undecided). ``fast_scalar`` is pure Python (strings, exact numbers, base-n, words) and
returns None whenever only sympy could tell; ``dsmath.grading.symbolic.symbolic_scalar`` always decides.
The tree result is three-valued too: None means "the fast path cannot tell, ask the symbolic worker".
"""

from __future__ import annotations

from fractions import Fraction
from typing import Callable, Optional

from dsmath.grading.normalize import (
    Node,
    inequality_to_interval,
    is_label,
    is_text,
    parse_base_n,
    parse_number,
)

Tri = Optional[bool]
Scalar = Callable[[str, str], Tri]
REL_TOL = 1e-9


def _all(results) -> Tri:
    """Three-valued AND: any False -> False, else any None -> None, else True."""
    undecided = False
    for r in results:
        if r is False:
            return False
        if r is None:
            undecided = True
    return None if undecided else True


def numbers_equal(a, b) -> bool:
    """Exact rationals compare exactly; when either side is a written decimal, a 1e-9 relative tolerance;
    a decimal (≥2 significant digits) against an exact non-integer fraction compares at the decimal's
    written precision (0.33 = 1/3); a percent matches either its value or its value/100."""
    candidates = [(a.value, b.value)]
    if a.percent != b.percent:
        pa = a.value / 100 if a.percent else a.value
        pb = b.value / 100 if b.percent else b.value
        candidates.append((pa, pb))
    for x, y in candidates:
        if x == y:
            return True
        # a long decimal rounded to the precision the gold (b) states: 0.3333 = 0.33, 3.14159 = 3.14 (not 0.34 = 0.3)
        if a.decimals is not None and b.decimals is not None and b.sig_digits >= 2 and a.decimals >= b.decimals + 2:
            if abs(x - y) <= Fraction(1, 2) * Fraction(1, 10 ** min(b.decimals, 50)):
                return True
        # a written decimal is approximate: a 1e-9 relative tolerance (two exact integers compare exactly)
        if a.decimals is not None or b.decimals is not None:
            if abs(x - y) <= Fraction(REL_TOL) * max(abs(x), abs(y)):
                return True
            if a.decimals is not None and b.decimals is not None:
                continue
        for dec, x_, y_ in ((a, x, y), (b, y, x)):
            other = b if dec is a else a
            if dec.decimals is not None and other.decimals is None and dec.sig_digits >= 2 and other.value.denominator != 1:
                if abs(x_ - y_) <= Fraction(1, 2) * Fraction(1, 10 ** min(dec.decimals, 50)):
                    return True
    return False


def fast_scalar(a: str, b: str) -> Tri:
    if a == b:
        return True
    if a.lower() == b.lower() and (is_text(a) or is_text(b)):
        return True
    na, nb = parse_number(a), parse_number(b)
    if na is not None and nb is not None:
        return numbers_equal(na, nb)
    ba, bb = parse_base_n(a), parse_base_n(b)
    if ba is not None or bb is not None:
        if ba is not None and bb is not None:
            return ba[2] == bb[2]
        based, plain = (ba, b) if ba is not None else (bb, a)
        return plain.replace(" ", "").upper() == based[0]
    if is_text(a) and is_text(b):
        return False
    if (is_text(a) and nb is not None) or (is_text(b) and na is not None):
        return False
    return None


def _as_interval(node: Node) -> Node | None:
    if node.kind == "interval":
        return node
    if node.kind == "tuple" and len(node.items) == 2:  # "(1, 3)": a point or an open interval
        return Node("interval", node.text, node.items, left_closed=False, right_closed=False)
    if node.kind == "inequality":
        return inequality_to_interval(node)
    return None


def _match_unordered(ps: tuple, gs: tuple, scalar: Scalar, equation: Callable) -> Tri:
    if len(ps) != len(gs):
        return False
    remaining = list(gs)
    undecided = False
    for p in ps:
        found = False
        for k, g in enumerate(remaining):
            r = compare(p, g, scalar, equation)
            if r is True:
                remaining.pop(k)
                found = True
                break
            if r is None:
                undecided = True
        if not found:
            return None if undecided else False
    return True


def _strip_var(node: Node) -> Node | None:
    """``x = 3`` / ``(p,q) = (3,2)`` / ``AB = 4`` -> the node of the value when the left side is a label."""
    if node.kind == "equation" and is_label(node.items[0].text):
        return node.items[1]
    return None


def _labels(node: Node) -> list[str] | None:
    """The distinct labels of ``AB = 4, CD = 5`` (every item labelled, no label twice), else None."""
    if node.kind != "set" or len(node.items) < 2:
        return None
    labels = [i.items[0].text for i in node.items if i.kind == "equation" and is_label(i.items[0].text)]
    return labels if len(labels) == len(node.items) and len(set(labels)) == len(labels) else None


def _compare_sets(pred: Node, gold: Node, scalar: Scalar, equation) -> Tri:
    """Solutions match in any order; distinct labelled values (``AB=4, CD=5``) match by label, or in order
    against a bare list (``4, 5``: the question's quantities in its order)."""
    lp, lg = _labels(pred), _labels(gold)
    if lp is None and lg is None:
        return _match_unordered(pred.items, gold.items, scalar, equation)
    if len(pred.items) != len(gold.items):
        return False
    if lp is not None and lg is not None:
        if set(lp) != set(lg):
            return _match_unordered(pred.items, gold.items, scalar, equation)
        by_label = {i.items[0].text: i for i in gold.items}
        return _all(compare(i, by_label[i.items[0].text], scalar, equation) for i in pred.items)
    return _all(compare(a, b, scalar, equation) for a, b in zip(pred.items, gold.items))


_RELATIONAL = ("inequality", "interval", "union")


def _ratio_value(node: Node) -> Node | None:
    if node.kind == "ratio" and len(node.items) == 2:
        return Node("scalar", "\\frac{" + node.items[0].text + "}{" + node.items[1].text + "}")
    return None


def compare(pred: Node, gold: Node, scalar: Scalar, equation: Callable | None = None) -> Tri:
    """True / False / None (undecided by ``scalar``) for two answer trees."""
    if pred.text == gold.text and pred.kind == gold.kind:
        return True
    pk, gk = pred.kind, gold.kind
    if pk == "equation" or gk == "equation":
        return _compare_equations(pred, gold, scalar, equation)
    if "interval" in (pk, gk) or "inequality" in (pk, gk) or ("union" in (pk, gk)):
        return _compare_relations(pred, gold, scalar, equation)
    if pk == "matrix" or gk == "matrix":
        return _compare_matrices(pred, gold, scalar, equation)
    if pk == "ratio" or gk == "ratio":
        return _compare_ratios(pred, gold, scalar, equation)
    if pk == "set" and gk == "set":
        return _compare_sets(pred, gold, scalar, equation)
    if pk in ("tuple", "set") and gk in ("tuple", "set"):  # a tuple against a bare list: in order
        if len(pred.items) != len(gold.items):
            return False
        return _all(compare(a, b, scalar, equation) for a, b in zip(pred.items, gold.items))
    if pk == "scalar" and gk == "scalar":
        return scalar(pred.text, gold.text)
    # one container against a scalar: a one-element set, or a mismatch
    if pk == "set" and len(pred.items) == 1:
        return compare(pred.items[0], gold, scalar, equation)
    if gk == "set" and len(gold.items) == 1:
        return compare(pred, gold.items[0], scalar, equation)
    return False


def _compare_equations(pred: Node, gold: Node, scalar: Scalar, equation: Callable | None) -> Tri:
    """At least one side is an equation. Two equations: same label -> compare the right-hand sides, else
    ``equation`` decides (None without it). One equation: its ``x = `` is dropped (False if it is not of that
    form) and the rest compared."""
    pk, gk = pred.kind, gold.kind
    if pk == gk:
        lp, lg = pred.items[0].text, gold.items[0].text
        if is_label(lp) and lp == lg:
            return compare(pred.items[1], gold.items[1], scalar, equation)
        if equation is None:
            return None
        return equation(pred, gold)
    sp = _strip_var(pred) if pk == "equation" else pred
    sg = _strip_var(gold) if gk == "equation" else gold
    if sp is None or sg is None:
        return False
    return compare(sp, sg, scalar, equation)


def _compare_relations(pred: Node, gold: Node, scalar: Scalar, equation: Callable | None) -> Tri:
    """At least one side is an inequality, interval or union: both sides as intervals (unions matched
    unordered), same closedness, equal end points. A side that is no interval is False, except that an
    inequality not of the form "x < b" (``-x > -1``) is left to ``equation`` (sympy; None without it)."""
    pk, gk = pred.kind, gold.kind
    symbolic_relation = ("inequality" in (pk, gk) and pk in _RELATIONAL + ("tuple",) and gk in _RELATIONAL + ("tuple",))
    if pk == "inequality" and gk == "inequality":
        ip, ig = inequality_to_interval(pred), inequality_to_interval(gold)
        if ip is None or ig is None:
            return None if equation is None else equation(pred, gold)
        return compare(ip, ig, scalar, equation)
    if pk == "union" or gk == "union":
        ps = pred.items if pk == "union" else (pred,)
        gs = gold.items if gk == "union" else (gold,)
        ps = tuple(_as_interval(p) for p in ps)
        gs = tuple(_as_interval(g) for g in gs)
        if any(x is None for x in ps + gs):
            if symbolic_relation:
                return None if equation is None else equation(pred, gold)
            return False
        return _match_unordered(ps, gs, scalar, equation)
    ip, ig = _as_interval(pred), _as_interval(gold)
    if ip is None or ig is None:
        if symbolic_relation:
            return None if equation is None else equation(pred, gold)
        return False
    if (ip.left_closed, ip.right_closed) != (ig.left_closed, ig.right_closed):
        return False
    return _all(compare(a, b, scalar, equation) for a, b in zip(ip.items, ig.items))


def _compare_matrices(pred: Node, gold: Node, scalar: Scalar, equation: Callable | None) -> Tri:
    """At least one side is a matrix. Two matrices: same shape, equal cells in order. A matrix against a
    tuple: only a row or column vector, compared element by element."""
    def flat(n: Node):
        if n.kind == "matrix":
            if len(n.items) == 1 or all(len(r) == 1 for r in n.items):
                return tuple(c for r in n.items for c in r)
            return None
        return n.items if n.kind == "tuple" else None
    if pred.kind == gold.kind:
        if len(pred.items) != len(gold.items) or any(len(a) != len(b) for a, b in zip(pred.items, gold.items)):
            return False
        return _all(compare(a, b, scalar, equation) for ra, rb in zip(pred.items, gold.items) for a, b in zip(ra, rb))
    fp, fg = flat(pred), flat(gold)
    if fp is None or fg is None or len(fp) != len(fg):
        return False
    return _all(compare(a, b, scalar, equation) for a, b in zip(fp, fg))


def _compare_ratios(pred: Node, gold: Node, scalar: Scalar, equation: Callable | None) -> Tri:
    """At least one side is a ratio: term by term first (two ratios of the same length); failing that, a
    two-term ratio is compared as its value (14:7 = 2:1; S:T = 7:32 vs 7/32)."""
    pk, gk = pred.kind, gold.kind
    if pk == gk and len(pred.items) == len(gold.items):
        same = _all(compare(a, b, scalar, equation) for a, b in zip(pred.items, gold.items))
        if same is not False or len(pred.items) != 2:
            return same
    vp, vg = _ratio_value(pred) or pred, _ratio_value(gold) or gold  # 14:7 = 2:1; S:T = 7:32 vs 7/32
    if vp.kind != "scalar" or vg.kind != "scalar":
        return False
    return scalar(vp.text, vg.text)


def kind_of(node: Node) -> str:
    """The answer kind reported in verdicts (of the gold answer)."""
    if node.kind != "scalar":
        return node.kind
    t = node.text
    if len(t) == 1 and t.isalpha() and t.isupper():
        return "choice"
    if parse_number(t) is not None:
        return "number"
    if parse_base_n(t) is not None:
        return "base_n"
    if is_text(t):
        return "text"
    return "expression"
