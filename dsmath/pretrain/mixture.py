"""Weighted, seeded, resumable mixing of named token sources (DeepSeekMath-Base's 56/4/10/20/10 mixture).

The mixture draws one source per *chunk* of ``chunk_tokens`` tokens, with probability equal to its
normalised weight, from a seeded NumPy PCG64 generator, and takes the next ``chunk_tokens`` tokens
of that source's :class:`~dsmath.pretrain.sources.TokenStream`. Sampling by token chunks (not by
documents) makes the realised *token* share of each source converge to its weight whatever the
document lengths (the standard error of a share after n chunks is sqrt(w(1−w)/n)); a document
longer than a chunk continues in that source's next chunk. When another source's chunk comes in
between, the continuation starts without its earlier context and the one label pair across the
interruption is not trained (about one token per chunk; set ``chunk_tokens`` = ``seq_len`` or larger
to make that rare).

Every token comes with a *document key* ``source_index << 40 | document number`` that is unique
per document occurrence, so the packer can keep labels inside documents.

Guaranteed: :meth:`MixtureSampler.state` (generator state + every source's position + token counts)
is JSON-able, and a fresh sampler over the same sources that loads it yields exactly the chunks the
saved one would have yielded next.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from dsmath.errors import UserError
from dsmath.pretrain.sources import TokenStream

DOC_KEY_SHIFT = 40  # document numbers below 2**40 per source; source index in the bits above


def doc_key(source_index: int, doc_number: int) -> int:
    """The document key of a token: unique per (source, document occurrence)."""
    return (source_index << DOC_KEY_SHIFT) | doc_number


def source_of_key(keys: np.ndarray) -> np.ndarray:
    """Source index of each document key (``-1`` stays ``-1``: padding)."""
    keys = np.asarray(keys, dtype=np.int64)
    return np.where(keys < 0, -1, keys >> DOC_KEY_SHIFT)


def normalise_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights scaled to sum to 1; all must be >= 0 and at least one > 0 (else :class:`UserError`)."""
    bad = {k: w for k, w in weights.items() if not (w >= 0)}
    if bad:
        raise UserError(f"mixture weights must be >= 0: {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise UserError("mixture weights: at least one source needs a weight > 0")
    return {k: float(w) / total for k, w in weights.items()}


class MixtureSampler:
    """Chunks of ``chunk_tokens`` tokens from named sources, chosen by weight with a seed."""

    def __init__(self, streams: Mapping[str, TokenStream], weights: Mapping[str, float], *, seed: int,
                 chunk_tokens: int) -> None:
        if set(streams) != set(weights):
            raise UserError(f"mixture: sources {sorted(streams)} and weights {sorted(weights)} differ")
        if chunk_tokens < 1:
            raise UserError("mixture chunk_tokens: must be >= 1")
        self.names = list(streams)  # the order fixes each source's index in document keys
        self.streams = dict(streams)
        self.weights = normalise_weights(weights)
        self._probs = np.array([self.weights[n] for n in self.names], dtype=np.float64)
        self.chunk_tokens = chunk_tokens
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.tokens_drawn = {n: 0 for n in self.names}

    def next_chunk(self) -> tuple[str, list[int], list[int]]:
        """``(source name, token ids, document keys)`` of the next chunk."""
        i = int(self.rng.choice(len(self.names), p=self._probs))
        name = self.names[i]
        ids, docs = self.streams[name].take(self.chunk_tokens)
        self.tokens_drawn[name] += len(ids)
        return name, ids, [doc_key(i, d) for d in docs]

    def state(self) -> dict:
        """JSON-able position of the whole mixture."""
        return {"rng": self.rng.bit_generator.state, "names": self.names,
                "streams": {n: s.state() for n, s in self.streams.items()}, "tokens_drawn": dict(self.tokens_drawn)}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` of a sampler with the same source names (weights may not change
        the past, but may change the future: a changed weight applies from here on)."""
        if list(state["names"]) != self.names:
            raise UserError(f"the checkpoint's mixture has sources {state['names']}, this run {self.names}")
        self.rng.bit_generator.state = state["rng"]
        for n, s in state["streams"].items():
            self.streams[n].load_state(s)
        self.tokens_drawn = {n: int(state["tokens_drawn"][n]) for n in self.names}
