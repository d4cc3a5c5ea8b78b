"""Plain per-token Python loops for every kernel of :mod:`dsmath.grpo` — slow, obvious, and the
ground truth the vectorised versions are tested against. Not for production use.

Values are Python floats (or 0-d tensors where a gradient is needed); loops go sample by sample,
token by token, exactly as the paper's formulas read.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased
    return mean, math.sqrt(var)


def group_advantages_ref(rewards: list[float], group_size: int, eps: float = 1e-6) -> list[float]:
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean, std = _mean_std(group)
        for r in group:
            out.append(0.0 if max(group) == min(group) else (r - mean) / (std + eps))
    return out


def process_advantages_ref(
    step_rewards: Sequence[Sequence[float]],
    step_end_positions: Sequence[Sequence[int]],
    response_mask: list[list[float]],
    group_ids: Sequence[int],
    eps: float = 1e-6,
) -> list[list[float]]:
    n, t = len(response_mask), len(response_mask[0])
    all_steps: dict[int, list[float]] = {}
    for i in range(n):
        all_steps.setdefault(group_ids[i], []).extend(step_rewards[i])
    out = []
    for i in range(n):
        steps = all_steps[group_ids[i]]
        mean, std = _mean_std(steps) if steps else (0.0, 0.0)
        degenerate = len(steps) < 2 or max(steps) == min(steps)
        row = []
        for pos in range(t):
            total = 0.0
            for r, end in zip(step_rewards[i], step_end_positions[i]):
                if end >= pos and not degenerate:
                    total += (r - mean) / (std + eps)
            row.append(total * response_mask[i][pos])
        out.append(row)
    return out


def kl_k3_ref(logp: float, ref_logp: float, clamp: float = 20.0) -> float:
    log_ratio = min(max(ref_logp - logp, -clamp), clamp)
    return math.exp(log_ratio) - log_ratio - 1.0


def grpo_loss_ref(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    beta: float,
    loss_agg: str,
    max_tokens: int | None = None,
    is_weights: Tensor | None = None,
) -> Tensor:
    """The loss as a 0-d tensor built token by token (so autograd gives the reference gradient)."""
    n, t = logp.shape
    seq_terms = []
    all_terms = []
    for i in range(n):
        terms = []
        for j in range(t):
            if mask[i, j] == 0:
                continue
            a = advantages[i] if advantages.dim() == 1 else advantages[i, j]
            ratio = torch.exp(logp[i, j] - old_logp[i, j])
            unclipped = ratio * a
            clipped = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * a
            term = -torch.minimum(unclipped, clipped)
            if is_weights is not None:
                term = term * is_weights[i, j]
            if beta != 0 and ref_logp is not None:
                lr = torch.clamp(ref_logp[i, j] - logp[i, j], -20.0, 20.0)
                term = term + beta * (torch.exp(lr) - lr - 1)
            terms.append(term)
        all_terms.extend(terms)
        if not terms:
            continue
        if loss_agg == "seq_mean_token_mean":
            seq_terms.append(sum(terms) / len(terms))
        elif loss_agg == "seq_mean_token_sum_norm":
            seq_terms.append(sum(terms) / max_tokens)
    if loss_agg == "token_mean":
        return sum(all_terms) / len(all_terms)
    return sum(seq_terms) / len(seq_terms)


def token_logprobs_ref(logits: Tensor, labels: Tensor) -> list[list[float]]:
    n, t, v = logits.shape
    out = []
    for i in range(n):
        row = []
        for j in range(t):
            values = [float(x) for x in logits[i, j]]
            m = max(values)
            lse = m + math.log(sum(math.exp(x - m) for x in values))
            row.append(values[int(labels[i, j])] - lse)
        out.append(row)
    return out


def entropy_ref(logits: Tensor) -> list[list[float]]:
    n, t, v = logits.shape
    out = []
    for i in range(n):
        row = []
        for j in range(t):
            values = [float(x) for x in logits[i, j]]
            m = max(values)
            z = sum(math.exp(x - m) for x in values)
            probs = [math.exp(x - m) / z for x in values]
            row.append(-sum(p * math.log(p) for p in probs if p > 0))
        out.append(row)
    return out


def head_token_logprobs_ref(hidden: Tensor, head, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Twin of :func:`dsmath.grpo.head_token_logprobs`: the LM head on one token's hidden state at a time.

    Returns ``(logprobs [N, T], entropy [N, T])`` as float32 tensors built token by token, so autograd gives the
    reference gradient (w.r.t. ``hidden`` and the head's parameters)."""
    n, t, _ = hidden.shape
    lps, ents = [], []
    for i in range(n):
        for j in range(t):
            logits = head(hidden[i, j][None])[0].float()  # [V] one token's logits
            logp = logits - torch.logsumexp(logits, dim=0)  # [V]
            lps.append(logp[int(labels[i, j])])
            ents.append(-(logp.exp() * logp).sum())
    return torch.stack(lps).reshape(n, t), torch.stack(ents).reshape(n, t)
