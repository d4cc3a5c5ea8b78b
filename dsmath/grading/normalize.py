"""Answer normalisation, exact number parsing and answer structure — pure string work, no sympy.

``normalize`` canonicalises the LaTeX of one answer (``\\dfrac``→``\\frac``, no ``\\left``/``\\right``,
``\\text{}`` unwrapped, units/degrees/``\\$`` dropped, thousands separators removed, spacing canonical).
``parse_number`` reads plain numbers exactly (``Fraction``): integers, decimals, ``a/b``, ``\\frac{a}{b}``,
scientific notation and percents. ``parse_structure`` splits an answer into a small tree: matrices,
unions of intervals, intervals, tuples, sets, equations, inequalities and scalars.

Guaranteed: every function here runs in time roughly linear in its input (no nested-quantifier regexes, no
big-number arithmetic: exponents are capped), so it is safe on hostile input in the caller's process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_ANSWER_CHARS = 1000  # longer "answers" are not graded symbolically
_MAX_EXPONENT = 400  # 1e400 is fine exactly; 1e99999999 would stall Fraction()

_UNITS = (
    "units?|square units?|sq units?|cubic units?|cm|centimeters?|meters?|m|km|kilometers?|mm|millimeters?|"
    "inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mi|mph|kg|kilograms?|g|grams?|pounds?|lbs?|ounces?|oz|"
    "liters?|litres?|l|ml|gallons?|cups?|seconds?|secs?|s|minutes?|mins?|hours?|hrs?|h|days?|weeks?|months?|"
    "years?|dollars?|cents?|euros?|degrees?|degree|deg|radians?|rad|percent|points?|people|persons?|students?|"
    "apples?|books?|cookies?|pages?|marbles?|boxes|eggs?|cars?|times|ways|sq\\.? ?(?:ft|in|cm|m)|cubic (?:feet|inches|cm|meters)"
)
_UNIT_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm|textup|rm)\s*\{\s*(?:" + _UNITS + r")\s*\}(?:\^\{?[23]\}?)?")
# bare words after a number: only units of 2+ letters ("3m" may be 3·m; "3 cm" is 3)
_BARE_UNITS = "|".join(u for u in _UNITS.split("|") if len(u.rstrip("?")) > 1 and u not in ("in", "s?"))
_TRAILING_UNIT = re.compile(r"^(.*?[\d}])\s*(?:" + _BARE_UNITS + r")(?:\^\{?[23]\}?)?\s*$", re.IGNORECASE)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|textup|textnormal|operatorname|rm|mathit)\s*\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_SPACE_KEEP = re.compile(r"(?<=[a-zA-Z]) +(?=[a-zA-Z])")


def strip_math_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def prepare(s: str) -> str:
    """Light normalisation that keeps the answer's structure (commas, brackets, '=', 'or')."""
    s = strip_math_delimiters(s.replace("\n", " "))
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\left\s*\.|\\right\s*\.", "", s)
    s = re.sub(r"(\d),\\!(?=\d{3})", r"\1", s)  # 5,\!525
    s = re.sub(r"\\left|\\right|\\displaystyle|\\!|\\bigl|\\bigr|\\Bigl|\\Bigr|\\big|\\Big", "", s)
    s = re.sub(r"(?<!\\)\\[,;:> ]|~|\\q?quad", " ", s)  # not the row break "\\\\ "
    s = s.replace("{,}", ",").replace("\\le ", "\\le").replace("\\ge ", "\\ge")
    s = _relations(s)
    s = s.replace("\\dots", "").replace("\\ldots", "").replace("\\cdots", "")
    s = _DEGREES.sub("", s)
    s = _PERCENT_WORDS.sub("%", s)
    s = _UNIT_TEXT.sub(" ", s) if not re.fullmatch(r"\s*\\(?:text|mbox|mathrm|textbf)\s*\{[^{}]*\}\s*", s) else s
    s = _TEXT_CMD.sub(lambda m: f" {m.group(1).strip()} ", s)
    s = s.replace("\\%", "%").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", " ", s).strip()
    m = _TRAILING_UNIT.match(s)
    if m and not re.search(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", m.group(1))):
        s = m.group(1).strip()
    s = s.rstrip(".").strip()
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)  # x \in [-2, 7]
    s = re.sub(r",\s*(?:and|or)\s+", ", ", s)  # "7, -2, and -5"
    if _THOUSANDS.match(s.replace(" ", "")):
        s = s.replace(",", "").replace(" ", "")
    return s


_PERCENT_WORDS = re.compile(r"(?<=[\d}])\s*(?:\\(?:text|mbox|mathrm|textrm)\s*\{\s*)?(?:percent(?:age)?s?|per\s?cent|pct)\b\.?"
                            r"(?:\s*\})?", re.IGNORECASE)
