"""Final-answer extraction from a model completion (or a reference solution): the answer a human grader reads.

Pure string work, linear in the completion's length (the spans and numbers are looked for in a bounded tail):
safe on a 1 MB completion and never calls sympy.

First, the completion is cleaned: chat-template tokens end it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``,
``<|im_start|>user`` … — text after the first one is another turn, not this answer) and sign-offs ("I hope it
is correct.") are dropped. Then, in priority order:

1. ``\\boxed{...}`` / ``\\fbox{...}`` with balanced braces (also ``\\boxed 5``): the last one; when the gold lists
   several answers and the last box holds fewer, the last boxes (one per gold answer, close together) joined;
2. a stated answer: Minerva's "The final answer is X", a "Final Answer" heading or label, "The answer is X",
   "Answer: X", "Answer $X$", GSM8K's ``#### N`` — reduced to the mathematical expression it states
   ("The largest $n$ is 34." -> ``34``; "$\\frac34$ cups" -> ``\\frac34``);
3. lenient mode only: the last LaTeX math span (``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``; an arithmetic
   chain ``5+3=8`` gives its result ``8``; a lone variable ``$n$`` is skipped when other spans exist);
4. lenient mode only, and only when the text has no math span at all: the last number written as a number
   (not a digit inside a word, nor next to LaTeX markup: ``\\frac{1+\\sqrt5}{2}`` yields nothing, never ``2``).

When the gold answer is a multiple-choice letter, a stated letter ("(B)", "answer is B", ``\\boxed{B}``,
``\\boxed{(B) 42}``) wins over boxed option text. Not guaranteed: recovering a letter from option text alone
(we do not see the options), nor the intended answer of a completion that states two different ones.
"""

from __future__ import annotations

import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MC_GOLD = re.compile(r"^\s*\(?\s*([A-J])\s*\)?\s*\.?\s*$")
_NUMBER = re.compile(r"(?<![A-Za-z_^\\{}\d.])-?(?:\d[\d,]*(?:\.\d+)?(?:/\d+)?|\.\d+)(?:\s*(?:%|percent\b))?")
_MAX_STATED_CHARS = 500  # a stated answer runs to the end of its line/sentence, but not forever
_TAIL_CHARS = 20_000  # spans and numbers are looked for near the end
_MAX_BOX_CHARS = 10_000  # a boxed answer longer than this is not an answer; bounds the scan
_MAX_BOX_TRIES = 8  # unclosed boxes to step back over (truncation); bounds the work on hostile text
_MAX_BOXES = 64  # boxes collected when the gold lists several answers
_BOX_GAP_CHARS = 400  # several boxes form one answer only when this close together

# chat-template tokens: <|im_end|>, <|eot_id|>, <｜end▁of▁sentence｜>, </s>, <eos>, <end_of_turn>, [INST] ...
_CHAT_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<｜[^｜<>\n]{1,40}｜>|</s>|<s>|<eos>|<bos>|<pad>|"
                         r"<(?:start|end)_of_turn>|\[/?INST\]")
_NEXT_PROBLEM = re.compile(r"\n\s*(?:Problem|Question|Q)\s*\d*\s*:")
_STATED_BEFORE = re.compile(r"answer|\\boxed|####", re.IGNORECASE)
_ROLE_LINE = re.compile(r"^\s*(?:assistant|model|gpt)\s*(?:\n|$)", re.IGNORECASE)
_SIGN_OFF = re.compile(r"(?:I hope (?:it|this|that) (?:is|was) (?:correct|right|helpful)|I hope (?:it|this) helps|"
                       r"Hope (?:it|this) helps|Let me know if [^\n]{0,120}|Feel free to [^\n]{0,120})\s*[.!]*",
                       re.IGNORECASE)

