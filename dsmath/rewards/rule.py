"""The ``rule`` reward: the stated final answer of a chain-of-thought (or tool-integrated) completion, graded
against the gold answer by :mod:`dsmath.grading`.

Grading goes through a ``dsmath.grading.GradingPool`` owned by the reward (one killable sympy process, a
``RewardConfig.timeout_s`` deadline per answer, ``strict`` or ``lenient`` extraction from ``RewardConfig.strict``):
a timeout is a reported outcome (``RewardResult.timed_out``), never a hang. ``RewardResult.reason`` starts with
``dsmath.grading``.

Infrastructure failures are never verdicts: when the grader fails on a sample — a grading worker that will not
start or keeps dying, any grader exception — the sample is graded again (``REGRADE_ATTEMPTS`` in all, each on
fresh workers), and if it still fails its result says so (``grader_failed``, reward 0, reason "grader failed:
..."). ``stats()["grader_failures"]`` counts them.

Verifier audit: a deterministic share ``RewardConfig.audit_fraction`` of the samples (chosen by a hash of
``request_id``/``sample_index``, so the same samples on a rerun or a reissue) is judged a second time by
``RewardConfig.audit_check`` — ``other_mode``: the same grader in the other extraction mode (strict ↔ lenient;
it shares the grader's symbolic cache, so it costs little more than the extraction), or ``math_verify`` (the
HuggingFace library, when installed; it times out only on the process's main thread, elsewhere the sample is not
audited). A sample is ``audited`` only when both checks gave a verdict (no grader failure or timeout on either
side); ``audit_disagrees`` when the verdicts differ. The audit never changes a reward.

Guaranteed: the :class:`dsmath.rewards.base.Reward` contract; ``grader_seconds`` is the wall time of a sample's
grading (re-gradings included; the audit excluded).
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any, Sequence

from dsmath.grading import GradingPool
from dsmath.records import RewardResult, Rollout, check_schema
from dsmath.rewards.base import REGRADE_ATTEMPTS, Audit, Graded, RewardKind, Tally, verdict_results

GRADER = "dsmath.grading"


def audit_selected(request_id: str, sample_index: int, fraction: float) -> bool:
    """Whether the verifier audit judges this sample: a fixed hash of its key below ``fraction`` (same on reruns)."""
    if fraction <= 0:
        return False
    return zlib.crc32(f"{request_id}/{sample_index}".encode()) / 2**32 < fraction


def math_verify_check(completion: str, gold: str) -> tuple[bool | None, str]:
    """(correct, reason) by math-verify; correct None when it cannot judge here (not installed, not on the main
    thread, where its timeouts cannot work, or it raised)."""
    try:
        import math_verify
    except ImportError:
        return None, "math_verify: not installed"
    if threading.current_thread() is not threading.main_thread():
        return None, "math_verify: needs the main thread for its timeouts"
    try:
        ok = bool(math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(completion)))
    except Exception as exc:  # noqa: BLE001 - no verdict from the second check is no audit, never a failure
        return None, f"math_verify: {type(exc).__name__}"
    return ok, f"math_verify: {'equal' if ok else 'not equal'}"


def _judged(v: Any) -> bool:
    """A grading outcome that is a verdict: no exception, no grader failure, no timeout."""
    return (not isinstance(v, Exception) and not getattr(v, "failed", False)
            and not getattr(v, "timed_out", False) and v.correct is not None)


class RuleReward:
    """``RewardConfig`` rewards for the stated final answer (see the module docstring)."""

    def __init__(self, cfg, *, worker_id: str = "reward-0"):
        """``cfg``: a ``dsmath.config.RewardConfig``."""
        self.cfg = cfg
        self.worker_id = worker_id
        self.grader_name = GRADER
        self._pool = GradingPool(workers=1, timeout_s=cfg.timeout_s, mode="strict" if cfg.strict else "lenient")
        self._grade_many = self._pool.grade_many
        self.tally = Tally()

    def _grade_pairs(self, pairs: list[tuple[str, str]]) -> list:
        """One grading outcome (or the exception) per pair; a batch that raises is graded pair by pair."""
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

    def _graded(self, rollouts: Sequence[Rollout]) -> list[Graded]:
        """One :class:`Graded` per rollout; what the grader failed on is graded again (never cached as a verdict)."""
        pairs = [(r.completion, r.problem.answer) for r in rollouts]
        verdicts = self._grade_pairs(pairs)
        seconds = [float(getattr(v, "seconds", 0.0)) for v in verdicts]
        for _ in range(REGRADE_ATTEMPTS - 1):
            again = [i for i, v in enumerate(verdicts) if isinstance(v, Exception) or getattr(v, "failed", False)]
            if not again:
                break
            for i, v in zip(again, self._grade_pairs([pairs[i] for i in again]), strict=True):
                verdicts[i] = v
                seconds[i] += float(getattr(v, "seconds", 0.0))
        out: list[Graded] = []
        for v, s in zip(verdicts, seconds, strict=True):
            if isinstance(v, Exception):
                out.append(Graded(False, f"grader failed: {type(v).__name__}: {v}", None, False, True, s))
            elif getattr(v, "failed", False):
                out.append(Graded(False, f"grader failed: {v.reason}", v.extracted, False, True, s))
            else:
                out.append(Graded(bool(v.correct), str(v.reason), v.extracted, bool(v.timed_out), False, s))
        return out

    def _audit(self, rollouts: Sequence[Rollout], graded: list[Graded]) -> dict[int, Audit]:
        """The audited samples' second verdicts (see the module docstring)."""
        if self.cfg.audit_fraction <= 0:
            return {}
        chosen = [i for i, (r, g) in enumerate(zip(rollouts, graded, strict=True))
                  if not g.timed_out and not g.failed
                  and audit_selected(r.request_id, r.sample_index, self.cfg.audit_fraction)]
        pairs = [(rollouts[i].completion, rollouts[i].problem.answer) for i in chosen]
        if self.cfg.audit_check == "math_verify":
            second = [math_verify_check(c, g) for c, g in pairs]
        else:
            other = "lenient" if self.cfg.strict else "strict"
            second = [(bool(v.correct) if _judged(v) else None,
                       f"{other}: {v.reason if _judged(v) else 'no verdict'}"
                       + (f" (extracted {v.extracted!r})" if _judged(v) and v.extracted is not None else ""))
                      for v in self._grade_pairs_in(pairs, other)]
        return {i: Audit(ok != graded[i].correct, why) for i, (ok, why) in zip(chosen, second, strict=True)
                if ok is not None}

    def _grade_pairs_in(self, pairs: list[tuple[str, str]], mode: str) -> list:
        """``_grade_pairs`` in extraction ``mode`` (the audit's other mode)."""
        try:
            return list(self._grade_many(pairs, mode=mode))
        except Exception as exc:  # noqa: BLE001 - an audit that cannot run audits nothing
            return [exc] * len(pairs)

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        start = time.perf_counter()
        for rollout in rollouts:
            check_schema(rollout)
        graded = self._graded(rollouts)
        graded_s = time.perf_counter() - start
        results = verdict_results(self.cfg, rollouts, graded, self.grader_name, self._audit(rollouts, graded))
        self.tally.add(results, graded_s)
        return results

    def close(self) -> None:
        self._pool.close()

    def stats(self) -> dict[str, Any]:
        return self.tally.as_dict(self.worker_id, self.grader_name)


def check(cfg) -> str | None:
    if cfg.rollout.mode == "pot":
        return ("reward.kind=rule grades a stated answer and rollout.mode=pot completions state none: use "
                "reward.kind=sandbox (or auto)")
    return None


KIND = RewardKind(name="rule", build=lambda cfg, worker_id: RuleReward(cfg.reward, worker_id=worker_id), check=check)
