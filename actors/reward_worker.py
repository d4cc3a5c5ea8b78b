"""Reward workers: score rollouts against their gold answers, as soon as each generator's chunk arrives.

``RewardWorker`` is a plain class; ``reward_worker_actor_class()`` makes it a Ray actor. ``RewardPool`` spreads
chunks over several workers (least outstanding rollouts first) and hands back one future per chunk, so the driver
submits each generator's output the moment it returns instead of waiting for the whole batch.

Grading goes through a ``dsmath.grading.GradingPool`` owned by the worker (one killable sympy process, a
``RewardConfig.timeout_s`` deadline per answer, ``strict`` or ``lenient`` extraction from ``RewardConfig.strict``):
a timeout is a reported outcome (``RewardResult.timed_out``), never a hang. If ``dsmath.grading`` cannot be
imported, a local fallback extracts the last ``\\boxed{...}`` and compares exactly, then numerically (pure string
work, cannot hang). ``RewardResult.reason`` starts with the grader that ran.

Infrastructure failures are never verdicts: when the grader (or the PoT sandbox) fails on a sample — a grading
worker that will not start or keeps dying, a sandbox template that dies, a full or unreachable sandbox service,
any grader exception — the sample is graded again (``REGRADE_ATTEMPTS`` in all, each on fresh workers), and if it
still fails its result says so (``RewardResult.grader_failed``, reward 0, reason "grader failed: ..."): the
driver drops its group and counts it, never trains on it as wrong. ``stats()["grader_failures"]`` counts them.

Guaranteed: ``score(rollouts)`` returns exactly one ``RewardResult`` per rollout, in order, with the rollout's
``request_id``/``sample_index``; never a lost one.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Any, Callable, Sequence

from dsmath.config import RewardConfig
from dsmath.records import RewardResult, Rollout, check_schema

REGRADE_ATTEMPTS = 2  # gradings of a sample whose grader failed (each already retried on fresh workers)
_Verdict = tuple[bool, str, "str | None", bool, bool]  # (correct, reason, extracted, timed_out, grader_failed)


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


def _load_grader(cfg: RewardConfig) -> tuple[Callable[[Sequence[tuple[str, str]]], list] | None, Any, str]:
    """(batch grading function, pool to close, name); (None, None, "fallback") without dsmath.grading."""
    try:
        from dsmath.grading import GradingPool
    except ImportError:
        return None, None, "fallback"
    pool = GradingPool(workers=1, timeout_s=cfg.timeout_s, mode="strict" if cfg.strict else "lenient")
    return pool.grade_many, pool, "dsmath.grading"


class RewardWorker:
    """Scores rollouts with ``RewardConfig`` rewards: ``correct_reward`` / ``incorrect_reward``, minus
    ``format_penalty`` when no final answer could be extracted."""

    def __init__(self, cfg: RewardConfig | None = None, *, worker_id: str = "reward-0", mode: str = "cot"):
        """``mode="pot"``: the completion's program runs in the sandbox (local pool, or the gRPC service at
        ``cfg.sandbox_address``) and what it prints is graded; otherwise the stated answer is graded."""
        self.cfg = cfg or RewardConfig()
        self.worker_id = worker_id
        self.mode = mode
        self._grade_many, self._pool, self.grader_name = _load_grader(self.cfg)
        self._sandbox = None
        self.scored = 0
        self.grader_failures = 0
        self.seconds = 0.0

    def _pot_one(self, rollout: Rollout) -> _Verdict:
        from dsmath.sandbox import SandboxError, pot_reward, runner_for

        why = ""
        for attempt in range(REGRADE_ATTEMPTS):
            try:
                if self._sandbox is None:
                    self._sandbox = runner_for(self.cfg.sandbox_address)
                v = pot_reward(rollout.completion, rollout.problem.answer, runner=self._sandbox,
                               timeout_s=self.cfg.timeout_s)
                return v.correct, f"program: {v.reason}", v.answer, v.reason == "timeout", False
            except SandboxError as exc:  # the sandbox failed (not the program): run it again
                why = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2 * (attempt + 1))  # a busy service gets a moment
            except Exception as exc:  # noqa: BLE001 - anything else is no verdict either
                why = f"{type(exc).__name__}: {exc}"
        return False, f"grader failed: sandbox: {why}", None, False, True

    def _pot_verdicts(self, rollouts: Sequence[Rollout]) -> list[_Verdict]:
        return [self._pot_one(r) for r in rollouts]

    def _grade_pairs(self, pairs: list[tuple[str, str]]) -> list:
        """One Verdict (or the exception) per pair; a batch that raises is graded pair by pair."""
        try:
            return list(self._grade_many(pairs))
        except Exception:  # noqa: BLE001 - grade one by one so one bad pair cannot lose the others
            out: list = []
            for pair in pairs:
                try:
                    out.extend(self._grade_many([pair]))
                except Exception as exc:  # noqa: BLE001
                    out.append(exc)
            return out

    def _verdicts(self, rollouts: Sequence[Rollout]) -> list[_Verdict]:
        """(correct, reason, extracted, timed_out, grader_failed) per rollout."""
        if self.mode == "pot":
            return self._pot_verdicts(rollouts)
        pairs = [(r.completion, r.problem.answer) for r in rollouts]
        if self._grade_many is None:
            return [(*fallback_grade(c, g), False, False) for c, g in pairs]
        verdicts = self._grade_pairs(pairs)
        for _ in range(REGRADE_ATTEMPTS - 1):  # re-grade what the grader failed on (never cached as a verdict)
            again = [i for i, v in enumerate(verdicts) if isinstance(v, Exception) or getattr(v, "failed", False)]
            if not again:
                break
            for i, v in zip(again, self._grade_pairs([pairs[i] for i in again]), strict=True):
                verdicts[i] = v
        out: list[_Verdict] = []
        for v in verdicts:
            if isinstance(v, Exception):
                out.append((False, f"grader failed: {type(v).__name__}: {v}", None, False, True))
            elif getattr(v, "failed", False):
                out.append((False, f"grader failed: {v.reason}", v.extracted, False, True))
            else:
                out.append((bool(v.correct), str(v.reason), v.extracted, bool(v.timed_out), False))
        return out

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        """One result per rollout, in order: ``correct_reward`` / ``incorrect_reward``, minus ``format_penalty``
        when no final answer could be extracted."""
        start = time.perf_counter()
        for rollout in rollouts:
            check_schema(rollout)
        results = []
        for rollout, (correct, reason, extracted, timed_out, failed) in zip(rollouts, self._verdicts(rollouts),
                                                                            strict=True):
            reward = self.cfg.correct_reward if correct else self.cfg.incorrect_reward
            if extracted is None and not correct:
                reward -= self.cfg.format_penalty
            if failed:  # judged nothing: a neutral value, and the flag that makes the driver drop the group
                reward, correct = 0.0, False
                self.grader_failures += 1
            results.append(RewardResult(
                request_id=rollout.request_id,
                sample_index=rollout.sample_index,
                reward=float(reward),
                correct=correct,
                reason=f"{self.grader_name}: {reason}",
                extracted=None if extracted is None else str(extracted),
                timed_out=timed_out,
                grader_failed=failed,
            ))
        self.scored += len(results)
        self.seconds += time.perf_counter() - start
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "grader": self.grader_name, "scored": self.scored,
                "grader_failures": self.grader_failures, "seconds": round(self.seconds, 4)}


def reward_worker_actor_class(num_cpus: float = 0.5):
    import ray

    return ray.remote(num_cpus=num_cpus)(RewardWorker)
