"""The paper's unified paradigm (DeepSeekMath §5.2.1, Appendix A.1) as pure functions.

Every method of Table 10 updates the policy with the same gradient,

    ∇J = E_{(q, o) ~ D} [ 1/|o| Σ_t  GC(q, o, t) · ∇ log π_θ(o_t | q, o_<t) ],

and differs only in the data source D, the reward function and the gradient coefficient GC:

=============  ============================================  =====================================
method         data source                                   gradient coefficient GC(q, o, t)
=============  ============================================  =====================================
SFT            q, o ~ P_sft(Q, O)                            1
RFT            q ~ P_sft(Q), o ~ π_sft(O|q)   (offline)      I(o)  (1 if o's answer is right, else 0)
Online RFT     q ~ P_sft(Q), o ~ π_θ(O|q)     (online)       I(o)
DPO            q ~ P_sft(Q), o⁺, o⁻ ~ π_sft(O|q)             ±β·σ(β·ρ(o⁻) − β·ρ(o⁺))  (+ on o⁺, − on o⁻)
PPO            q ~ P_sft(Q), o ~ π_θold(O|q)                 A_t  (GAE on r_φ − β·log π_θold/π_ref per token)
GRPO           q ~ P_sft(Q), {o_i} ~ π_θold(O|q)             Â_{i,t} + β·(π_ref/π_θ − 1)
=============  ============================================  =====================================

with ρ(o) = 1/|o| Σ_t log π_θ(o_t)/π_ref(o_t) (the paper's length-normalised DPO, A.1.4; the paper
folds the β in front of σ into the step size, we keep it so the coefficient is the exact gradient of
the loss below). In this code base every method trains through :func:`dsmath.grpo.grpo_loss` with
the coefficients as "advantages", on-policy ``old_logp`` (ratio 1: the clip is inactive) and β = 0
except for GRPO, so the loss gradient *is* the table's.

Pure torch: no Ray, no DeepSpeed. Every kernel ``f`` has its plain-loop twin ``f_loop`` right below it (lists
of floats in, lists of floats out, token by token as the formulas read); tests hold them equal to 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# RFT / online RFT
# ----------------------------------------------------------------------------------------------


def rft_coefficients(correct: Tensor) -> Tensor:
    """GC = I(o): 1 for a sample whose answer is right, 0 otherwise (RFT and online RFT alike —
    they differ only in where the samples come from). ``correct`` ``[N]`` bool or 0/1 → ``[N]`` float."""
    return (correct.to(torch.float64) > 0).to(torch.get_default_dtype())  # [N]


# ----------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """Chosen/rejected sample indices (into a step's rollouts), one pair per entry.

    ``groups_without_pair`` counts questions whose completions were all right or all wrong: they
    give no pair and are not trained on (reported, not dropped silently).
    """

    chosen: list[int]
    rejected: list[int]
    groups_without_pair: int


def build_pairs(correct: Sequence[bool], group_size: int) -> Pairs:
    """Pair the k-th correct with the k-th incorrect completion of each question (groups of
    ``group_size`` contiguous samples). A group with c correct and w wrong answers gives min(c, w)
    pairs; each sample is used at most once. Deterministic (sample order)."""
    if len(correct) % group_size:
        raise ValueError(f"{len(correct)} samples do not form groups of {group_size}")
    chosen, rejected, empty = [], [], 0
    for start in range(0, len(correct), group_size):
        idx = range(start, start + group_size)
        good = [i for i in idx if correct[i]]
        bad = [i for i in idx if not correct[i]]
        if not good or not bad:
            empty += 1
        for c, r in zip(good, bad):
            chosen.append(c)
            rejected.append(r)
    return Pairs(chosen, rejected, empty)


def sequence_log_ratio(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """ρ(o) = mean over o's loss tokens of ``logp − ref_logp`` (``[N, T]`` each) → ``[N]``.

    A row without loss tokens gives 0."""
    m = mask.to(logp.dtype)  # [N, T]
    return ((logp - ref_logp) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [N]


def sequence_log_ratio_loop(logp: list[list[float]], ref_logp: list[list[float]], mask: list[list[float]]) -> list[float]:
    """Plain-loop twin of :func:`sequence_log_ratio` (tests hold them equal)."""
    out = []
    for lp, rp, m in zip(logp, ref_logp, mask):
        total, count = 0.0, 0.0
        for a, b, k in zip(lp, rp, m):
            if k:
                total += (a - b) * k
                count += k
        out.append(total / count if count else 0.0)
    return out


def dpo_loss(chosen_ratio: Tensor, rejected_ratio: Tensor, beta: float) -> tuple[Tensor, dict[str, float]]:
    """The DPO loss of the paper (A.1.4), mean over pairs:  −log σ(β·(ρ(o⁺) − ρ(o⁻))).

    ``chosen_ratio``/``rejected_ratio`` are ``[P]`` values of :func:`sequence_log_ratio`. Returns
    ``(loss, metrics)``: ``dpo/loss``, ``dpo/margin`` (mean β·(ρ⁺ − ρ⁻)), ``dpo/pair_accuracy``
    (fraction with a positive margin). Zero pairs give a zero loss that keeps the graph.
    """
    margin = beta * (chosen_ratio - rejected_ratio)  # [P]
    if margin.numel() == 0:
        return margin.sum() * 0.0, {"dpo/loss": 0.0, "dpo/margin": 0.0, "dpo/pair_accuracy": 0.0}
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        metrics = {"dpo/loss": float(loss), "dpo/margin": float(margin.mean()),
                   "dpo/pair_accuracy": float((margin > 0).float().mean())}
    return loss, metrics


def dpo_loss_loop(chosen_ratio: list[float], rejected_ratio: list[float], beta: float) -> float:
    """Plain-loop twin of :func:`dpo_loss` (tests hold them equal)."""
    losses = []
    for c, r in zip(chosen_ratio, rejected_ratio):
        margin = beta * (c - r)
        losses.append(-math.log(1.0 / (1.0 + math.exp(-margin))))
    return sum(losses) / len(losses) if losses else 0.0


def dpo_coefficients(chosen_ratio: Tensor, rejected_ratio: Tensor, beta: float) -> Tensor:
    """GC_DPO = β·σ(β·ρ(o⁻) − β·ρ(o⁺)) per pair, ``[P]``: the gradient of :func:`dpo_loss` (summed
    over pairs, not averaged) is ``−Σ_pairs GC · (∇ρ(o⁺) − ∇ρ(o⁻))``. Multiply by ``+1`` on the chosen
    and ``−1`` on the rejected completion's tokens to get the table's per-token coefficient."""
    return beta * torch.sigmoid(beta * (rejected_ratio - chosen_ratio))  # [P]


def dpo_coefficients_loop(chosen_ratio: list[float], rejected_ratio: list[float], beta: float) -> list[float]:
    """Plain-loop twin of :func:`dpo_coefficients` (tests hold them equal)."""
    return [beta / (1.0 + math.exp(-beta * (r - c))) for c, r in zip(chosen_ratio, rejected_ratio)]


# ----------------------------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------------------------


def ppo_token_rewards(final_reward: Tensor, old_logp: Tensor, ref_logp: Tensor | None, mask: Tensor,
                      beta: float) -> Tensor:
    """The paper's PPO reward (§4.1.1, eq. 2): r_t = r_φ(q, o_≤t) − β·log(π_θold(o_t)/π_ref(o_t)).

    The outcome reward ``final_reward`` ``[N]`` is paid at each row's last loss token; the KL
    penalty at every loss token. ``old_logp``/``ref_logp``/``mask`` are ``[N, T]``; returns ``[N, T]``
    (0 off the mask). ``ref_logp`` may be None only when ``beta == 0``.
    """
    m = mask.to(old_logp.dtype)  # [N, T]
    rewards = torch.zeros_like(old_logp)  # [N, T]
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        rewards = rewards - beta * (old_logp - ref_logp) * m  # [N, T]
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)  # [N, T]
    last = torch.where(m > 0, positions, torch.full_like(positions, -1)).max(dim=1).values  # [N]
    has = last >= 0
    rows = torch.nonzero(has).squeeze(1)
    rewards[rows, last[has]] += final_reward.to(rewards.dtype)[has]
    return rewards


def ppo_token_rewards_loop(final_reward: list[float], old_logp: list[list[float]], ref_logp: list[list[float]] | None,
                          mask: list[list[float]], beta: float) -> list[list[float]]:
    """Plain-loop twin of :func:`ppo_token_rewards` (tests hold them equal)."""
    out = []
    for i, m in enumerate(mask):
        row = [0.0] * len(m)
        last = None
        for t, k in enumerate(m):
            if k:
                if beta:
                    row[t] -= beta * (old_logp[i][t] - ref_logp[i][t])
                last = t
        if last is not None:
            row[last] += final_reward[i]
        out.append(row)
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's loss tokens (``[N, T]`` in, ``[N, T]`` out):

        δ_t = r_t + γ·V_{t'} − V_t,   A_t = δ_t + γλ·A_{t'},   returns R_t = A_t + V_t

    where t' is the row's next loss position (positions with mask 0 — padding, tool output — are
    skipped) and V after the last loss token is 0 (the episode ends). Values are 0 off the mask.
    Vectorised over rows, a loop over positions.
    """
    m = mask.to(values.dtype)  # [N, T]
    adv = torch.zeros_like(values)  # [N, T]
    next_value = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)  # [N]
    next_adv = torch.zeros_like(next_value)  # [N]
    for t in range(values.shape[1] - 1, -1, -1):
        on = m[:, t] > 0  # [N]
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [N]
        a = delta + gamma * lam * next_adv  # [N]
        adv[:, t] = torch.where(on, a, torch.zeros_like(a))
        next_value = torch.where(on, values[:, t], next_value)
        next_adv = torch.where(on, a, next_adv)
    returns = (adv + values) * m  # [N, T]
    return adv, returns


