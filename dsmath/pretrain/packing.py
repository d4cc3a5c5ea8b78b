"""Packing token streams into fixed-length rows, labels never crossing a document boundary.

**Boundary choice: EOS-marked, labels masked.** Every document ends with EOS and documents are
concatenated into rows of ``seq_len`` tokens (GPT / DeepSeek-LLM style). Attention is plain causal
over the row: a document *may attend to the documents before it in the same row* (no
block-diagonal mask). What is guaranteed is about labels: position t of a row is trained to
predict token t+1 only when both tokens belong to the same document occurrence (same document
key), so no token of one document is ever the label of a position in another. The EOS closing a
document is trained (it is part of it); the first token of a document is never a label (nothing of
its own precedes it). A document longer than a row simply continues in the next row.

Consecutive rows overlap by one token (row k = stream tokens ``[k(L−1), k(L−1)+L)``), so each
within-document pair (token, next token) of the stream is trained exactly once and none is lost
at a row edge. A finite stream's tail is right-padded (attention 0, key −1, never a label).

Per-token tensors follow :mod:`learner.batch`'s convention: position t holds the value for token t+1.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import numpy as np

PAD_KEY = -1


def label_mask(doc_keys: np.ndarray) -> np.ndarray:
    """``[N, L]`` 0/1 float32 mask: 1 at t when tokens t and t+1 are real and of the same document.

    Vectorised; :func:`label_mask_loop` is the plain loop it must agree with.
    """
    keys = np.asarray(doc_keys, dtype=np.int64)  # [N, L]
    mask = np.zeros(keys.shape, dtype=np.float32)  # [N, L]; the last column is never a target
    same = (keys[:, :-1] == keys[:, 1:]) & (keys[:, :-1] != PAD_KEY)  # [N, L-1]
    mask[:, :-1] = same
    return mask


def label_mask_loop(doc_keys) -> list[list[float]]:
    """Plain-loop reference for :func:`label_mask`."""
    out = []
    for row in doc_keys:
        row = [int(k) for k in row]
        m = [0.0] * len(row)
        for t in range(len(row) - 1):
            if row[t] != PAD_KEY and row[t] == row[t + 1]:
                m[t] = 1.0
        out.append(m)
    return out


class ChunkSource(Protocol):
    def next_chunk(self) -> tuple[str, list[int], list[int]]: ...
    def state(self) -> dict: ...
    def load_state(self, state: dict) -> None: ...


class Packer:
    """Cuts an endless chunk source into rows of ``seq_len`` tokens (one-token overlap).

    The carried-over tokens (< ``seq_len``) are part of :meth:`state`, together with the source's
    own state, so a resumed packer emits exactly the rows the saved one would have emitted next.
    """

    def __init__(self, source: ChunkSource, seq_len: int, pad_id: int) -> None:
        if seq_len < 2:
            raise ValueError("seq_len must be >= 2 (a row needs a token and its label)")
        self.source, self.seq_len, self.pad_id = source, seq_len, pad_id
        self._ids: list[int] = []
        self._keys: list[int] = []
        self.rows_emitted = 0

    def next_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids [n, L] int64, doc_keys [n, L] int64)`` of the next ``n`` rows."""
        L = self.seq_len
        ids = np.empty((n, L), dtype=np.int64)  # [n, L]
        keys = np.empty((n, L), dtype=np.int64)  # [n, L]
        for r in range(n):
            while len(self._ids) < L:
                _, chunk_ids, chunk_keys = self.source.next_chunk()
                self._ids.extend(chunk_ids)
                self._keys.extend(chunk_keys)
            ids[r] = self._ids[:L]
            keys[r] = self._keys[:L]
            # Keep the row's last token: it starts the next row, so its label pair is not lost.
            del self._ids[: L - 1], self._keys[: L - 1]
        self.rows_emitted += n
        return ids, keys

    def state(self) -> dict:
        return {"source": self.source.state(), "carry_ids": list(self._ids), "carry_keys": list(self._keys),
                "rows_emitted": self.rows_emitted}

    def load_state(self, state: dict) -> None:
        self.source.load_state(state["source"])
        self._ids, self._keys = [int(x) for x in state["carry_ids"]], [int(x) for x in state["carry_keys"]]
        self.rows_emitted = int(state["rows_emitted"])


def pack_documents(docs: Iterable[list[int]], seq_len: int, pad_id: int, eos_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A *finite* stream: each document (token ids, EOS appended here) in order, packed into rows
    ``(ids [L], keys [L])`` with the same one-token overlap; the tail row is padded. For held-out
    evaluation, where every document is scored once."""
    L = seq_len
    buf_ids: list[int] = []
    buf_keys: list[int] = []
    for k, doc in enumerate(docs):
        buf_ids.extend(list(doc) + [eos_id])
        buf_keys.extend([k] * (len(doc) + 1))
        while len(buf_ids) >= L:
            yield np.asarray(buf_ids[:L], dtype=np.int64), np.asarray(buf_keys[:L], dtype=np.int64)
            del buf_ids[: L - 1], buf_keys[: L - 1]
    if len(buf_ids) > 1:  # a single carried token has no label left to train
        pad = L - len(buf_ids)
        yield (np.asarray(buf_ids + [pad_id] * pad, dtype=np.int64),
               np.asarray(buf_keys + [PAD_KEY] * pad, dtype=np.int64))


def attention_mask(doc_keys: np.ndarray) -> np.ndarray:
    """``[N, L]`` 1 on real tokens, 0 on padding (padding is only ever at the end of a row)."""
    return (np.asarray(doc_keys) != PAD_KEY).astype(np.int64)
