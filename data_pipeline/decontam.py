"""Benchmark decontamination by n-gram overlap (DeepSeekMath §2.1: drop pages sharing a 10-gram with a benchmark).

Text is normalised first (:func:`normalise_tokens`): lower case, LaTeX spacing commands (``\\,`` ``\\;``
``\\quad`` ``~``), ``\\left``/``\\right`` and ``$`` delimiters dropped, ``\\dfrac``/``\\tfrac`` → ``frac``,
punctuation removed, whitespace collapsed. Tokens are word runs, except that every CJK character is its own
token, so Chinese benchmarks (CMATH, Gaokao) get character n-grams and mixed Chinese+LaTeX works too.

The index holds 64-bit hashes of every ``ngram``-gram of each benchmark question, and for questions shorter
than ``ngram`` but with at least ``min_ngram`` tokens, the hash of the whole question (matched exactly as a
token sequence of that length). Each hash maps to one (benchmark, row) item for the report.
Guaranteed: a page containing a benchmark question's normalised 10-gram is flagged. Not guaranteed:
paraphrases, or collisions-free hashing (64-bit: ~1e-13 per lookup).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dsmath.datasets import iter_jsonl
from dsmath.userfiles import FileError, check_readable

SHIPPED_INDEX = Path(__file__).resolve().parents[1] / "dsmath" / "data" / "decontam_index.npz"

# benchmark file → (name, the JSON field holding the question text)
BENCHMARK_FILES = {
    "gsm8k_test.jsonl": ("gsm8k", "question"),
    "math_test.jsonl": ("math", "problem"),
    "cmath_test.jsonl": ("cmath", "question"),
    "agieval_gaokao-mathqa.jsonl": ("agieval_gaokao_mathqa", "question"),
    "agieval_gaokao-mathcloze.jsonl": ("agieval_gaokao_mathcloze", "question"),
    "mmlu_stem_test.jsonl": ("mmlu_stem", "question"),
}

_LATEX_SPACING = re.compile(r"\\[,;:! ]|\\(?:q?quad|thinspace|medspace|thickspace|enspace|displaystyle|textstyle)\b|~")
_LATEX_SIZING = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)[lr]?\b")
_FRAC = re.compile(r"\\[dt]frac\b")
_COMMAND = re.compile(r"\\([a-z]+)")
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
_CJK_RE = re.compile(rf"[{_CJK}]")
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


def normalise_tokens(text: str) -> list[str]:
    """Tokens after normalisation (see the module docstring); the same function runs on pages and benchmarks."""
    t = text.lower()
    t = _LATEX_SPACING.sub(" ", t)
    t = _LATEX_SIZING.sub(" ", t)
    t = _FRAC.sub(r"\\frac", t)
    t = _COMMAND.sub(r" \1 ", t)  # "\\lfloor6" -> " lfloor 6": a command never glues to its argument
    return _TOKEN.findall(t)


_TOKEN_HASH: dict[str, int] = {}
_MULT = np.uint64(0x100000001B3)  # FNV-64 prime: the polynomial base of the rolling n-gram hash


def token_hash(tok: str) -> int:
    h = _TOKEN_HASH.get(tok)
    if h is None:
        if len(_TOKEN_HASH) > 2_000_000:
            _TOKEN_HASH.clear()
        h = _TOKEN_HASH[tok] = int.from_bytes(hashlib.blake2b(tok.encode("utf-8"), digest_size=8).digest(), "little")
    return h


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """Vectorised: hash(t_i..t_{i+n-1}) = Σ_j H(t_{i+j})·B^(n-1-j) mod 2^64 for every start i (uint64 array)."""
    m = len(tokens) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    th = np.fromiter((token_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc = acc * _MULT + th[j : j + m]  # uint64 arithmetic wraps: that is the mod 2^64
    return acc


def ngram_hashes_loop(tokens: list[str], n: int) -> list[int]:
    """Plain-loop reference for :func:`ngram_hashes` (Python ints, explicit mod 2^64)."""
    out = []
    for i in range(len(tokens) - n + 1):
        h = 0
        for t in tokens[i : i + n]:
            h = (h * int(_MULT) + token_hash(t)) % (1 << 64)
        out.append(h)
    return out


def _is_wordy(tok: str) -> bool:
    return len(tok) >= 2 and not tok.isdigit() or bool(_CJK_RE.match(tok))


def informative(tokens: list[str], min_words: int = 3) -> bool:
    """An n-gram of numbers and single letters ("1 2 3 … 10", "f x a nx n") is too generic to prove contamination."""
    return sum(_is_wordy(t) for t in tokens) >= min_words


@dataclass
class DecontamIndex:
    hashes: np.ndarray  # uint64, sorted
    items: np.ndarray  # uint32, benchmark_index << 20 | row, aligned with hashes
    benchmarks: list[str]
    ngram: int
    short_lengths: list[int]  # token lengths of short questions indexed whole

    def item_name(self, code: int) -> str:
        return f"{self.benchmarks[code >> 20]}:{code & 0xFFFFF}"

    def lookup(self, hashes) -> list[tuple[int, int]]:
        """(position in ``hashes``, item code) for every hash present in the index."""
        if len(hashes) == 0 or len(self.hashes) == 0:
            return []
        q = np.asarray(hashes, dtype=np.uint64)
        pos = np.searchsorted(self.hashes, q)
        pos = np.minimum(pos, len(self.hashes) - 1)
        hit = self.hashes[pos] == q
        return [(int(i), int(self.items[pos[i]])) for i in np.flatnonzero(hit)]

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, hashes=self.hashes, items=self.items, ngram=self.ngram,
                            short_lengths=np.array(self.short_lengths, dtype=np.int32),
                            benchmarks=np.array(json.dumps(self.benchmarks)))

    @classmethod
    def load(cls, path: str | Path) -> "DecontamIndex":
        """The index saved by :meth:`save`; a file that is not one (damaged, truncated, another .npz) is a
        one-line ``FileError`` naming it."""
        path = check_readable(path, "n-gram index file")
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["hashes"], z["items"], json.loads(str(z["benchmarks"])), int(z["ngram"]),
                           [int(x) for x in z["short_lengths"]])
        except Exception as exc:  # zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError, zlib.error ...
            raise FileError(f"{path}: not a readable dsmath n-gram index ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild it with "
                            f"dsmath corpus build-index") from None


def build_index(texts_by_benchmark: dict[str, list[str]], *, ngram: int = 10, min_ngram: int = 3) -> DecontamIndex:
    """Index every benchmark question (a dict benchmark name → question texts, row order kept)."""
    benchmarks = sorted(texts_by_benchmark)
    seen: dict[int, int] = {}
    short = set()
    for bi, name in enumerate(benchmarks):
        for row, text in enumerate(texts_by_benchmark[name]):
            toks = normalise_tokens(text)
            code = (bi << 20) | row
            if len(toks) >= ngram:
                keep = [i for i in range(len(toks) - ngram + 1) if informative(toks[i : i + ngram])]
                hs = ngram_hashes(toks, ngram)[keep].tolist()
            elif len(toks) >= min_ngram and informative(toks, 1):  # short: exact, but not pure numbers
                hs = ngram_hashes(toks, len(toks)).tolist()
                short.add(len(toks))
            else:
                continue
            for h in hs:
                seen.setdefault(h, code)  # the first item owning an n-gram is the one reported
    hashes = np.fromiter(seen.keys(), dtype=np.uint64, count=len(seen))
    items = np.fromiter(seen.values(), dtype=np.uint32, count=len(seen))
    order = np.argsort(hashes)
    return DecontamIndex(hashes[order], items[order], benchmarks, ngram, sorted(short))


def load_benchmarks(benchmark_dir: str | Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    d = Path(benchmark_dir)
    for fname, (name, key) in BENCHMARK_FILES.items():
        p = d / fname
        if p.exists():  # a damaged file is a one-line error naming file:line (dsmath.datasets.iter_jsonl)
            out[name] = [obj.get(key, "") for obj in iter_jsonl(p)]
    return out


_CACHE: dict[str, DecontamIndex] = {}


def get_index(index_path: str = "", benchmark_dir: str = "", ngram: int = 10, min_ngram: int = 3) -> DecontamIndex:
    """The shipped index by default; an explicit ``index_path``; or one built from ``benchmark_dir`` (cached)."""
    key = f"{index_path}|{benchmark_dir}|{ngram}|{min_ngram}"
    if key not in _CACHE:
        if benchmark_dir:
            _CACHE[key] = build_index(load_benchmarks(benchmark_dir), ngram=ngram, min_ngram=min_ngram)
        else:
            _CACHE[key] = DecontamIndex.load(index_path or SHIPPED_INDEX)
    return _CACHE[key]


def find_contamination(text: str, index: DecontamIndex) -> dict | None:
    """The first benchmark match in ``text`` as ``{item, ngram}``, or None if the text is clean.

    Grows the n-gram hashes one token at a time (``acc_n = acc_{n-1}·B + H(t_{i+n-1})``), so every length the
    index needs (the short-question lengths and ``ngram``) costs one vector step each."""
    toks = normalise_tokens(text)
    if not toks or len(index.hashes) == 0:
        return None
    th = np.fromiter((token_hash(t) for t in toks), dtype=np.uint64, count=len(toks))
    wanted = set(index.short_lengths) | {index.ngram}
    acc = th.copy()
    with np.errstate(over="ignore"):
        for n in range(1, max(wanted) + 1):
            if n > 1:
                acc = acc[:-1] * _MULT + th[n - 1 :]
            if len(acc) == 0:
                break
            if n in wanted:
                hits = index.lookup(acc)
                if hits:
                    pos, code = hits[0]
                    return {"item": index.item_name(code), "ngram": " ".join(toks[pos : pos + n])}
    return None


def decontam_batch(rows: list[dict], *, index_path: str = "", benchmark_dir: str = "", ngram: int = 10,
                   min_ngram: int = 3) -> list[dict]:
    """Stage function: adds ``contaminated_by`` (item name or "") and ``contaminated_ngram`` to every row."""
    index = get_index(index_path, benchmark_dir, ngram, min_ngram)
    out = []
    for r in rows:
        m = find_contamination(r.get("text") or "", index)
        out.append({**r, "contaminated_by": m["item"] if m else "", "contaminated_ngram": m["ngram"] if m else ""})
    return out
