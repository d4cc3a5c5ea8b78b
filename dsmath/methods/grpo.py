"""GRPO (paper §4.1): group-relative advantages — outcome (one value per completion) or process (per step) —
with β·k3 KL in the loss. Samples online by default."""

from __future__ import annotations

from typing import Sequence

from dsmath.methods.base import Method


def advantages(cfg, rollouts, results, group_size: int) -> list:
    """Outcome: (r − mean)/(std + ε) per group; process: per-token sums of normalised step rewards."""
    import torch

    from dsmath import grpo

    if cfg.advantage == "process":
        return process_token_advantages(rollouts, results, group_size, cfg.adv_eps)
    rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)  # [B*G]
    return grpo.group_advantages(rewards, group_size, cfg.adv_eps).tolist()


def process_token_advantages(rollouts: Sequence, results: Sequence, group_size: int, eps: float = 1e-6) -> list[list[float]]:
    """Process supervision (paper §4.1.3) on completion tokens.

    ``results[i].step_rewards[j]`` is the reward of step j, which ends at completion token
    ``results[i].step_end_token_index[j]`` (an index into ``rollouts[i].completion_ids``).
    """
    import torch

    from dsmath import grpo

    lengths = [len(r.completion_ids) for r in rollouts]
    width = max(lengths, default=0)
    mask = torch.zeros(len(rollouts), max(1, width))  # [N, T'] completion-token positions
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    adv = grpo.process_advantages(
        [list(r.step_rewards) for r in results], [list(r.step_end_token_index) for r in results], mask,
        [i // group_size for i in range(len(rollouts))], eps)  # [N, T']
    return [adv[i, :n].tolist() for i, n in enumerate(lengths)]


def check(cfg) -> str | None:
    if cfg.rollout.group_size < 2:
        return "rollout.group_size: GRPO needs at least 2 completions per question (group-relative advantages)"
    return None


METHOD = Method(name="grpo", sampling="online", advantages=advantages, kl="loss", check=check)
