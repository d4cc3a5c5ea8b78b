"""fastText recall model (DeepSeekMath §2.1) and token-budget selection. Pure: imports fasttext, not Ray.

Training text is one line per page: lower-cased, whitespace-collapsed, first ``max_chars`` characters, with
``$``/``\\`` split off as their own tokens so LaTeX is visible to the word n-grams.
``select_by_budget`` ranks pages by score and keeps the best until the token budget is spent (the paper keeps
a fixed budget per iteration, not a score threshold). Ties break by id so the result is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_SPLIT = re.compile(r"([$\\{}^_=+\-*/()\[\]])")
_WS = re.compile(r"\s+")


def fasttext_line(text: str, max_chars: int = 20000) -> str:
    t = _SPLIT.sub(r" \1 ", text[:max_chars].lower())
    return _WS.sub(" ", t).strip()


def count_tokens(text: str) -> int:
    return len(text.split())


def train(positives: list[str], negatives: list[str], out_path: str | Path, *, dim: int = 256, lr: float = 0.1,
          word_ngrams: int = 3, min_count: int = 3, epoch: int = 3, bucket: int = 200000, threads: int = 1,
          seed: int = 0, max_chars: int = 20000) -> Path:
    """Train a supervised fastText model (labels ``__label__math`` / ``__label__other``) and save it."""
    if not positives or not negatives:
        raise ValueError(f"need positives and negatives to train (got {len(positives)} and {len(negatives)})")
    rng = np.random.RandomState(seed)
    lines = [f"__label__math {fasttext_line(t, max_chars)}" for t in positives]
    lines += [f"__label__other {fasttext_line(t, max_chars)}" for t in negatives]
    lines = [lines[i] for i in rng.permutation(len(lines))]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, dir=out_path.parent) as fh:
        fh.write("\n".join(lines) + "\n")
        train_file = fh.name
    params = {"input": train_file, "dim": dim, "lr": lr, "wordNgrams": word_ngrams, "minCount": min_count,
              "epoch": epoch, "bucket": bucket, "thread": threads, "seed": seed, "verbose": 0}
    try:
        for attempt in range(4):
            # A fresh interpreter per training run: in a long-lived process that has run other native code,
            # fastText 0.9.2 was seen to abort with "Encountered NaN" on inputs that train fine on their own.
            proc = subprocess.run([sys.executable, "-c", _TRAIN_SNIPPET, json.dumps(params), str(out_path)],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
            if "NaN" not in proc.stderr or attempt == 3:  # diverged: retry with half the learning rate
                raise RuntimeError(f"fastText training failed: {proc.stderr.strip()[-500:]}")
            params["lr"] /= 2
    finally:
        os.unlink(train_file)
    return out_path


_TRAIN_SNIPPET = """
import json, sys
import fasttext
fasttext.train_supervised(**json.loads(sys.argv[1])).save_model(sys.argv[2])
"""


_MODELS: dict[str, object] = {}


def load_model(path: str | Path):
    import fasttext

    key = str(path)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process: a new iteration replaces the last
        _MODELS[key] = fasttext.load_model(key)
    return _MODELS[key]


def math_probability(model, texts: list[str], max_chars: int = 20000) -> np.ndarray:
    """P(math) for each text, from one batch ``predict`` call."""
    if not texts:
        return np.zeros(0)
    labels, probs = model.predict([fasttext_line(t, max_chars) for t in texts], k=2)
    out = np.zeros(len(texts))
    for i, (ls, ps) in enumerate(zip(labels, probs)):
        for lab, p in zip(ls, ps):
            if lab == "__label__math":
                out[i] = float(p)
    return np.clip(out, 0.0, 1.0)


def score_batch(rows: list[dict], *, model_path: str, max_chars: int = 20000) -> list[dict]:
    """Stage function: adds ``score`` (P(math)) and ``tokens`` to each row."""
    model = load_model(model_path)
    scores = math_probability(model, [r.get("text") or "" for r in rows], max_chars)
    return [{**r, "score": float(s), "tokens": count_tokens(r.get("text") or "")} for r, s in zip(rows, scores)]


def select_by_budget(ids: list[str], scores: np.ndarray, tokens: np.ndarray, budget: int) -> list[str]:
    """Highest scores first until ``budget`` tokens are reached (the page that crosses it is kept)."""
    order = sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i]))
    kept, used = [], 0
    for i in order:
        if used >= budget:
            break
        kept.append(ids[i])
        used += int(tokens[i])
    return kept


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Precision/recall/F1 of ``score >= threshold`` against boolean ``labels``."""
    pred = scores >= threshold
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    fn = int(np.sum(~pred & labels))
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "tp": tp, "fp": fp, "fn": fn}
