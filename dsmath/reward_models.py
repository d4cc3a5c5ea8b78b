"""Reward-model maths that needs no model: step segmentation, step → token mapping, score gathering,
Math-Shepherd step labels and the replay mix of iterative GRPO (paper §4.1.3, §4.1.4, Algorithm 1).

Pure Python / torch: nothing here imports Ray, vLLM or DeepSpeed. The reward-model scorer
(``dsmath/rewards/model.py``) and the reward-model learner (``learner/reward_model.py``) call these, so
scoring and training agree on where a step ends. Combining a score with the rule reward is the ``combined``
reward's (``dsmath.rewards.combined.combine_rewards``).

Token positions: a *completion-token index* k is an index into ``Rollout.completion_ids``. A reward
model reading ``prompt_ids + completion_ids`` gives its score for "everything up to completion token k"
at sequence position ``len(prompt_ids) + k`` (a token-classification head scores each token from the
tokens at and before it).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")


# --------------------------------------------------------------------------------------- steps


def split_steps(text: str, delimiter: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the reasoning steps of ``text``.

    A step ends right after each ``delimiter`` (the delimiter belongs to the step it closes); the text after
    the last delimiter is the last step. Blank pieces (only whitespace, e.g. two delimiters in a row) are
    merged into the step before them (leading blank text into the first step), so every step has visible
    content. Empty text has no steps; text that is all blank is one step.
    """
    if not delimiter:
        raise ValueError("the step delimiter must not be empty")
    spans: list[tuple[int, int]] = []
    start, pending = 0, None  # pending: start of leading blank text waiting for the first real step
    while start < len(text):
        cut = text.find(delimiter, start)
        end = len(text) if cut < 0 else cut + len(delimiter)
        blank = not text[start:end].replace(delimiter, "").strip()
        if blank and spans:
            spans[-1] = (spans[-1][0], end)  # a blank piece extends the step before it
        elif blank:
            pending = start if pending is None else pending
        else:
            spans.append((start if pending is None else pending, end))
            pending = None
        start = end
    if not spans and text:
        spans.append((0, len(text)))  # only blank text: one step, so the completion still gets a score
    return spans


def token_char_ends(decode: Callable[[Sequence[int]], str], token_ids: Sequence[int]) -> list[int]:
    """``out[k]`` = length of the text decoded from ``token_ids[:k + 1]``.

    Decoding prefixes (not single tokens) keeps multi-byte characters that span tokens correct. Quadratic in
    the length, which is fine for completions of a few hundred tokens.
    """
    return [len(decode(list(token_ids[: k + 1]))) for k in range(len(token_ids))]


def step_end_token_indices(char_ends: Sequence[int], step_spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each step span, the index of the first token whose decoded prefix covers the step's last character.

    ``char_ends`` comes from :func:`token_char_ends`. A token that straddles a step boundary (BPE merged the
    delimiter with the next word) counts for the step it closes. Guaranteed: indices are non-decreasing and
    lie in ``[0, len(char_ends))``; consecutive steps that end in the same token get the same index.
    """
    if not char_ends:
        return []
    out = []
    k = 0
    for _start, end in step_spans:
        while k < len(char_ends) - 1 and char_ends[k] < end:
            k += 1
        out.append(k)
    return out


def completion_step_ends(decode: Callable[[Sequence[int]], str], completion_ids: Sequence[int],
                         delimiter: str) -> list[int]:
    """Completion-token index where each step of the decoded completion ends (see module docstring)."""
    ends = token_char_ends(decode, completion_ids)
    text = decode(list(completion_ids))
    return step_end_token_indices(ends, split_steps(text, delimiter))


# --------------------------------------------------------------------------------------- scores


def gather_scores(scores: torch.Tensor, rows: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """``scores[rows[j], positions[j]]`` for every j — the reward model's score at each scored token.

    ``scores`` is ``[N, T]``; the result is ``[J]``. Vectorised twin of :func:`gather_scores_loop`.
    """
    r = torch.as_tensor(list(rows), dtype=torch.long)  # [J]
    p = torch.as_tensor(list(positions), dtype=torch.long)  # [J]
    return scores[r, p]  # [J]


def gather_scores_loop(scores: torch.Tensor, rows: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """Plain loop reference for :func:`gather_scores`."""
    return torch.tensor([float(scores[r, p]) for r, p in zip(rows, positions)], dtype=scores.dtype)


# --------------------------------------------------------------------------------------- RM data


def shepherd_label(completions_correct: Sequence[bool], rule: str = "any") -> int:
    """Math-Shepherd step label from the K completions sampled after the step's prefix.

    ``any``: 1 if at least one completion reaches the gold answer (hard estimation); ``most``: 1 if more than
    half do. No completions → 0.
    """
    if rule not in ("any", "most"):
        raise ValueError(f"label rule must be 'any' or 'most', got {rule!r}")
    n = len(completions_correct)
    hits = sum(bool(c) for c in completions_correct)
    if n == 0:
        return 0
    return int(hits > 0) if rule == "any" else int(2 * hits > n)


def replay_mix(fresh: Sequence[T], history: Sequence[T], fraction: float = 0.1, *, seed: int = 0) -> list[T]:
    """The reward model's training set for one round of iterative GRPO: ``fresh`` plus a replay of ``history``.

    The replayed examples make up ``fraction`` of the returned set: ``round(fraction / (1 − fraction) ·
    len(fresh))`` examples drawn without replacement from ``history`` (all of it if it is smaller), seeded.
    Guaranteed: every fresh example appears exactly once; replayed ones come only from ``history``; the
    result is shuffled deterministically by ``seed``. Not guaranteed: that history is represented evenly
    across past rounds.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    rng = random.Random(seed)
    want = round(fraction / (1 - fraction) * len(fresh))
    picked = rng.sample(list(history), min(want, len(history)))
    out = list(fresh) + picked
    rng.shuffle(out)
    return out


def replay_count(num_fresh: int, fraction: float) -> int:
    """How many historical examples :func:`replay_mix` adds to ``num_fresh`` fresh ones (history permitting)."""
    return round(fraction / (1 - fraction) * num_fresh)
