"""A small LaTeX-math → sympy converter (recursive descent), for answer-sized expressions.

Why our own: sympy's ``parse_latex`` needs an antlr4 runtime of one exact version (4.11) and math answers
need only a small subset. It builds sympy objects directly; nothing is ``eval``-ed, so a model's answer cannot
run code. Covered: numbers (exact rationals), letters and Greek letters as symbols (``i`` is the imaginary unit),
``\\pi``, ``\\infty``, ``+ - * / \\cdot \\times \\div``, implicit multiplication, ``^`` and ``_``, ``\\frac``
(``\\frac12`` too), ``\\sqrt[n]{}``, ``\\binom``, ``!``, ``|x|``, trig/log/exp functions, ``( ) [ ] { }``,
``\\left``/``\\right``. Anything else raises :class:`LatexParseError`.

Not guaranteed: termination time. Evaluating ``10^{10^{10}}`` is as slow as sympy makes it; run this in a
worker with a deadline (see ``dsmath.grading.pool``).
"""

from __future__ import annotations

import re

import sympy

_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(\\[a-zA-Z]+|\\.)|([a-zA-Z])|(\S))")

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota",
    "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
    "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega",
}
_FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "ln": sympy.log, "exp": sympy.exp,
}
_IGNORED = {"\\left", "\\right", "\\displaystyle", "\\,", "\\!", "\\;", "\\:", "\\ ", "\\quad", "\\qquad",
            "\\limits", "\\big", "\\Big", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\mathrm", "\\text",
            "\\operatorname"}
_MUL = {"*", "\\cdot", "\\times", "\\ast"}
_DIV = {"/", "\\div"}
_OPEN = {"(": ")", "[": "]", "{": "}", "\\{": "\\}", "\\lbrace": "\\rbrace", "\\langle": "\\rangle"}
_MAX_TOKENS = 2000  # an answer is short; longer input is refused rather than parsed


