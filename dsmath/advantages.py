"""The driver's ``advantages`` stage as one pure function: records in, per-sample advantages out.

Which advantage a sample gets is the algorithm switch (``grpo.algorithm``) and the supervision
switch (``grpo.advantage``); the driver calls :func:`sample_advantages` and never branches on
them itself. Pure: records and torch only, no Ray.

Returned values are either a float (the same advantage on every completion token) or a list with
one float per completion token (process supervision); ``learner.batch.collate_rollouts`` accepts
both.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dsmath import grpo
from dsmath.algorithms import rft_coefficients
from dsmath.config import GRPOConfig
from dsmath.records import RewardResult, Rollout

Advantage = float | list[float]


def sample_advantages(cfg: GRPOConfig, rollouts: Sequence[Rollout], results: Sequence[RewardResult],
                      group_size: int) -> list[Advantage]:
    """Advantages for ``rollouts`` (groups of ``group_size`` contiguous samples, aligned with ``results``).

    Guaranteed: one entry per rollout, in order; a per-token entry has ``len(completion_ids)`` values.
    Raises ``ValueError`` for an algorithm this function does not produce advantages for.
    """
    if len(rollouts) != len(results):
        raise ValueError(f"{len(rollouts)} rollouts but {len(results)} rewards")
    rewards = torch.tensor([r.reward for r in results], dtype=torch.float32)  # [B*G]
    if cfg.algorithm == "grpo" and cfg.advantage == "outcome":
        return grpo.group_advantages(rewards, group_size, cfg.adv_eps).tolist()
    if cfg.algorithm == "grpo" and cfg.advantage == "process":
        return process_token_advantages(rollouts, results, group_size, cfg.adv_eps)
    if cfg.algorithm in ("online_rft", "rft", "dpo"):
        # The same coefficient I(o); RFT and online RFT differ only in the sampling source (grpo.sampling).
        # DPO: I(o) is what its learner (learner.unified.DPOLearner) builds the right/wrong pairs from.
        return rft_coefficients(torch.tensor([r.correct for r in results])).tolist()
    if cfg.algorithm == "ppo" and cfg.advantage == "outcome":
        # The outcome reward r_φ(o); learner.unified.PPOLearner turns it into per-token rewards and GAE
        # advantages once the value model and the log-probs are known (dsmath.algorithms).
        return [float(r.reward) for r in results]
    raise ValueError(f"grpo.algorithm={cfg.algorithm!r} with grpo.advantage={cfg.advantage!r} has no advantage rule "
                     "here (see dsmath.algorithms)")


def process_token_advantages(rollouts: Sequence[Rollout], results: Sequence[RewardResult], group_size: int,
                             eps: float = 1e-6) -> list[list[float]]:
    """Process supervision (paper §4.1.3) on completion tokens.

    ``results[i].step_rewards[j]`` is the reward of step j, which ends at completion token
    ``results[i].step_end_token_index[j]`` (an index into ``rollouts[i].completion_ids``).
    """
    lengths = [len(r.completion_ids) for r in rollouts]
    width = max(lengths, default=0)
    mask = torch.zeros(len(rollouts), max(1, width))  # [N, T'] completion-token positions
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    adv = grpo.process_advantages(
        [list(r.step_rewards) for r in results], [list(r.step_end_token_index) for r in results], mask,
        [i // group_size for i in range(len(rollouts))], eps)  # [N, T']
    return [adv[i, :n].tolist() for i, n in enumerate(lengths)]
