"""Reward workers: score rollouts against their gold answers, as soon as each generator's chunk arrives.

``RewardWorker`` is a plain class; ``reward_worker_actor_class()`` makes it a Ray actor. ``RewardPool`` spreads
chunks over several workers (least outstanding rollouts first) and hands back one future per chunk, so the driver
submits each generator's output the moment it returns instead of waiting for the whole batch.

Grading goes through ``dsmath.grading.grade(completion, gold)`` when that module exists (hang-proof: it bounds
its own time). Until then, a local fallback extracts the last ``\\boxed{...}`` and compares exactly, then
numerically; it is pure string work and cannot hang. ``RewardResult.reason`` says which grader ran.

Guaranteed: ``score(rollouts)`` returns exactly one ``RewardResult`` per rollout, in order, with the rollout's
``request_id``/``sample_index``; a grader exception becomes an incorrect result with the reason, never a lost one.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Any, Callable, Sequence

from dsmath.config import RewardConfig
from dsmath.records import RewardResult, Rollout, check_schema


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def _as_number(text: str) -> Fraction | None:
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        try:
            value = float(cleaned)
        except ValueError:
            return None
        return Fraction(value) if math.isfinite(value) else None


def fallback_grade(completion: str, gold: str) -> tuple[bool, str, str | None]:
    """(correct, reason, extracted): boxed extraction, exact match, then numeric match."""
    pred = extract_boxed(completion)
    if pred is None:
        return False, "no \\boxed{} answer", None
    if pred == gold.strip():
        return True, "exact match", pred
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return (a == b), ("numeric match" if a == b else "numeric mismatch"), pred
    return False, "mismatch", pred


def _load_grader() -> tuple[Callable[[str, str], Any] | None, str]:
    try:
        from dsmath.grading import grade  # type: ignore[attr-defined]
    except ImportError:
        return None, "fallback"
    return grade, "dsmath.grading"


class RewardWorker:
    """Scores rollouts with ``RewardConfig`` rewards: ``correct_reward`` / ``incorrect_reward``, minus
    ``format_penalty`` when no final answer could be extracted."""

    def __init__(self, cfg: RewardConfig | None = None, *, worker_id: str = "reward-0"):
        self.cfg = cfg or RewardConfig()
        self.worker_id = worker_id
        self._grade, self.grader_name = _load_grader()
        self.scored = 0
        self.seconds = 0.0

    def _one(self, rollout: Rollout) -> RewardResult:
        gold = rollout.problem.answer
        timed_out = False
        try:
            if self._grade is not None:
                verdict = self._grade(rollout.completion, gold)
                correct = bool(verdict.correct)
                reason = str(getattr(verdict, "reason", ""))
                extracted = getattr(verdict, "extracted", getattr(verdict, "pred", None))
                timed_out = bool(getattr(verdict, "timed_out", False))
            else:
                correct, reason, extracted = fallback_grade(rollout.completion, gold)
        except Exception as exc:  # noqa: BLE001 - a grader bug must not lose a rollout's reward
            correct, reason, extracted = False, f"grader error: {type(exc).__name__}: {exc}", None
        reward = self.cfg.correct_reward if correct else self.cfg.incorrect_reward
        if extracted is None and not correct:
            reward -= self.cfg.format_penalty
        return RewardResult(
            request_id=rollout.request_id,
            sample_index=rollout.sample_index,
            reward=float(reward),
            correct=correct,
            reason=f"{self.grader_name}: {reason}",
            extracted=None if extracted is None else str(extracted),
            timed_out=timed_out,
        )

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        """One result per rollout, in order."""
        start = time.perf_counter()
        results = []
        for rollout in rollouts:
            check_schema(rollout)
            results.append(self._one(rollout))
        self.scored += len(results)
        self.seconds += time.perf_counter() - start
        return results

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "grader": self.grader_name, "scored": self.scored,
                "seconds": round(self.seconds, 4)}


def reward_worker_actor_class(num_cpus: float = 0.5):
    import ray

    return ray.remote(num_cpus=num_cpus)(RewardWorker)