_RELATIONS = (
    (re.compile(r"\\leqslant|\\leq(?![a-zA-Z])|≤|<="), "\\le "), (re.compile(r"\\geqslant|\\geq(?![a-zA-Z])|≥|>="), "\\ge "),
    (re.compile(r"\\lt(?![a-zA-Z])"), "<"), (re.compile(r"\\gt(?![a-zA-Z])"), ">"),
    (re.compile(r"\\neq(?![a-zA-Z])|\\ne(?![a-zA-Z])|≠|!="), "\\neq "),
    (re.compile(r"\\approx(?![a-zA-Z])|≈|\\simeq(?![a-zA-Z])"), "="),
)


def _relations(s: str) -> str:
    """One spelling per relation: ``\\le`` ``\\ge`` ``<`` ``>`` ``\\neq``; ``\\approx`` states a value (``=``)."""
    if not any(c in s for c in "<>=≤≥≠≈\\"):
        return s
    for pattern, repl in _RELATIONS:
        s = pattern.sub(lambda _m, r=repl: r, s)
    s = re.sub(r"^\s*=\s*", "", s)  # "\\approx 11" alone
    return s


def finish(s: str) -> str:
    """Full normalisation of one leaf (no more structure to keep): canonical spacing, braces, zeros."""
    s = s.strip()
    s = re.sub(r"\s+", " ", s)
    s = _SPACE_KEEP.sub("\x00", s).replace(" ", "").replace("\x00", " ")
    s = re.sub(r"(\\[a-zA-Z]+) (?=[^a-zA-Z])", r"\1", s)
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _outer_wrap(s, "{", "}"):
        s = s[1:-1]
    if re.fullmatch(r"-?\d+\.\d*", s):  # 2.50 -> 2.5, 3.0 -> 3
        s = s.rstrip("0").rstrip(".")
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def normalize(s: str) -> str:
    """The canonical string form of one answer (structure kept, spacing/markup removed)."""
    return finish(prepare(s))


def _outer_wrap(s: str, open_ch: str, close_ch: str) -> bool:
    """True when s[0] and s[-1] are one matching pair (not '{a}+{b}')."""
    depth = 0
    for k, c in enumerate(s):
        if c == open_ch:
            depth += 1
        elif c == close_ch:
            depth -= 1
            if depth == 0 and k != len(s) - 1:
                return False
    return depth == 0


# ---------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Number:
    value: Fraction
    decimals: int | None  # digits after the point when written as a decimal, else None (exact)
    sig_digits: int
    percent: bool


_DEC = re.compile(r"^([+-]?)(\d+\.?\d*|\.\d+)(?:(?:e|E|\\times10\^|\*10\^|\\cdot10\^|×10\^)\{?([+-]?\d{1,6})\}?)?(%?)$")
_FRAC = re.compile(r"^([+-]?)\\frac(?:\{([+-]?\d{1,50})\}|(\d))(?:\{([+-]?\d{1,50})\}|(\d))(%?)$")
_SLASH = re.compile(r"^([+-]?)(\d{1,50})/(\d{1,50})(%?)$")


def parse_number(s: str) -> Number | None:
    """An exact plain number, or None (expressions, radicals and π are not numbers here)."""
    s = s.replace(" ", "")
    if not s or len(s) > 120:
        return None
    m = _DEC.match(s)
    if m:
        sign, digits, exp, pct = m.groups()
        if exp is not None and abs(int(exp)) > _MAX_EXPONENT:
            return None
        value = Fraction(digits)
        if exp is not None:
            value *= Fraction(10) ** int(exp)
        if sign == "-":
            value = -value
        decimals = len(digits.split(".", 1)[1]) if "." in digits else None
        if exp is not None and decimals is None:
            decimals = 0
        if exp is not None:
            decimals = max(0, (decimals or 0) - int(exp))
        sig = len(digits.replace(".", "").lstrip("0")) or 1
        return Number(value, decimals, sig, pct == "%")
    m = _FRAC.match(s)
    if m:
        sign, num, den, pct = m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5), m.group(6)
    else:
        m = _SLASH.match(s)
        if m:
            sign, num, den, pct = m.groups()
    if m:
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return Number(-value if sign == "-" else value, None, 99, pct == "%")
    return None


_BASE_N = re.compile(r"^([0-9A-Za-z]+)_\{?(\d{1,2})\}?$")


def parse_base_n(s: str) -> tuple[str, int, int] | None:
    """``1011_2`` / ``1011_{2}`` / ``A3_{16}`` -> (digits, base, value); None when not a base-n numeral."""
    m = _BASE_N.match(s.replace(" ", ""))
    if not m:
        return None
    digits, base = m.group(1), int(m.group(2))
    if not 2 <= base <= 36 or not any(c.isdigit() for c in digits) or len(digits) > 64:
        return None
    try:
        return digits.upper(), base, int(digits, base)
    except ValueError:
        return None


