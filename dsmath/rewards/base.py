"""What a reward is (:mod:`dsmath.rewards` holds the registry), and the reward arithmetic the verdict kinds share.

A *verdict* kind (``rule``, ``sandbox``) judges each rollout right or wrong and turns the judgement into
``RewardConfig`` rewards with :func:`verdict_results`; the ``combined`` kind adds a reward model's score to a
verdict kind's results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol, Sequence

from dsmath.records import RewardResult, Rollout

REGRADE_ATTEMPTS = 2  # gradings of a sample whose grader failed (each already retried on fresh workers)


class Reward(Protocol):
    """Scores rollouts. Every kind guarantees: ``score(rollouts)`` returns exactly one ``RewardResult`` per rollout,
    in order, with the rollout's ``request_id``/``sample_index`` (never a lost one); an infrastructure failure is a
    result with ``grader_failed`` set, never an exception for the batch. ``close()`` releases worker processes and
    may be called more than once; ``stats()`` is a flat dict of counters (``scored`` at least)."""

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


def no_refusal(cfg: Any) -> str | None:
    return None


@dataclass(frozen=True)
class RewardKind:
    """One kind of reward: ``build(train_cfg, worker_id)`` makes the :class:`Reward` (inside a reward actor, or in
    process); ``check(train_cfg)`` returns a one-line refusal, or None — the driver asks it before any reward actor
    starts, so a user mistake is an exit-2 line, not a dead actor."""

    name: str
    build: Callable[[Any, str], Reward]
    check: Callable[[Any], str | None] = no_refusal


class Graded(NamedTuple):
    """One rollout's judgement by a verdict kind."""

    correct: bool
    reason: str
    extracted: str | None  # the final answer read (or the program's printed line); None: no answer
    timed_out: bool
    failed: bool  # the grader (not the answer) failed: no verdict
    seconds: float  # wall time of its grading, re-gradings included


class Audit(NamedTuple):
    disagrees: bool
    reason: str


def verdict_results(cfg, rollouts: Sequence[Rollout], graded: Sequence[Graded], grader: str,
                    audit: dict[int, Audit]) -> list[RewardResult]:
    """``cfg.correct_reward`` / ``incorrect_reward`` (``cfg`` a RewardConfig), minus ``format_penalty`` when no final
    answer could be extracted; a grader failure gets reward 0 and ``grader_failed`` (the driver drops its group).
    ``reason`` starts with ``grader``; ``audit`` holds the audited indices (the audit never changes a reward)."""
    results = []
    for i, (rollout, g) in enumerate(zip(rollouts, graded, strict=True)):
        correct = g.correct
        reward = cfg.correct_reward if correct else cfg.incorrect_reward
        if g.extracted is None and not correct:
            reward -= cfg.format_penalty
        if g.failed:  # judged nothing: a neutral value, and the flag that makes the driver drop the group
            reward, correct = 0.0, False
        seen = audit.get(i, Audit(False, ""))
        results.append(RewardResult(
            request_id=rollout.request_id, sample_index=rollout.sample_index, reward=float(reward), correct=correct,
            reason=f"{grader}: {g.reason}", extracted=None if g.extracted is None else str(g.extracted),
            timed_out=g.timed_out, grader_failed=g.failed, grader_seconds=float(g.seconds), audited=i in audit,
            audit_disagrees=seen.disagrees, audit_reason=seen.reason))
    return results


@dataclass
class Tally:
    """The counters a verdict kind reports in ``stats()``."""

    scored: int = 0
    grader_failures: int = 0
    seconds: float = 0.0  # grading wall time (the audit excluded)
    audited: int = 0
    audit_disagreements: int = 0

    def add(self, results: Sequence[RewardResult], seconds: float) -> None:
        self.scored += len(results)
        self.grader_failures += sum(r.grader_failed for r in results)
        self.seconds += seconds
        self.audited += sum(r.audited for r in results)
        self.audit_disagreements += sum(r.audit_disagrees for r in results)

    def as_dict(self, worker_id: str, grader: str) -> dict[str, Any]:
        return {"worker_id": worker_id, "grader": grader, "scored": self.scored,
                "grader_failures": self.grader_failures, "seconds": round(self.seconds, 4),
                "audited": self.audited, "audit_disagreements": self.audit_disagreements}
