"""PPO (paper §4.1, Table 10): a value model and GAE over per-token rewards r_φ − β·log π_old/π_ref (β is paid as
a reward, not in the loss). The learner wrapper (``learner.unified.PPOLearner``) turns the outcome reward given
here into token rewards and advantages once the values and log-probs are known."""

from __future__ import annotations

from dsmath.methods.base import Method


def outcome_reward(cfg, rollouts, results, group_size: int) -> list:
    if cfg.advantage != "outcome":
        raise ValueError("algorithm.name=ppo takes the outcome reward (algorithm.advantage=outcome)")
    return [float(r.reward) for r in results]


def check(cfg) -> str | None:
    if cfg.algorithm.sampling == "offline":
        return "algorithm.sampling: ppo learns a value of the current policy and needs online samples"
    return None


METHOD = Method(name="ppo", sampling="online", advantages=outcome_reward, kl="reward",
                reads_old_logprobs=True, learner="ppo", check=check)