_WORDS = re.compile(r"^[A-Za-z][A-Za-z '\-]*$")


def is_text(s: str) -> bool:
    """A word answer ('Monday', 'east wing'), not a variable or an expression."""
    return bool(_WORDS.match(s)) and len(s.replace(" ", "")) >= 2 and not re.fullmatch(r"[a-zA-Z]\s?[a-zA-Z]?", s)


# ---------------------------------------------------------------- structure


@dataclass(frozen=True)
class Node:
    kind: str  # scalar | tuple | set | interval | union | matrix | equation | inequality
    text: str = ""  # scalar text, or the whole normalised answer
    items: tuple = ()  # children (tuple/set/union/matrix rows), or (lhs, rhs) for equations
    left_closed: bool = False
    right_closed: bool = False
    ops: tuple = ()  # inequality chain operators, normalised to '<' / '\\le'


def split_top(s: str, seps: tuple[str, ...]) -> list[str]:
    """Split on any separator at bracket depth 0 (brackets: () [] {} and \\{ \\})."""
    parts, depth, start, k = [], 0, 0, 0
    while k < len(s):
        c = s[k]
        if c == "\\" and k + 1 < len(s) and s[k + 1] in "{}":
            depth += 1 if s[k + 1] == "{" else -1
            k += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            for sep in seps:
                if s.startswith(sep, k):
                    parts.append(s[start:k])
                    k += len(sep)
                    start = k
                    break
            else:
                k += 1
                continue
            continue
        k += 1
    parts.append(s[start:])
    return parts


