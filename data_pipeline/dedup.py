"""Exact-URL dedup and MinHash-LSH near-duplicate removal (pure numpy; no distributed imports).

``minhash_signature`` is the vectorised kernel; ``minhash_signature_loop`` is the plain-loop version it
must agree with (tested). ``near_duplicates`` bands the signatures (``bands`` × ``num_perm/bands`` rows),
verifies each candidate pair by the estimated Jaccard (fraction of equal signature slots) ≥ ``threshold``, and
keeps the first page (input order) of every connected group. Guaranteed: deterministic for a given seed and
input order. Not guaranteed: every pair above the threshold is found (LSH is probabilistic by design).
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = (1 << 32) - 1
_WORD = re.compile(r"\w+", re.UNICODE)


def shingles(text: str, k: int) -> list[str]:
    words = _WORD.findall(text.lower())
    if len(words) < k:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + k]) for i in range(len(words) - k + 1)]


def _hash32(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=4).digest(), "little")


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Universal-hash parameters: a in [1, 2^32), b in [0, 2^61-1); a·x with x < 2^32 then fits in uint64."""
    rng = np.random.RandomState(seed)
    a = rng.randint(1, _MAX32, size=num_perm, dtype=np.uint64)
    b = rng.randint(0, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signature(text: str, a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Signature (uint32, len(a)) of the word k-shingles: min over shingles of ((a·h + b) mod p) mod 2^32."""
    sh = set(shingles(text, k))
    if not sh:
        return np.full(len(a), _MAX32, dtype=np.uint32)
    h = np.fromiter((_hash32(s) for s in sh), dtype=np.uint64, count=len(sh))
    vals = ((a[None, :] * h[:, None]) % _MERSENNE + b[None, :]) % _MERSENNE
    return (vals & np.uint64(_MAX32)).min(axis=0).astype(np.uint32)


def minhash_signature_loop(text: str, a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Plain-loop reference for :func:`minhash_signature` (Python ints, exact arithmetic)."""
    p = (1 << 61) - 1
    hs = [_hash32(s) for s in set(shingles(text, k))]
    out = []
    for ai, bi in zip(a.tolist(), b.tolist()):
        out.append(min((((ai * h + bi) % p) & _MAX32 for h in hs), default=_MAX32))
    return np.array(out, dtype=np.uint32)


def exact_url_dedup(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keep the first row per normalised URL; returns (kept, removed-with-``duplicate_of``)."""
    seen: dict[str, str] = {}
    kept, removed = [], []
    for r in rows:
        key = normalise_url(r["url"])
        if key in seen:
            removed.append({"id": r["id"], "url": r["url"], "duplicate_of": seen[key], "reason": "exact_url"})
        else:
            seen[key] = r["id"]
            kept.append(r)
    return kept, removed


def normalise_url(url: str) -> str:
    u = url.strip()
    u = re.sub(r"^https?://", "", u, flags=re.I)
    u = u.split("#", 1)[0]
    host, _, rest = u.partition("/")
    host = host.lower().removeprefix("www.")
    return f"{host}/{rest}".rstrip("/")


def near_duplicates(
    ids: list[str], signatures: np.ndarray, *, bands: int, threshold: float
) -> dict[str, tuple[str, float]]:
    """Map each removed id → (the kept id it duplicates, estimated Jaccard). The earliest id of a group stays."""
    n, num_perm = signatures.shape
    rows = num_perm // bands
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        chunk = np.ascontiguousarray(signatures[:, band * rows : (band + 1) * rows])
        for i in range(n):
            buckets[chunk[i].tobytes()].append(i)
        for members in buckets.values():
            first = members[0]
            for j in members[1:]:
                if find(j) == find(first):
                    continue
                if float(np.mean(signatures[first] == signatures[j])) >= threshold:
                    ri, rj = find(first), find(j)
                    parent[max(ri, rj)] = min(ri, rj)
    removed = {}
    for i in range(n):
        root = find(i)
        if root != i:
            removed[ids[i]] = (ids[root], float(np.mean(signatures[root] == signatures[i])))
    return removed
