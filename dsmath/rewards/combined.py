"""The ``combined`` reward: a verdict reward (``rule``, or ``sandbox`` for ``rollout.mode=pot``) and a reward model's
score(s) (:mod:`dsmath.rewards.model`), combined as ``RewardConfig.combine`` says (:func:`combine_rewards`).

``reward.model_kind=outcome`` fills ``RewardResult.reward``; ``process`` also fills ``step_rewards`` and
``step_end_token_index`` (what ``algorithm.advantage=process`` consumes; a completion without steps keeps the verdict's
result). ``auto`` picks this kind when ``reward.model_path`` is set or ``algorithm.advantage=process``.

Guaranteed: the :class:`dsmath.rewards.base.Reward` contract; ``correct`` is always the verdict's.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

from dsmath.errors import UserError
from dsmath.records import RewardResult, Rollout, check_schema
from dsmath.rewards.base import Reward, RewardKind


def combine_rewards(rule: RewardResult, cfg, *, outcome_score: float | None = None,
                    step_scores: Sequence[float] = (), step_ends: Sequence[int] = ()) -> RewardResult:
    """One reward from the rule verdict (grading / sandbox) and a reward model's score(s) (``cfg`` a RewardConfig).

    ``cfg.combine``:

    * ``weighted``: outcome ``rule_weight·rule + model_weight·score``. Process: step j gets
      ``model_weight·step_scores[j]``, and the last step also gets ``rule_weight·rule``.
    * ``gate``: the rule decides whether the model's score counts: a correct answer gets
      ``model_weight·score`` (each step: ``model_weight·step_score``), a wrong one the rule's reward
      (``incorrect_reward``, minus any format penalty) as its outcome and on every step.

    Scores are probabilities in [0, 1]. ``correct`` stays the rule's verdict (accuracy metrics never depend on
    a model). Without any model score the rule result is returned unchanged. ``RewardResult.reward`` is the
    outcome reward; with steps it is the last step's combined reward.
    """
    if len(step_scores) != len(step_ends):
        raise ValueError(f"{len(step_scores)} step scores but {len(step_ends)} step ends")
    if outcome_score is None and not step_scores:
        return rule
    rw, mw = cfg.rule_weight, cfg.model_weight
    if step_scores:
        if cfg.combine == "weighted":
            steps = [mw * s for s in step_scores]
            steps[-1] += rw * rule.reward
        else:
            steps = [mw * s for s in step_scores] if rule.correct else [rule.reward] * len(step_scores)
        return replace(rule, reward=float(steps[-1]), step_rewards=tuple(float(s) for s in steps),
                       step_end_token_index=tuple(int(e) for e in step_ends),
                       reason=f"{rule.reason}; prm {cfg.combine} over {len(steps)} steps")
    assert outcome_score is not None
    if cfg.combine == "weighted":
        reward = rw * rule.reward + mw * outcome_score
    else:
        reward = mw * outcome_score if rule.correct else rule.reward
    return replace(rule, reward=float(reward), reason=f"{rule.reason}; orm {cfg.combine} score {outcome_score:.3f}")


class CombinedReward:
    """``verifier``'s result per rollout, combined with ``scorer``'s outcome (``kind="outcome"``) or step
    (``kind="process"``) scores by :func:`combine_rewards` under ``cfg``. ``scorer`` is a
    :class:`dsmath.rewards.model.RewardModelScorer` (or anything with its ``outcome_scores`` / ``step_scores``)."""

    def __init__(self, cfg, verifier: Reward, scorer: Any, *, step_delimiter: str = "\n",
                 worker_id: str = "rm-0"):
        self.cfg = cfg
        self.kind = cfg.model_kind
        self.verifier = verifier
        self.scorer = scorer
        self.delimiter = step_delimiter
        self.worker_id = worker_id
        self.scored = 0
        self.seconds = 0.0

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        start = time.perf_counter()
        for r in rollouts:
            check_schema(r)
        rule = self.verifier.score(rollouts)
        if self.kind == "outcome":
            out = [combine_rewards(res, self.cfg, outcome_score=s)
                   for res, s in zip(rule, self.scorer.outcome_scores(rollouts), strict=True)]
        else:
            out = [combine_rewards(res, self.cfg, step_scores=s, step_ends=e) if s else res
                   for res, (s, e) in zip(rule, self.scorer.step_scores(rollouts, self.delimiter), strict=True)]
        self.scored += len(out)
        self.seconds += time.perf_counter() - start
        return out

    def close(self) -> None:
        self.verifier.close()

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "kind": self.kind, "scored": self.scored,
                "seconds": round(self.seconds, 4)}


def build(cfg, worker_id: str) -> CombinedReward:
    """The verdict reward of ``cfg.rollout.mode`` and the model at ``cfg.reward.model_path``, on one CPU thread
    (one core per reward actor; the machine is shared with generators and learners)."""
    import torch

    from dsmath.rewards import verifier
    from dsmath.rewards.model import RewardModelScorer

    torch.set_num_threads(1)
    if not cfg.reward.model_path:
        raise UserError("reward.kind=combined needs reward.model_path")
    rules = verifier(cfg, worker_id=f"{worker_id}-rules")
    scorer = RewardModelScorer(cfg.reward.model_path, batch_size=cfg.reward.model_batch_size)
    return CombinedReward(cfg.reward, rules, scorer, step_delimiter=cfg.algorithm.step_delimiter, worker_id=worker_id)


def check(cfg) -> str | None:
    if cfg.algorithm.advantage == "process" and not (cfg.reward.model_path and cfg.reward.model_kind == "process"):
        return ("algorithm.advantage=process needs a process reward model: set reward.model_path (dsmath rm train "
                "--kind process) and reward.model_kind=process")
    if not cfg.reward.model_path:
        return "reward.kind=combined needs reward.model_path (a reward model folder; train one with dsmath rm train)"
    return None


KIND = RewardKind(name="combined", build=build, check=check)