class LatexParseError(ValueError):
    """The text is not an expression this converter understands."""


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            break
        pos = m.end()
        tok = next(g for g in m.groups() if g is not None)
        if tok in _IGNORED:
            continue
        tokens.append(tok)
        if len(tokens) > _MAX_TOKENS:
            raise LatexParseError("expression too long")
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokenize(text)
        self.i = 0
        self.abs_depth = 0
        self.closers: list[str] = []

    # -- token helpers
    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        if self.i >= len(self.toks):
            raise LatexParseError("unexpected end of expression")
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, tok: str) -> None:
        got = self.take()
        if got != tok:
            raise LatexParseError(f"expected {tok!r}, got {got!r}")

    # -- grammar
    def parse(self) -> sympy.Expr:
        if not self.toks:
            raise LatexParseError("empty expression")
        value = self.expr()
        if self.peek() is not None:
            raise LatexParseError(f"unexpected {self.peek()!r}")
        return value

    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def _starts_atom(self, tok: str | None) -> bool:
        if tok is None or tok in self.closers:
            return False
        if tok == "|":
            return self.abs_depth == 0
        if tok[0].isdigit() or tok[0] == "." or tok.isalpha() or tok in _OPEN:
            return True
        if tok.startswith("\\") and len(tok) > 2:
            name = tok[1:]
            return name in _GREEK or name in _FUNCS or name in (
                "pi", "infty", "frac", "dfrac", "tfrac", "cfrac", "sqrt", "binom", "log", "lg", "mathbf", "lbrace",
                "langle", "e")
        return False

    def term(self) -> sympy.Expr:
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in _MUL:
                self.take()
                value = value * self.unary()
            elif tok in _DIV:
                self.take()
                value = value / self.unary()
            elif self._starts_atom(tok):
                value = value * self.power()
            else:
                return value

    def unary(self) -> sympy.Expr:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.postfix(self.atom())
        if self.peek() == "^":
            self.take()
            exponent = self.argument(unary=True)
            base = self.postfix(base ** exponent)
        return base

    def postfix(self, value: sympy.Expr) -> sympy.Expr:
        while self.peek() == "!":
            self.take()
            value = sympy.factorial(value)
        while self.peek() in ("\\%", "%"):
            self.take()
            value = value / 100
        return value

    def argument(self, *, unary: bool = False) -> sympy.Expr:
        """One LaTeX argument: ``{...}``, a single digit (``x^23`` is x²·3), a letter or a command atom."""
        tok = self.peek()
        if tok == "{":
            self.take()
            return self.group("}")
        if unary and tok == "-":
            self.take()
            return -self.argument()
        if tok is not None and (tok[0].isdigit() or tok[0] == "."):
            self.take()
            if len(tok) > 1:  # split "23" into "2" and "3"
                self.toks.insert(self.i, tok[1:])
            return sympy.Integer(int(tok[0])) if tok[0] != "." else self._number(tok)
        return self.atom()

    def group(self, closer: str) -> sympy.Expr:
        self.closers.append(closer)
        saved_abs, self.abs_depth = self.abs_depth, 0
        try:
            value = self.expr()
        finally:
            self.closers.pop()
            self.abs_depth = saved_abs
        self.expect(closer)
        return value

    @staticmethod
    def _number(tok: str) -> sympy.Expr:
        try:
            return sympy.Rational(tok)
        except (ValueError, TypeError) as exc:
            raise LatexParseError(f"bad number {tok!r}") from exc

    def _subscript(self) -> str:
        self.take()  # "_"
        tok = self.take()
        if tok == "{":
            parts = []
            while self.peek() not in ("}", None):
                parts.append(self.take())
            self.expect("}")
            return "".join(parts).replace("\\", "")
        return tok.replace("\\", "")

    def function(self, fn) -> sympy.Expr:
        power = None
        if self.peek() == "^":  # \sin^2 x
            self.take()
            power = self.argument(unary=True)
        if self.peek() in ("(", "\\left("):
            self.take()
            arg = self.group(")")
        else:
            arg = self.power()
            while self._starts_atom(self.peek()) and not (self.peek() or "").startswith("\\"):
                arg = arg * self.power()
        value = fn(arg)
        return value ** power if power is not None else value

    def atom(self) -> sympy.Expr:
        tok = self.take()
        if tok[0].isdigit() or (tok[0] == "." and len(tok) > 1):
            return self._number(tok)
        if tok in _OPEN:
            return self.group(_OPEN[tok])
        if tok == "|":
            self.abs_depth += 1
            try:
                value = self.expr()
            finally:
                self.abs_depth -= 1
            self.expect("|")
            return sympy.Abs(value)
        if tok.isalpha() and len(tok) == 1:
            if self.peek() == "_":
                return sympy.Symbol(f"{tok}_{self._subscript()}")
            return sympy.I if tok == "i" else sympy.Symbol(tok)
        if not tok.startswith("\\"):
            raise LatexParseError(f"unexpected {tok!r}")
        name = tok[1:]
        if name == "pi":
            return sympy.pi
        if name == "infty":
            return sympy.oo
        if name == "e":
            return sympy.E
        if name in _GREEK:
            if self.peek() == "_":
                return sympy.Symbol(f"{name}_{self._subscript()}")
            return sympy.Symbol(name)
        if name in ("frac", "dfrac", "tfrac", "cfrac"):
            num = self.argument()
            den = self.argument()
            return num / den
        if name == "binom":
            n = self.argument()
            k = self.argument()
            return sympy.binomial(n, k)
        if name == "sqrt":
            if self.peek() == "[":
                self.take()
                index = self.group("]")
                return sympy.root(self.argument(), index)
            return sympy.sqrt(self.argument())
        if name == "mathbf":
            return self.argument()
        if name in _FUNCS:
            return self.function(_FUNCS[name])
        if name in ("log", "lg"):
            base = None
            if self.peek() == "_":
                self.take()
                base = self.argument()
            elif name == "lg":
                base = sympy.Integer(10)
            return self.function(lambda a: sympy.log(a, base) if base is not None else sympy.log(a))
        raise LatexParseError(f"unsupported command {tok}")


def parse_latex(text: str) -> sympy.Expr:
    """A sympy expression for an answer-sized LaTeX (or plain ``2*x**2``-style) expression."""
    text = text.replace("**", "^")
    return _Parser(text).parse()