# stated-answer cues, strongest first; each is searched for its last occurrence
_CUES = (
    re.compile(r"final\s+answer\s+is\s*:?", re.IGNORECASE),
    re.compile(r"(?:^|\n)[#>*\s]*final\s+answer\s*[:：]?\s*(?:\*\*|__)?\s*[:：]?", re.IGNORECASE),
    re.compile(r"final\s+answer\s*(?:\*\*|__)?\s*[:：=]", re.IGNORECASE),
    re.compile(r"\banswer\s+(?:is|should\s+be|would\s+be|will\s+be|equals|=)\s*:?|\banswer\s*(?:\*\*|__)?\s*[:：]",
               re.IGNORECASE),
    re.compile(r"(?:^|\n)[#*\s]*answer\s*(?:\*\*|__)?(?=\s*(?:\$|\\\(|\\\[))", re.IGNORECASE),
)
_MATH_SPAN = re.compile(r"\$\$((?:[^$\\]|\\[\s\S]|\$(?!\$))+?)\$\$|(?<!\\)\$(?!\$)((?:[^$\\]|\\[\s\S])+?)\$|"
                        r"\\\(([\s\S]+?)\\\)|\\\[([\s\S]+?)\\\]")
_PROSE = re.compile(r"[A-Za-z]{3,}")  # a '$…$' "span" with words outside LaTeX commands is currency: "$5 and $"
_MAX_SPAN_CHARS = 2000
_COPULA = re.compile(r"\s(?:is|are|was|were|equals?|be|becomes|gives|=|:)\s", re.IGNORECASE)
_CUT = re.compile(r",?\s+(?:because|since|given that|as required|as desired|so that|which means|where)\b|"
                  r"\s+\((?:since|because|as)\b", re.IGNORECASE)
_LEADING_NUMBER = re.compile(r"^(-?\\?\$?\s*(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?\s*(?:%|\\%|percent(?:age)?\b|pct\b)?)\s*(?:[A-Za-z][A-Za-z\s\-']*)?$")


