"""GRPO math (DeepSeekMath §4.1): group-relative advantages, the k3 KL estimator, the clipped loss.

Pure torch: no Ray, no DeepSpeed, no model code. Every vectorised kernel ``f`` has its plain-loop twin
``f_loop`` right below it: slow, obvious, sample by sample and token by token as the paper's formulas read,
the ground truth ``f`` is tested against (tests hold them equal to 1e-6 in float64; ``tests/test_twins.py``
checks every twin has its kernel and a test). Twins are not for production use.

Conventions used throughout:

* Per-token tensors are ``[N, T]`` (N sequences, T positions) and come with a ``mask`` ``[N, T]``
  (1 = a response token that is trained on; 0 = prompt, padding, or masked tool output).
* ``logp`` / ``old_logp`` / ``ref_logp`` are log-probabilities of the *same* tokens under the
  current policy, the policy that sampled them, and the frozen reference model.
* Standard deviations are the **unbiased** (Bessel-corrected, ``n − 1``) estimate, as in the
  paper's reference implementations (TRL/OpenRLHF ``torch.std``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

LossAgg = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]
LOSS_AGGS: tuple[str, ...] = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
# exp() of a log-ratio beyond ±20 is 5e8: no meaningful KL signal left, only overflow risk.
KL_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------


def _mean_std_loop(values: list[float]) -> tuple[float, float]:
    """Mean and unbiased standard deviation of a list (a helper of the loop twins below)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased
    return mean, math.sqrt(var)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Outcome supervision: ``(r − mean(group)) / (std(group) + eps)`` for each of G samples.

    ``rewards`` is ``[B*G]`` (groups contiguous: samples ``g*G … g*G+G-1`` form group ``g``) or
    ``[B, G]``; the result has the same shape and dtype.

    Guaranteed: a group whose rewards are all equal gives exactly 0.0 (not ``0/eps`` noise), and so
    does a group of size 1. ``std`` is unbiased (``n − 1``).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [B*G] or [B, G], got shape {tuple(rewards.shape)}")
    shape = rewards.shape
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size)  # [B, G]
    if group_size == 1:
        return torch.zeros_like(rewards)
    mean = r.mean(dim=1, keepdim=True)  # [B, 1]
    std = r.std(dim=1, keepdim=True, unbiased=True)  # [B, 1]
    adv = (r - mean) / (std + eps)  # [B, G]
    # Equal rewards: the float mean can differ from r in the last ulp; force exact zeros.
    same = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))  # [B, 1]
    adv = torch.where(same, torch.zeros_like(adv), adv)  # [B, G]
    return adv.reshape(shape)


