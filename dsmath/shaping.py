"""Batch shaping between reward and update (DAPO-style): dynamic sampling, overlong handling, and the
importance-weight correction for samples drawn by an older policy (async mode).

Pure torch and Python: no Ray. Each vectorised function has a plain loop twin here (``*_loop``) and a
test holding them equal.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


# ---------------------------------------------------------------------------------------- dynamic sampling


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``[B]`` bool: True for groups whose rewards are not all equal (they carry a GRPO gradient).

    ``rewards`` is ``[B*G]`` with groups contiguous. A group of identical rewards has zero advantage for
    every sample, so DAPO's dynamic sampling drops it and samples more questions instead.
    """
    r = rewards.reshape(-1, group_size)  # [B, G]
    return r.amax(dim=1) != r.amin(dim=1)  # [B]


def informative_groups_loop(rewards: Sequence[float], group_size: int) -> list[bool]:
    out = []
    for start in range(0, len(rewards), group_size):
        group = list(rewards[start:start + group_size])
        out.append(any(x != group[0] for x in group))
    return out


# ---------------------------------------------------------------------------------------- overlong handling


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward: ``[N]`` lengths → ``[N]`` penalties (≤ 0).

        0                                   if L ≤ max_len − buffer
        −factor · (L − (max_len − buffer)) / buffer   inside the last ``buffer`` tokens
        −factor                             if L ≥ max_len (truncated)

    ``buffer == 0`` gives the hard form: −factor exactly at ``max_len``, 0 below.
    """
    lengths = lengths.to(torch.float32)  # [N]
    if buffer <= 0:
        return torch.where(lengths >= max_len, torch.full_like(lengths, -factor), torch.zeros_like(lengths))
    start = max_len - buffer
    ramp = -factor * (lengths - start).clamp(min=0) / buffer  # [N]
    return ramp.clamp(min=-factor)  # [N]


def overlong_penalty_loop(lengths: Sequence[int], max_len: int, buffer: int, factor: float = 1.0) -> list[float]:
    out = []
    for n in lengths:
        if buffer <= 0:
            out.append(-factor if n >= max_len else 0.0)
        elif n <= max_len - buffer:
            out.append(0.0)
        elif n >= max_len:
            out.append(-factor)
        else:
            out.append(-factor * (n - (max_len - buffer)) / buffer)
    return out


# ---------------------------------------------------------------------------------------- off-policy correction


def truncated_is_weights(proximal_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, clip: float) -> Tensor:
    """Per-token importance weights ``min(π_prox / π_behav, clip)`` for samples drawn by an older policy.

    ``proximal_logp``: the learner's log-probs of the sampled tokens under its current weights (the PPO
    "old" policy the ratio is clipped around); ``behaviour_logp``: the generator's log-probs when it
    sampled them (an older version in async mode). All ``[N, T]``; the result is ``[N, T]`` with ones
    outside ``mask`` (so it never changes masked positions). ``clip <= 0`` means no truncation.
    Truncation (TIS) bounds the variance a stale sample can inject.
    """
    log_w = (proximal_logp - behaviour_logp) * mask  # [N, T] zero off-mask: exp gives 1
    w = torch.exp(log_w)  # [N, T]
    if clip > 0:
        w = w.clamp(max=clip)  # [N, T]
    return torch.where(mask.bool(), w, torch.ones_like(w))  # [N, T]


def truncated_is_weights_loop(proximal_logp: list[list[float]], behaviour_logp: list[list[float]],
                              mask: list[list[float]], clip: float) -> list[list[float]]:
    import math

    out = []
    for prox_row, beh_row, mask_row in zip(proximal_logp, behaviour_logp, mask):
        row = []
        for p, b, m in zip(prox_row, beh_row, mask_row):
            if not m:
                row.append(1.0)
                continue
            w = math.exp(p - b)
            row.append(min(w, clip) if clip > 0 else w)
        out.append(row)
    return out