def gae_loop(rewards: list[list[float]], values: list[list[float]], mask: list[list[float]], gamma: float,
            lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """Plain-loop twin of :func:`gae` (tests hold them equal)."""
    advs, rets = [], []
    for r, v, m in zip(rewards, values, mask):
        steps = [t for t, k in enumerate(m) if k]  # the row's loss positions, in order
        adv_row = [0.0] * len(m)
        ret_row = [0.0] * len(m)
        running = 0.0
        for j in range(len(steps) - 1, -1, -1):
            t = steps[j]
            next_v = v[steps[j + 1]] if j + 1 < len(steps) else 0.0
            delta = r[t] + gamma * next_v - v[t]
            running = delta + gamma * lam * running
            adv_row[t] = running
            ret_row[t] = running + v[t]
        advs.append(adv_row)
        rets.append(ret_row)
    return advs, rets


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean)/(std + eps) over the masked entries (biased std), 0 off the mask. ``[N, T]``."""
    m = mask.to(x.dtype)  # [N, T]
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) / (var.sqrt() + eps) * m  # [N, T]


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2,
               normalizer: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss, token mean:  ½·max((V − R)², (clip(V, V_old ± ε) − R)²).

    ``normalizer`` replaces the number of loss tokens (the global count when a batch is split).
    ``clip <= 0`` turns the clipping off. All inputs ``[N, T]``."""
    m = mask.to(values.dtype)  # [N, T]
    err = (values - returns) ** 2  # [N, T]
    if clip > 0:
        clipped = old_values + (values - old_values).clamp(-clip, clip)  # [N, T]
        err = torch.maximum(err, (clipped - returns) ** 2)  # [N, T]
    n = float(m.sum()) if normalizer is None else normalizer
    loss = 0.5 * (err * m).sum() / max(n, 1.0)
    with torch.no_grad():
        sel = m > 0
        metrics = {"value/loss": float(loss),
                   "value/mean": float(values[sel].mean()) if sel.any() else 0.0,
                   "value/abs_err": float((values - returns).abs()[sel].mean()) if sel.any() else 0.0}
    return loss, metrics


