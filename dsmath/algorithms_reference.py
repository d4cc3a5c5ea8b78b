"""Plain Python loops for the kernels of :mod:`dsmath.algorithms` — slow, obvious, the ground truth
the vectorised versions are tested against. Lists of floats in, lists of floats out; token by token,
as the formulas read. Not for production use.
"""

from __future__ import annotations

import math


def sequence_log_ratio_ref(logp: list[list[float]], ref_logp: list[list[float]], mask: list[list[float]]) -> list[float]:
    out = []
    for lp, rp, m in zip(logp, ref_logp, mask):
        total, count = 0.0, 0.0
        for a, b, k in zip(lp, rp, m):
            if k:
                total += (a - b) * k
                count += k
        out.append(total / count if count else 0.0)
    return out


def dpo_loss_ref(chosen_ratio: list[float], rejected_ratio: list[float], beta: float) -> float:
    losses = []
    for c, r in zip(chosen_ratio, rejected_ratio):
        margin = beta * (c - r)
        losses.append(-math.log(1.0 / (1.0 + math.exp(-margin))))
    return sum(losses) / len(losses) if losses else 0.0


def dpo_coefficients_ref(chosen_ratio: list[float], rejected_ratio: list[float], beta: float) -> list[float]:
    return [beta / (1.0 + math.exp(-beta * (r - c))) for c, r in zip(chosen_ratio, rejected_ratio)]


def ppo_token_rewards_ref(final_reward: list[float], old_logp: list[list[float]], ref_logp: list[list[float]] | None,
                          mask: list[list[float]], beta: float) -> list[list[float]]:
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


def gae_ref(rewards: list[list[float]], values: list[list[float]], mask: list[list[float]], gamma: float,
            lam: float) -> tuple[list[list[float]], list[list[float]]]:
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


def value_loss_ref(values: list[list[float]], old_values: list[list[float]], returns: list[list[float]],
                   mask: list[list[float]], clip: float) -> float:
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