def group_advantages_loop(rewards: list[float], group_size: int, eps: float = 1e-6) -> list[float]:
    """Plain-loop twin of :func:`group_advantages` (tests hold them equal)."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean, std = _mean_std_loop(group)
        for r in group:
            out.append(0.0 if max(group) == min(group) else (r - mean) / (std + eps))
    return out


def process_advantages(
    step_rewards: Sequence[Sequence[float]],
    step_end_positions: Sequence[Sequence[int]],
    response_mask: Tensor,
    group_ids: Sequence[int] | Tensor,
    eps: float = 1e-6,
) -> Tensor:
    """Process supervision (paper §4.1.3) → per-token advantages ``[N, T]``.

    Sample ``i`` has steps ``j`` with reward ``step_rewards[i][j]`` ending at token position
    ``step_end_positions[i][j]`` (an index into the T axis of ``response_mask``). Lists are
    ragged: samples may have different numbers of steps (even none).

    Step rewards are normalised over the whole group — mean and unbiased std over *all* steps of
    *all* samples sharing a ``group_ids`` value — and a token's advantage is the sum of the
    normalised rewards of the steps that end at or after it. The result is multiplied by
    ``response_mask``.

    Guaranteed: a group whose step rewards are all equal (or that has a single step) gives zeros.
    Not checked: that step ends fall inside the response (positions must be in ``[0, T)``).
    """
    n, t = response_mask.shape
    if not (len(step_rewards) == len(step_end_positions) == n):
        raise ValueError(f"need {n} step-reward lists and {n} step-end lists, got {len(step_rewards)} and "
                         f"{len(step_end_positions)}")
    groups = torch.as_tensor(group_ids, dtype=torch.long).reshape(-1)  # [N]
    if groups.numel() != n:
        raise ValueError(f"group_ids has {groups.numel()} entries for {n} samples")
    dtype = response_mask.dtype if response_mask.is_floating_point() else torch.float32
    device = response_mask.device
    counts = [len(r) for r in step_rewards]
    for i, (r, e) in enumerate(zip(step_rewards, step_end_positions)):
        if len(r) != len(e):
            raise ValueError(f"sample {i}: {len(r)} step rewards but {len(e)} step ends")
    step_sample = torch.repeat_interleave(torch.arange(n, device=device), torch.tensor(counts, device=device))  # [S]
    flat_r = torch.tensor([x for r in step_rewards for x in r], dtype=dtype, device=device)  # [S]
    flat_end = torch.tensor([x for e in step_end_positions for x in e], dtype=torch.long, device=device)  # [S]
    if flat_r.numel() == 0:
        return torch.zeros(n, t, dtype=dtype, device=device)
    if flat_end.min() < 0 or flat_end.max() >= t:
        raise ValueError(f"step end positions must lie in [0, {t}), got {flat_end.min().item()}..{flat_end.max().item()}")
    # Per-group statistics over all steps of all the group's samples.
    _, step_group = torch.unique(groups[step_sample], return_inverse=True)  # [S] dense group index
    num_groups = int(step_group.max()) + 1
    g_count = torch.zeros(num_groups, dtype=dtype, device=device).index_add_(0, step_group, torch.ones_like(flat_r))
    g_sum = torch.zeros(num_groups, dtype=dtype, device=device).index_add_(0, step_group, flat_r)
    g_mean = g_sum / g_count  # [num_groups]
    dev = flat_r - g_mean[step_group]  # [S]
    g_ss = torch.zeros(num_groups, dtype=dtype, device=device).index_add_(0, step_group, dev * dev)
    g_std = torch.sqrt(g_ss / (g_count - 1).clamp(min=1))  # [num_groups] unbiased
    g_max = torch.full((num_groups,), -torch.inf, dtype=dtype, device=device).scatter_reduce_(0, step_group, flat_r, "amax")
    g_min = torch.full((num_groups,), torch.inf, dtype=dtype, device=device).scatter_reduce_(0, step_group, flat_r, "amin")
    degenerate = (g_max == g_min) | (g_count < 2)  # [num_groups]
    norm = torch.where(degenerate[step_group], torch.zeros_like(dev), dev / (g_std[step_group] + eps))  # [S]
    # Drop each step's normalised reward at its end position, then a reverse cumulative sum gives
    # "sum over steps ending at or after t".
    contrib = torch.zeros(n, t, dtype=dtype, device=device)  # [N, T]
    contrib.index_put_((step_sample, flat_end), norm, accumulate=True)
    adv = contrib.flip(1).cumsum(1).flip(1)  # [N, T]
    return adv * response_mask.to(dtype)


def process_advantages_loop(
    step_rewards: Sequence[Sequence[float]],
    step_end_positions: Sequence[Sequence[int]],
    response_mask: list[list[float]],
    group_ids: Sequence[int],
    eps: float = 1e-6,
) -> list[list[float]]:
    """Plain-loop twin of :func:`process_advantages` (tests hold them equal)."""
    n, t = len(response_mask), len(response_mask[0])
    all_steps: dict[int, list[float]] = {}
    for i in range(n):
        all_steps.setdefault(group_ids[i], []).extend(step_rewards[i])
    out = []
    for i in range(n):
        steps = all_steps[group_ids[i]]
        mean, std = _mean_std_loop(steps) if steps else (0.0, 0.0)
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


def online_rft_advantages(correct: Tensor) -> Tensor:
    """Online RFT in the paper's unified paradigm (§5.2.1): gradient coefficient 1 for a correct
    sample, 0 otherwise. Used as the advantages of :func:`grpo_loss` with ``beta=0`` and on-policy
    ``old_logp`` (ratio 1, never clipped), the loss gradient is exactly ``−coef · ∇log π``."""
    return correct.to(torch.get_default_dtype()) if correct.dtype == torch.bool else (correct > 0).to(
        torch.get_default_dtype())


# ----------------------------------------------------------------------------------------------
# Per-token quantities from logits
# ----------------------------------------------------------------------------------------------


def token_logprobs(logits: Tensor, labels: Tensor, chunk_size: int = 4096) -> Tensor:
    """``log softmax(logits)[..., labels]`` without materialising the full log-softmax at once.

    ``logits`` ``[N, T, V]``, ``labels`` ``[N, T]`` → ``[N, T]`` in the logits' dtype (upcast to
    float32 when the logits are half precision). Rows are processed ``chunk_size`` at a time so
    the extra memory is ``chunk_size × V`` floats rather than ``N × T × V``. Differentiable.
    """
    n, t, v = logits.shape
    flat = logits.reshape(-1, v)  # [N*T, V]
    flat_labels = labels.reshape(-1)  # [N*T]
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        rows = flat[start : start + chunk_size]  # [C, V]
        if rows.dtype in (torch.float16, torch.bfloat16):
            rows = rows.float()
        picked = rows.gather(1, flat_labels[start : start + chunk_size, None]).squeeze(1)  # [C]
        out.append(picked - torch.logsumexp(rows, dim=1))  # [C]
    if not out:
        return logits.new_zeros(n, t)
    return torch.cat(out).reshape(n, t)


def token_logprobs_loop(logits: Tensor, labels: Tensor) -> list[list[float]]:
    """Plain-loop twin of :func:`token_logprobs` (tests hold them equal)."""
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


def entropy(logits: Tensor, chunk_size: int = 4096) -> Tensor:
    """Per-token entropy of ``softmax(logits)``: ``[N, T, V]`` → ``[N, T]`` (chunked like
    :func:`token_logprobs`)."""
    n, t, v = logits.shape
    flat = logits.reshape(-1, v)  # [N*T, V]
    out = []
    for start in range(0, flat.shape[0], chunk_size):
        rows = flat[start : start + chunk_size].float()  # [C, V]
        logp = torch.log_softmax(rows, dim=1)  # [C, V]
        out.append(-(logp.exp() * logp).sum(dim=1))  # [C]
    if not out:
        return logits.new_zeros(n, t)
    return torch.cat(out).reshape(n, t).to(logits.dtype if logits.is_floating_point() else torch.float32)


def entropy_loop(logits: Tensor) -> list[list[float]]:
    """Plain-loop twin of :func:`entropy` (tests hold them equal)."""
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


def _head_chunk(head: Callable[[Tensor], Tensor], hidden: Tensor, labels: Tensor,
                with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk of :func:`head_token_logprobs`: ``[C, H]`` hidden, ``[C]`` labels → ``[C]`` log-probs, ``[C]``
    entropy (None without ``with_entropy``)."""
    logits = head(hidden).float()  # [C, V] float32 even from a bf16 head
    logz = torch.logsumexp(logits, dim=-1)  # [C]
    lp = logits.gather(1, labels[:, None]).squeeze(1) - logz  # [C]
    if not with_entropy:
        return lp, None
    logp = logits - logz[:, None]  # [C, V]
    ent = -(logp.exp() * logp).sum(dim=-1)  # [C]
    return lp, ent