def value_loss_loop(values: list[list[float]], old_values: list[list[float]], returns: list[list[float]],
                   mask: list[list[float]], clip: float) -> float:
    """Plain-loop twin of :func:`value_loss` (tests hold them equal)."""
    total, count = 0.0, 0.0
    for v_row, o_row, r_row, m_row in zip(values, old_values, returns, mask):
        for v, o, r, k in zip(v_row, o_row, r_row, m_row):
            if not k:
                continue
            err = (v - r) ** 2
            if clip > 0:
                vc = o + min(max(v - o, -clip), clip)
                err = max(err, (vc - r) ** 2)
            total += 0.5 * err
            count += 1
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------------------------
# The table, as numbers
# ----------------------------------------------------------------------------------------------


def grpo_coefficients(advantages: Tensor, logp: Tensor, ref_logp: Tensor | None, beta: float) -> Tensor:
    """GC_GRPO = Â_{i,t} + β·(π_ref/π_θ − 1) per token (``[N, T]``; ``advantages`` ``[N]`` or ``[N, T]``):
    the derivative of −(Â·ratio − β·k3) with respect to log π_θ at ratio 1."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)  # [N, T]
    if ref_logp is None or beta == 0:
        return advantages.clone()
    return advantages + beta * (torch.exp(ref_logp - logp) - 1.0)  # [N, T]


__all__ = [
    "Pairs",
    "build_pairs",
    "dpo_coefficients",
    "dpo_loss",
    "gae",
    "grpo_coefficients",
    "ppo_token_rewards",
    "rft_coefficients",
    "sequence_log_ratio",
    "value_loss",
    "whiten",
]
