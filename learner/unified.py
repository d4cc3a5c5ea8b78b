"""PPO and DPO behind the driver's ``learner.grpo_step(batch)`` call (see :mod:`wiring.paradigm`).

The driver builds every step's batch the same way: ``advantages`` from :func:`dsmath.methods.sample_advantages`
(PPO: the outcome reward r_φ(o); DPO: I(o), whether o's answer is right), ``old_logprobs`` from the current
policy, ``ref_logprobs`` when ``algorithm.beta > 0``. These wrappers turn that into the algorithm's update:

* :class:`PPOLearner`: values V_ψ from the value model's own Ray group, per-token rewards r_φ − β·log π_old/π_ref,
  GAE advantages (whitened when ``algorithm.whiten_advantages``), the clipped policy step without a KL term, then the
  value step on the GAE returns.
* :class:`DPOLearner`: pairs (a right and a wrong completion of one question) and the DPO step against the frozen
  reference (:meth:`learner.policy.PolicyLearner.dpo_step`).

Every other attribute (weights, checkpoints, ``actors``) is the policy group's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from dsmath import algorithms
from dsmath.config import AlgorithmConfig, TrainConfig
from learner.batch import TrainBatch, ValueBatch


def _per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value broadcast over a row's loss tokens, read back: ``[N, T]`` → ``[N]`` (0 for empty rows)."""
    m = mask.to(values.dtype)  # [N, T]
    return (values * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [N]


class _Wrapper:
    def __init__(self, group) -> None:
        self.group = group

    def __getattr__(self, name):  # only called for attributes this wrapper does not have
        return getattr(self.group, name)


class DPOLearner(_Wrapper):
    """DPO on the pairs of each step's graded groups (``group_size`` contiguous samples per question)."""

    def __init__(self, group, algo_cfg: AlgorithmConfig, *, group_size: int) -> None:
        super().__init__(group)
        self.beta = algo_cfg.dpo_beta
        self.group_size = group_size

    def grpo_step(self, batch: TrainBatch) -> dict[str, float]:
        correct = (_per_row(batch.advantages, batch.loss_mask) > 0.5).tolist()  # I(o) per sample
        pairs = algorithms.build_pairs(correct, self.group_size)
        usable = len(pairs.chosen) - len(pairs.chosen) % self.group.num_ranks  # whole pairs per rank
        metrics = {"dpo/pairs": float(usable), "dpo/groups_without_pair": float(pairs.groups_without_pair),
                   "dpo/pairs_left_for_ranks": float(len(pairs.chosen) - usable)}
        if usable == 0:  # nothing to contrast this step: no update (counted, not hidden)
            return {**metrics, "dpo/skipped_step": 1.0}
        rows = [i for c, r in zip(pairs.chosen[:usable], pairs.rejected[:usable]) for i in (c, r)]
        pair_batch = dataclasses.replace(batch.select(rows), advantages=None, old_logprobs=None, ref_logprobs=None)
        return {**self.group.dpo_step(pair_batch, self.beta), **metrics, "dpo/skipped_step": 0.0}


class PPOLearner(_Wrapper):
    """PPO with a learned value model (a second :class:`learner.ray_group.LearnerGroup`, ``kind='value'``)."""

    def __init__(self, group, cfg: TrainConfig, *, model_dir: str | Path, seed: int, value_options: dict) -> None:
        import ray

        from learner.ray_group import LearnerGroup

        super().__init__(group)
        self.cfg = cfg
        g, lr = cfg.algorithm, cfg.learner
        # On a small local cluster the placement group holds the generators' and policy ranks' CPUs; the value
        # ranks then share what is left (sync mode runs one stage at a time, so they do not compete).
        free = float(ray.available_resources().get("CPU", 0.0))
        cpus = min(lr.cpus_per_rank, max(0.0, free - 0.01) / lr.num_ranks)
        value_cfg = dataclasses.replace(lr, lr=g.value_lr, cpus_per_rank=round(cpus, 2))
        self.value = LearnerGroup(model_dir, value_cfg, g, seed=seed, kind="value", value_clip=g.value_clip,
                                  **value_options)

    def grpo_step(self, batch: TrainBatch) -> dict[str, float]:
        g = self.cfg.algorithm
        if batch.old_logprobs is None:
            raise ValueError("PPO needs the policy's old log-probs in the batch (the driver's old_logprobs stage)")
        t0 = time.perf_counter()
        values = self.value.values(batch)  # [N, T]
        t1 = time.perf_counter()
        mask = batch.loss_mask  # [N, T]
        final = _per_row(batch.advantages, mask)  # [N] r_φ(o)
        rewards = algorithms.ppo_token_rewards(final, batch.old_logprobs, batch.ref_logprobs if g.beta else None,
                                               mask, g.beta)  # [N, T]
        adv, returns = algorithms.gae(rewards, values * mask, mask, g.gae_gamma, g.gae_lambda)  # [N, T] each
        raw = adv
        if g.whiten_advantages:
            adv = algorithms.whiten(adv, mask)  # [N, T]
        metrics = self.group.grpo_step(dataclasses.replace(batch, advantages=adv, ref_logprobs=None))
        t2 = time.perf_counter()
        value_metrics = self.value.value_step(ValueBatch(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                         loss_mask=mask, returns=returns, old_values=values))
        t3 = time.perf_counter()
        sel = mask > 0
        metrics.update(value_metrics)
        metrics.update({
            "ppo/kl_penalty_mean": (float((g.beta * (batch.old_logprobs - batch.ref_logprobs))[sel].mean())
                                    if g.beta and batch.ref_logprobs is not None and sel.any() else 0.0),
            "ppo/gae_adv_mean": float(raw[sel].mean()) if sel.any() else 0.0,
            "ppo/return_mean": float(returns[sel].mean()) if sel.any() else 0.0,
            "ppo/value_mean": float(values[sel].mean()) if sel.any() else 0.0,
            "time/values": t1 - t0,
            "time/value_update": t3 - t2,
        })
        return metrics

    def load_checkpoint(self, path) -> dict:
        """Refused: checkpoints hold the policy only, and a fresh value model would change the run."""
        from dsmath.errors import UserError

        raise UserError("--resume with algorithm.name=ppo: the value model is not checkpointed in this version; "
                        "start the run again")

    def shutdown(self) -> None:
        self.value.shutdown()
        self.group.shutdown()