def head_token_logprobs(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, chunk_tokens: int,
                        *, with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Token log-probs (and entropy) of ``softmax(head(hidden))`` computed ``chunk_tokens`` tokens at a time.

    ``hidden`` ``[N, T, H]`` (a causal LM's final hidden states, after its last norm), ``head`` the LM head (an
    ``nn.Module`` — called as a module, so hooks on it, e.g. ZeRO-3's parameter gathering, run for every chunk),
    ``labels`` ``[N, T]`` → ``(logprobs [N, T], entropy [N, T] or None)``, both float32 (a half-precision head's
    logits are upcast before the log-softmax). No temperature is applied (the learner scores at temperature 1,
    like :func:`token_logprobs`).

    Memory: when autograd is on, each chunk runs under ``torch.utils.checkpoint`` (non-reentrant) and is recomputed
    in backward, so only the hidden states and ``[N, T]`` outputs are kept for backward — never ``[N, T, V]``
    logits; the transient peak is a few ``[chunk_tokens, V]`` float32 buffers. Guaranteed: values and gradients
    (w.r.t. ``hidden`` and the head's parameters, through log-probs and entropy alike) equal the full computation
    up to float summation order. Not guaranteed: bitwise equality with it (different matmul shapes).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    from torch.utils.checkpoint import checkpoint

    n, t, h = hidden.shape
    flat = hidden.reshape(-1, h)  # [N*T, H]
    flat_labels = labels.reshape(-1)  # [N*T]
    lps, ents = [], []
    recompute = torch.is_grad_enabled()
    for start in range(0, flat.shape[0], chunk_tokens):
        rows, lab = flat[start : start + chunk_tokens], flat_labels[start : start + chunk_tokens]  # [C, H], [C]
        if recompute:
            lp, ent = checkpoint(_head_chunk, head, rows, lab, with_entropy, use_reentrant=False)  # [C], [C]
        else:
            lp, ent = _head_chunk(head, rows, lab, with_entropy)  # [C], [C]
        lps.append(lp)
        ents.append(ent)
    if not lps:
        empty = hidden.new_zeros(n, t, dtype=torch.float32)  # [N, T]
        return empty, (empty.clone() if with_entropy else None)
    lp = torch.cat(lps).reshape(n, t)  # [N, T]
    return lp, (torch.cat(ents).reshape(n, t) if with_entropy else None)  # [N, T]


def head_token_logprobs_loop(hidden: Tensor, head, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Plain-loop twin of :func:`head_token_logprobs`: the LM head on one token's hidden state at a time.

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


# ----------------------------------------------------------------------------------------------
# KL and the loss
# ----------------------------------------------------------------------------------------------


def kl_k3(logp: Tensor, ref_logp: Tensor, clamp: float = KL_LOG_RATIO_CLAMP) -> Tensor:
    """The paper's unbiased, always-positive KL estimator (Schulman's k3), per token:

        π_ref/π_θ − log(π_ref/π_θ) − 1,   log(π_ref/π_θ) = ref_logp − logp

    The log-ratio is clamped to ``[−clamp, clamp]`` before ``exp`` so a token the reference finds
    vastly likelier cannot overflow; inside the clamp the value and gradient are exact, outside it
    the gradient is zero. Shapes broadcast; no masking is applied here.
    """
    log_ratio = (ref_logp - logp).clamp(min=-clamp, max=clamp)  # [N, T]
    return torch.exp(log_ratio) - log_ratio - 1.0  # [N, T]


def kl_k3_loop(logp: float, ref_logp: float, clamp: float = 20.0) -> float:
    """Plain-loop twin of :func:`kl_k3` (tests hold them equal)."""
    log_ratio = min(max(ref_logp - logp, -clamp), clamp)
    return math.exp(log_ratio) - log_ratio - 1.0


def loss_normalizer(mask: Tensor, loss_agg: str, max_tokens: int | None = None) -> float:
    """The divisor :func:`grpo_loss` uses for this batch when given none.

    ``token_mean``: the number of loss tokens. ``seq_mean_*``: the number of sequences with at
    least one loss token. When one logical batch is split over micro-batches or ranks, sum this
    over the parts and pass the total as ``normalizer`` to every part: the parts' losses (and
    gradients) then add up to the whole batch's.
    """
    _check_agg(loss_agg, max_tokens)
    m = mask.to(torch.float64)  # [N, T]
    if loss_agg == "token_mean":
        return float(m.sum())
    return float((m.sum(dim=1) > 0).sum())


def _check_agg(loss_agg: str, max_tokens: int | None) -> None:
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg {loss_agg!r} is not one of {', '.join(LOSS_AGGS)}")
    if loss_agg == "seq_mean_token_sum_norm" and not (max_tokens and max_tokens > 0):
        raise ValueError("loss_agg 'seq_mean_token_sum_norm' (Dr. GRPO) needs max_tokens > 0")


def aggregate(per_token: Tensor, mask: Tensor, loss_agg: str, *, max_tokens: int | None = None,
              normalizer: float | None = None) -> Tensor:
    """Reduce a per-token ``[N, T]`` loss to a scalar with the chosen aggregation.

    * ``seq_mean_token_mean`` (paper): mean over a sequence's loss tokens, then mean over sequences.
    * ``token_mean``: mean over all loss tokens of the batch.
    * ``seq_mean_token_sum_norm`` (Dr. GRPO): a sequence's token *sum* / ``max_tokens``, then mean
      over sequences — no length bias.

    ``normalizer`` replaces the batch's own divisor (see :func:`loss_normalizer`). Sequences with
    no loss token contribute nothing (and are not counted).
    """
    _check_agg(loss_agg, max_tokens)
    m = mask.to(per_token.dtype)  # [N, T]
    masked = per_token * m  # [N, T]
    if normalizer is None:
        normalizer = loss_normalizer(mask, loss_agg, max_tokens)
    if normalizer <= 0:
        return masked.sum() * 0.0  # keeps the graph (all ranks must run backward) with a zero gradient
    if loss_agg == "token_mean":
        return masked.sum() / normalizer
    if loss_agg == "seq_mean_token_mean":
        seq_tokens = m.sum(dim=1).clamp(min=1.0)  # [N]
        return (masked.sum(dim=1) / seq_tokens).sum() / normalizer
    return (masked.sum(dim=1) / float(max_tokens)).sum() / normalizer


def _loss_metrics(mask: Tensor, ratio: Tensor, advantages: Tensor, surr: Tensor, surr_clipped: Tensor, pg: Tensor,
                  kl: Tensor | None, beta: float, logp: Tensor, ref_logp: Tensor | None, entropy: Tensor | None,
                  is_weights: Tensor | None) -> dict[str, float]:
    """:func:`grpo_loss`'s metrics: token means over the masked tokens of this call (all inputs ``[N, T]``)."""
    sel = mask.bool()  # [N, T]
    count = int(sel.sum())
    metrics: dict[str, float] = {"tokens": float(count)}
    if not count:
        return metrics
    r = ratio[sel]  # [M] the masked tokens
    a = advantages[sel]  # [M]
    metrics.update(
        clip_frac=float((surr_clipped < surr)[sel].float().mean()),
        ratio_min=float(r.min()),
        ratio_max=float(r.max()),
        ratio_mean=float(r.mean()),
        adv_mean=float(a.mean()),
        adv_std=float(a.std()) if count > 1 else 0.0,
        adv_min=float(a.min()),
        adv_max=float(a.max()),
        pg_loss=float(pg[sel].mean()),
    )
    if kl is not None:
        metrics["kl"] = float(kl[sel].mean())
        metrics["kl_loss"] = float(beta * kl[sel].mean())
    elif ref_logp is not None:
        metrics["kl"] = float(kl_k3(logp, ref_logp)[sel].mean())
    if entropy is not None:
        metrics["entropy"] = float(entropy[sel].mean())
    if is_weights is not None:
        metrics["is_weight_mean"] = float(is_weights[sel].mean())
    return metrics


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    beta: float = 0.04,
    loss_agg: str = "seq_mean_token_mean",
    max_tokens: int | None = None,
    is_weights: Tensor | None = None,
    entropy: Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO objective (paper eq. 3, negated to a loss), per token then aggregated:

        ratio  = exp(logp − old_logp)
        pg     = −min(ratio·A, clip(ratio, 1−ε_low, 1+ε_high)·A) · w      (w = is_weights or 1)
        loss_t = pg + β · k3(logp, ref_logp)

    All per-token inputs are ``[N, T]``; ``advantages`` may also be ``[N]`` (one per sequence,
    broadcast over tokens). ``is_weights`` are per-token importance weights for off-policy
    (async) correction — already truncated by the caller; they scale the policy-gradient term
    only. ``ref_logp`` may be None only when ``beta == 0``. See :func:`aggregate` for
    ``loss_agg``/``max_tokens``/``normalizer``.

    Returns ``(loss, metrics)``; metrics are Python floats over the masked tokens: ``clip_frac``
    (tokens whose clipped term was the active one), ``kl`` (mean k3), ``ratio_min/max/mean``,
    ``adv_mean/std/min/max``, ``pg_loss``, ``kl_loss`` and ``entropy`` when given. Metrics are
    token means of this call's batch (not affected by ``normalizer``).
    """
    _check_agg(loss_agg, max_tokens)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)  # [N, T]
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    maskf = mask.to(logp.dtype)  # [N, T]
    log_ratio = (logp - old_logp) * maskf  # [N, T] zero on padding: no overflow from garbage
    ratio = torch.exp(log_ratio)  # [N, T]
    surr = ratio * advantages  # [N, T]
    clipped_ratio = ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [N, T]
    surr_clipped = clipped_ratio * advantages  # [N, T]
    pg = -torch.minimum(surr, surr_clipped)  # [N, T]
    if is_weights is not None:
        pg = pg * is_weights  # [N, T]
    per_token = pg
    kl = None
    if ref_logp is not None and beta != 0:
        kl = kl_k3(logp, ref_logp)  # [N, T]
        per_token = per_token + beta * kl  # [N, T]
    loss = aggregate(per_token, mask, loss_agg, max_tokens=max_tokens, normalizer=normalizer)
    with torch.no_grad():
        metrics = _loss_metrics(mask, ratio, advantages, surr, surr_clipped, pg, kl, beta, logp, ref_logp, entropy,
                                is_weights)
        metrics["loss"] = float(loss)
    return loss, metrics


def grpo_loss_loop(
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


def sft_loss(logp: Tensor, mask: Tensor, *, normalizer: float | None = None) -> Tensor:
    """Negative log-likelihood averaged over the loss tokens (``mask`` = 1), token-mean.

    ``normalizer`` replaces the token count (pass the global count when splitting a batch).
    """
    return aggregate(-logp, mask, "token_mean", normalizer=normalizer)


__all__ = [
    "KL_LOG_RATIO_CLAMP",
    "LOSS_AGGS",
    "aggregate",
    "entropy",
    "group_advantages",
    "head_token_logprobs",
    "grpo_loss",
    "kl_k3",
    "loss_normalizer",
    "online_rft_advantages",
    "process_advantages",
    "sft_loss",
    "token_logprobs",
]
