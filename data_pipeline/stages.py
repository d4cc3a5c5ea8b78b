"""Row-wise stage functions (``list[dict] -> list[dict]``) shared by the local and the Ray Data runner."""

from __future__ import annotations

from data_pipeline.dedup import minhash_signature, permutations


def extract_batch(rows: list[dict], *, main_content: bool = True) -> list[dict]:
    """HTML → text with math kept (rows that already have ``text`` pass unchanged); drops the HTML."""
    from data_pipeline.html_math import html_to_text

    out = []
    for r in rows:
        text = r.get("text") or ""
        err = ""
        if not text and r.get("html"):
            try:
                text = html_to_text(r["html"], main_content=main_content)
            except Exception as exc:  # a page the parser cannot handle is reported, never fatal
                err = f"{type(exc).__name__}: {exc}"
        out.append({k: v for k, v in r.items() if k != "html"} | {"text": text, "extract_error": err})
    return out


_PERMS: dict[tuple[int, int], tuple] = {}


def minhash_batch(rows: list[dict], *, num_perm: int = 128, seed: int = 1, shingle_words: int = 5) -> list[dict]:
    """Adds ``minhash``: the MinHash signature (list of uint32) of the row's word shingles."""
    key = (num_perm, seed)
    if key not in _PERMS:
        _PERMS[key] = permutations(num_perm, seed)
    a, b = _PERMS[key]
    return [{**r, "minhash": minhash_signature(r.get("text") or "", a, b, shingle_words).tolist()} for r in rows]