def _balanced_group(text: str, open_idx: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[open_idx] == '{'`` and the index after it."""
    depth = 0
    for j in range(open_idx, min(len(text), open_idx + _MAX_BOX_CHARS)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : j], j + 1
    return None


def _box_at(text: str, start: int, cmd: str) -> tuple[str, int] | None:
    """(content, end index) of the box command at ``start``, or None when it is unclosed."""
    i = start + len(cmd)
    while i < len(text) and text[i] == " ":  # \boxed{...}, or "\boxed 5" (argument up to '$' or whitespace)
        i += 1
    if i < len(text) and text[i] == "{":
        group = _balanced_group(text, i)
        return (group[0].strip(), group[1]) if group is not None else None
    if i > start + len(cmd):
        m = re.match(r"[^\s$]+", text[i:i + _MAX_STATED_CHARS])
        if m:
            return m.group(0).strip(), i + m.end()
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{}``/``\\fbox{}``; an unclosed (truncated) one is skipped."""
    found = _last_boxes(text, 1)
    return found[-1][0] if found else None


def _last_boxes(text: str, limit: int) -> list[tuple[str, int, int]]:
    """Up to ``limit`` complete boxes, the last ones, in text order: (content, start, end)."""
    end, out, tries = len(text), [], 0
    while len(out) < limit and tries < _MAX_BOX_TRIES + limit:
        start, cmd = max((text.rfind(c, 0, end), c) for c in _BOX_COMMANDS)
        if start < 0:
            break
        box = _box_at(text, start, cmd)
        if box is not None and not any(s <= start < e for _, s, e in out):  # a box inside a box: the outer one
            out.append((box[0], start, box[1]))
        elif box is None:
            tries += 1
        end = start
    return out[::-1]


def clean_completion(text: str) -> str:
    """The completion without chat-template tokens, the turns after its own, and sign-offs."""
    pos, cut = 0, len(text)
    for m in _CHAT_TOKEN.finditer(text):
        before = text[pos:m.start()]
        if before.strip() and not _ROLE_LINE.fullmatch(before):
            cut = m.start()
            break
        pos = m.end()
    text = _ROLE_LINE.sub("", text[pos:cut], count=1)
    for m in _NEXT_PROBLEM.finditer(text):  # a few-shot continuation: the model went on to invent the next problem
        if _STATED_BEFORE.search(text, 0, m.start()):
            text = text[: m.start()]
            break
    return _SIGN_OFF.sub("", text) if "hope" in text or "Hope" in text or "Let me" in text or "Feel free" in text else text


def _math_spans(text: str) -> list[tuple[str, int, int]]:
    """(content, start, end) of the $…$, $$…$$, \\(…\\), \\[…\\] spans of ``text``, in order."""
    out = []
    for m in _MATH_SPAN.finditer(text):
        content = next(g for g in m.groups() if g is not None)
        if m.group(2) is not None and _PROSE.search(re.sub(r"\\[A-Za-z]+(?:\s*\{[^{}]*\})?", "", content)):
            continue
        if len(content) <= _MAX_SPAN_CHARS and content.strip():
            out.append((content.strip(), m.start(), m.end()))
    return out


def _unwrap_math(s: str) -> str:
    """Replace each math span by its content ("$5$ and $7$" -> "5 and 7")."""
    return _MATH_SPAN.sub(lambda m: " " + next(g for g in m.groups() if g is not None).strip() + " ", s).strip()


def _outside_math_split(pattern: re.Pattern, s: str) -> list[re.Match]:
    """Matches of ``pattern`` in ``s`` that lie outside its math spans."""
    spans = [(a, b) for _, a, b in _math_spans(s)]
    return [m for m in pattern.finditer(s) if not any(a <= m.start() < b for a, b in spans)]


def _sentence(text: str) -> str:
    """The text after a cue: to the end of the line (the next line when the cue ends its own), cut before a
    sentence-ending period that lies outside math."""
    text = text[:_MAX_STATED_CHARS * 2].lstrip(" \t*_:")
    lines = text.split("\n")
    line = lines[0]
    if not line.strip(" *_#:") and len(lines) > 1:  # a "**Final Answer**" heading: the answer is on the next line(s)
        rest = [l for l in lines[1:4] if l.strip()]
        line = rest[0] if rest else ""
        if line.strip() in ("$$", "\\[") and len(rest) > 1:  # a display block split over lines
            line = " ".join(rest[:3])
    line = line[:_MAX_STATED_CHARS]
    spans = [(a, b) for _, a, b in _math_spans(line)]
    for m in re.finditer(r"\.(?=\s|$)|(?<=\D)!(?=\s|$)", line):
        if not any(a <= m.start() < b for a, b in spans) and line.count("$", 0, m.start()) % 2 == 0:
            line = line[: m.start()]
            break
    return line.strip().strip("*_").strip()


def reduce_statement(s: str) -> str | None:
    """The mathematical answer stated by one sentence: "The largest $n$ is 34" -> ``34``."""
    s = s.strip().strip("*_").strip()
    if not s:
        return None
    cuts = _outside_math_split(_CUT, s)
    if cuts:
        s = s[: cuts[0].start()].strip()
    spans = _math_spans(s)
    if len(spans) == 1 and spans[0][1] == 0 and spans[0][2] == len(s):
        return spans[0][0]
    copulas = _outside_math_split(_COPULA, " " + s + " ")
    if copulas and re.search(r"[a-z]{3,}", _MATH_SPAN.sub(" ", s[: copulas[-1].start()])):  # prose before it
        tail = (" " + s + " ")[copulas[-1].end():].strip()
        if tail and (re.search(r"\d", tail) or _math_spans(tail) or not _math_spans(s)):
            s = tail
    s = _unwrap_math(s).strip().rstrip(".,;:").strip()
    m = _LEADING_NUMBER.match(s)
    if m and not re.search(r"\b(?:and|or)\b", s):
        s = m.group(1).strip()
    return s or None


def _stated(text: str) -> str | None:
    for cue in _CUES:
        last = None
        for last in cue.finditer(text):
            pass
        if last is not None:
            ans = reduce_statement(_sentence(text[last.end():]))
            if ans:
                return ans
    k = text.rfind("####")
    if k >= 0:
        ans = text[k + 4 :].strip().split("\n", 1)[0].strip()
        if ans:
            return ans
    return None


def _reduce_span(span: str) -> str:
    """An arithmetic chain states its result: ``5 + 3 = 8`` -> ``8``; ``x = 8`` keeps its label."""
    if re.search(r",|;|\\text\s*\{\s*(?:or|and)|\b(?:or|and)\b", span):
        return span  # several answers ("x = 2 or x = -5", "AB=4, CD=5"): each keeps its label
    sides = [p.strip() for p in re.split(r"(?<![<>!\\])=|\\approx", span)]
    if len(sides) > 1 and sides[-1] and not re.search(r"[A-Za-z]", re.sub(r"\\(?:frac|dfrac|sqrt|cdot|times|div|pi|left|right)", "", sides[-2])):
        return sides[-1]
    if len(sides) > 2 and sides[-1]:
        return sides[0] + " = " + sides[-1]
    return span


def _last_math(text: str) -> str | None:
    spans = [c for c, _, _ in _math_spans(text[-_TAIL_CHARS:])]
    while spans and re.fullmatch(r"\\?[A-Za-z]+(?:_\{?\w+\}?)?", spans[-1]) and len(spans) > 1:
        spans.pop()  # "... 12 ways to choose $k$": a lone variable is a mention, not the answer
    return _reduce_span(spans[-1]) if spans else None


def _last_number(text: str) -> str | None:
    tail = text[-_TAIL_CHARS:]
    m = None
    for m in _NUMBER.finditer(tail):
        pass
    if m is None:
        return None
    around = tail[max(0, m.start() - 40): m.end() + 20]
    if re.search(r"\\[A-Za-z]|[{}^_]", around):  # a digit of a LaTeX expression written without delimiters
        return None
    number = m.group(0).rstrip(",").replace("percent", "%").replace(" ", "")
    hedge = re.search(r"(?<![\w.])(-?\d[\d,]*(?:\.\d+)?)\s+or\s+$", tail[max(0, m.start() - 40): m.start()])
    return f"{hedge.group(1)} or {number}" if hedge else number  # "either 3 or 4": both, never just the last


def _gold_count(gold: str | None) -> int:
    """How many answers the gold lists (``1, 2`` / ``\\{1,2\\}`` / ``1 or 2``: 2; a tuple or interval: 1)."""
    if not gold:
        return 1
    from dsmath.grading.normalize import parse_structure, prepare  # local: normalize imports nothing heavy

    node = parse_structure(prepare(gold))
    return len(node.items) if node.kind == "set" and len(node.items) > 1 else 1


def _boxed_answer(text: str, gold: str | None) -> str | None:
    n = _gold_count(gold) if "\\boxed" in text or "\\fbox" in text else 1
    boxes = _last_boxes(text, min(n, _MAX_BOXES))
    if not boxes:
        return None
    last = boxes[-1][0]
    if n == 1 or len(boxes) == 1 or _gold_count(last) > 1:
        return last
    kept = [boxes[-1]]
    for box in reversed(boxes[:-1]):  # only boxes close to each other answer together
        if kept[0][1] - box[2] > _BOX_GAP_CHARS:
            break
        kept.insert(0, box)
    return ", ".join(dict.fromkeys(c for c, _, _ in kept))


def _letter(answer: str) -> str | None:
    """A letter stated as the answer: 'B', '(B)', '\\text{(B)}', '(B) 42', 'B: 42'."""
    s = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", answer).strip().strip("$").strip()
    m = re.match(r"^\(?([A-J])\)?(?:$|[\s.:)]|\s*\()", s)
    return m.group(1) if m else None


def gold_is_letter(gold: str | None) -> bool:
    return gold is not None and _MC_GOLD.match(gold) is not None


def extract_answer(completion: str, *, mode: str = "strict", gold: str | None = None) -> str | None:
    """The final answer a completion states, or None.

    ``mode="strict"`` (training rewards) needs a stated answer: boxed, "final answer", "the answer is",
    "Answer:" or ``####``. ``mode="lenient"`` (evaluation) also takes the last math span, then, only in a text
    without math spans, the last number. ``gold`` decides whether several boxes form one answer (the gold
    lists several) and, for multiple choice, that a stated letter wins over boxed option text.
    """
    if mode not in ("strict", "lenient"):
        raise ValueError(f"mode must be 'strict' or 'lenient', got {mode!r}")
    if not completion:
        return None
    text = clean_completion(completion)
    letter_gold = gold_is_letter(gold)
    boxed = _boxed_answer(text, None if letter_gold else gold)
    stated = None if boxed is not None else _stated(text)
    answer = boxed if boxed is not None else stated
    if letter_gold:
        for candidate in (answer, _stated(text) if boxed is not None else None):
            if candidate and _letter(candidate):
                return _letter(candidate)
        # "... so the correct option is (C)." without an answer cue
        letters = re.findall(r"\(([A-J])\)", text[-2000:])
        if letters and answer is None:
            return letters[-1]
    if answer is not None or mode == "strict":
        return answer
    span = _last_math(text)
    return span if span is not None else _last_number(text)