def _wrapped(s: str) -> bool:
    """s[0] in '([' and s[-1] in ')]' close each other at depth 0 (mixed types allowed: intervals)."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return False
    depth = 0
    for k, c in enumerate(s):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth == 0 and k != len(s) - 1:
                return False
    return depth == 0


_MATRIX = re.compile(r"^\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.DOTALL)
_REL = re.compile(r"(\\le|\\ge|\\neq|\\ne|<=|>=|<|>)")
_SYMBOL = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?$")


def is_symbol(s: str) -> bool:
    return bool(_SYMBOL.match(s.replace(" ", "")))


_LABEL = re.compile(r"^(?:m?\\angle ?)?(?:\\overline\{[A-Za-z]{1,4}\}|[A-Za-z]{1,3}|[A-Za-z][a-z]{2,15}(?: [a-z]{2,15}){0,2})"
                    r"(?:_\{?\w+\}?)?$")


def is_label(s: str) -> bool:
    """The left side of a labelled answer: ``x``, ``a_1``, ``(p,q)``, ``AB``, ``S:T``, ``\\angle ABC``, ``Area``.
    Not a label: anything with digits or operators (``2x``, ``x+y``, ``x^2``) or a function value (``f(x)``)."""
    s = s.strip()
    if is_symbol(s) or _LABEL.match(s):
        return True
    if len(s) > 2 and s[0] == "(" and s[-1] == ")":
        parts = split_top(s[1:-1], (",",))
        return len(parts) > 1 and all(is_symbol(p) for p in parts)
    parts = split_top(s, (":",))
    return len(parts) > 1 and all(is_symbol(p) or re.fullmatch(r"[A-Z]{1,3}", p.strip()) for p in parts)


def parse_structure(answer: str, *, _depth: int = 0) -> Node:
    """The structure of a prepared answer; leaves are fully normalised."""
    s = answer.strip()
    if _depth > 8 or len(s) > MAX_ANSWER_CHARS:
        return Node("scalar", finish(s))
    if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and _MATRIX.match(s[1:-1].strip()):
        s = s[1:-1].strip()  # \left( \begin{array}...\end{array} \right)
    m = _MATRIX.match(s)
    if m:
        rows = [r for r in re.split(r"\\\\", m.group(2)) if r.strip()]
        cells = tuple(tuple(Node("scalar", finish(c)) for c in r.split("&")) for r in rows)
        return Node("matrix", normalize(s), cells)
    # "x = 1 or x = 2", "1 and 2"
    alts = split_top(s, (" or ", " and ", ";"))
    if len(alts) > 1:
        return Node("set", finish(s), tuple(parse_structure(a, _depth=_depth + 1) for a in alts if a.strip()))
    unions = split_top(s, ("\\cup", " U "))
    if len(unions) > 1:
        return Node("union", finish(s), tuple(parse_structure(u, _depth=_depth + 1) for u in unions))
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        return Node("set", finish(s), tuple(parse_structure(p, _depth=_depth + 1) for p in split_top(inner, (",",)) if p.strip()))
    if len(s) > 2 and s[0] == "{" and s[-1] == "}" and _outer_wrap(s, "{", "}"):
        inner = split_top(s[1:-1], (",",))
        if len(inner) > 1 and all(p.strip() for p in inner):  # {-2021, 2021}: a set written with plain braces
            return Node("set", finish(s), tuple(parse_structure(p, _depth=_depth + 1) for p in inner))
    if _wrapped(s):
        inner = split_top(s[1:-1], (",",))
        if len(inner) == 1:
            inner = split_top(s[1:-1], (";",))  # (3; 2): a tuple written with semicolons
        if len(inner) > 1:
            children = tuple(parse_structure(p, _depth=_depth + 1) for p in inner)
            is_interval = len(inner) == 2 and (s[0] != "(" or s[-1] != ")" or "\\infty" in s)
            if is_interval:
                return Node("interval", finish(s), children, left_closed=s[0] == "[", right_closed=s[-1] == "]")
            return Node("tuple", finish(s), children)
    parts = split_top(s, (",",))
    if len(parts) > 1 and all(p.strip() for p in parts):
        return Node("set", finish(s), tuple(parse_structure(p, _depth=_depth + 1) for p in parts))
    sides = split_top(s, ("=",))
    sides = [p for p in sides]
    if len(sides) == 2 and not _REL.search(s) and sides[0].strip() and sides[1].strip():
        return Node("equation", finish(s), (Node("scalar", finish(sides[0])), parse_structure(sides[1], _depth=_depth + 1)))
    if "\\neq" in s:
        sides = s.split("\\neq")
        if len(sides) == 2 and is_symbol(sides[0]) and sides[1].strip() and not _REL.search(sides[1].replace("\\neq", "")):
            a = Node("scalar", finish(sides[1]))  # x \neq 3: (-oo, 3) U (3, oo)
            return Node("union", finish(s), (
                Node("interval", f"(-\\infty,{a.text})", (Node("scalar", "-\\infty"), a)),
                Node("interval", f"({a.text},\\infty)", (a, Node("scalar", "\\infty")))))
        return Node("scalar", finish(s))
    if _REL.search(s):
        pieces = _REL.split(s)
        exprs, ops = pieces[0::2], pieces[1::2]
        if all(e.strip() for e in exprs):
            return Node("inequality", finish(s), tuple(Node("scalar", finish(e)) for e in exprs), ops=tuple(ops))
    ratio = split_top(s, (":",))
    if len(ratio) > 1 and all(r.strip() for r in ratio):  # 7:32
        return Node("ratio", finish(s), tuple(Node("scalar", finish(r)) for r in ratio))
    if "\\pm" in s and s.count("\\pm") == 1:
        a, b = s.split("\\pm")
        a = a.strip() or "0"
        return Node("set", finish(s), (Node("scalar", finish(f"{a}+{b}")), Node("scalar", finish(f"{a}-{b}"))))
    return Node("scalar", finish(s))


def inequality_to_interval(node: Node) -> Node | None:
    """``x < 3`` -> (-∞, 3); ``1 < x \\le 5`` -> (1, 5]; ``3 > x`` -> (-∞, 3). None if not one variable."""
    exprs = [e.text for e in node.items]
    ops = list(node.ops)
    if len(exprs) == 2:
        var_left = is_symbol(exprs[0]) and not is_symbol(exprs[1])
        var_right = is_symbol(exprs[1]) and not is_symbol(exprs[0])
        if not (var_left or var_right):
            return None
        op = ops[0]
        bound = exprs[1] if var_left else exprs[0]
        less = op in ("<", "\\le", "<=")
        # x < b / b > x  -> upper bound;  x > b / b < x -> lower bound
        upper = less if var_left else not less
        closed = op in ("\\le", "\\ge", "<=", ">=")
        inf = Node("scalar", "\\infty")
        ninf = Node("scalar", "-\\infty")
        b = Node("scalar", bound)
        if upper:
            return Node("interval", node.text, (ninf, b), left_closed=False, right_closed=closed)
        return Node("interval", node.text, (b, inf), left_closed=closed, right_closed=False)
    if len(exprs) == 3 and is_symbol(exprs[1]) and not is_symbol(exprs[0]) and not is_symbol(exprs[2]):
        if all(o in ("<", "\\le", "<=") for o in ops):
            lo, hi = exprs[0], exprs[2]
        elif all(o in (">", "\\ge", ">=") for o in ops):
            lo, hi = exprs[2], exprs[0]
            ops = ops[::-1]
        else:
            return None
        return Node("interval", node.text, (Node("scalar", lo), Node("scalar", hi)),
                    left_closed=ops[0] in ("\\le", "\\ge", "<=", ">="), right_closed=ops[1] in ("\\le", "\\ge", "<=", ">="))
    return None
