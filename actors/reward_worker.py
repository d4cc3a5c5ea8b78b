"""The reward actor: one class that hosts whichever reward ``reward.kind`` picks (``dsmath.rewards``: rule grading,
the PoT sandbox, a reward model combined with either, or any kind registered there).

``RewardWorker`` is a plain class; ``reward_worker_actor_class()`` makes it a Ray actor. ``actors.pool.RewardPool``
spreads chunks over several of them (least outstanding rollouts first) and hands back one future per chunk, so the
driver submits each generator's output the moment it returns instead of waiting for the whole batch.

Guaranteed: what the hosted reward guarantees (``dsmath.rewards.base.Reward``): exactly one ``RewardResult`` per
rollout, in order; a grader or sandbox failure is a flagged result (``grader_failed``), never a lost one.
"""

from __future__ import annotations

from typing import Any, Sequence

from dsmath import rewards
from dsmath.records import RewardResult, Rollout


class RewardWorker:
    """Hosts ``dsmath.rewards.build(cfg)`` (``cfg`` a TrainConfig)."""

    def __init__(self, cfg, *, worker_id: str = "reward-0"):
        self.reward = rewards.build(cfg, worker_id=worker_id)

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        return self.reward.score(rollouts)

    def close(self) -> None:
        self.reward.close()

    def stats(self) -> dict[str, Any]:
        return self.reward.stats()


def reward_worker_actor_class(num_cpus: float = 0.5):
    """``RewardWorker`` as a Ray actor class: ``.remote(train_cfg, worker_id=...)``."""
    import ray

    return ray.remote(num_cpus=num_cpus)(RewardWorker)
