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

Verifier audit: a deterministic share ``RewardConfig.audit_fraction`` of the samples (chosen by a hash of
``request_id``/``sample_index``, so the same samples on a rerun or a reissue) is judged a second time by
``RewardConfig.audit_check`` — ``other_mode``: the same grader in the other extraction mode (strict ↔ lenient;
it shares the grader's symbolic cache, so it costs little more than the extraction), or ``math_verify`` (the
HuggingFace library, when installed; it times out only on the process's main thread, elsewhere the sample is not
audited). A sample is ``audited`` only when both checks gave a verdict (no grader failure or timeout on either
side); ``audit_disagrees`` when the verdicts differ. The audit never changes a reward. Not audited: ``pot`` mode
(its verdict is the program's output, with no second reading) and the fallback grader.

Guaranteed: ``score(rollouts)`` returns exactly one ``RewardResult`` per rollout, in order, with the rollout's
``request_id``/``sample_index``; never a lost one. ``RewardResult.grader_seconds`` is the wall time of its
grading (re-gradings included; the audit excluded).
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from fractions import Fraction
from typing import Any, Callable, Sequence

from dsmath.config import RewardConfig
from dsmath.records import RewardResult, Rollout, check_schema

REGRADE_ATTEMPTS = 2  # gradings of a sample whose grader failed (each already retried on fresh workers)
# (correct, reason, extracted, timed_out, grader_failed, seconds)
_Verdict = tuple[bool, str, "str | None", bool, bool, float]


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
        self.audited = 0
        self.audit_disagreements = 0

    def _pot_one(self, rollout: Rollout) -> _Verdict:
        from dsmath.sandbox import SandboxError, pot_reward, runner_for

        why, t0 = "", time.perf_counter()
        for attempt in range(REGRADE_ATTEMPTS):
            try:
                if self._sandbox is None:
                    self._sandbox = runner_for(self.cfg.sandbox_address)
                v = pot_reward(rollout.completion, rollout.problem.answer, runner=self._sandbox,
                               timeout_s=self.cfg.timeout_s)
                return (v.correct, f"program: {v.reason}", v.answer, v.reason == "timeout", False,
                        time.perf_counter() - t0)
            except SandboxError as exc:  # the sandbox failed (not the program): run it again
                why = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2 * (attempt + 1))  # a busy service gets a moment
            except Exception as exc:  # noqa: BLE001 - anything else is no verdict either
                why = f"{type(exc).__name__}: {exc}"
        return False, f"grader failed: sandbox: {why}", None, False, True, time.perf_counter() - t0

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
        """(correct, reason, extracted, timed_out, grader_failed, seconds) per rollout."""
        if self.mode == "pot":
            return self._pot_verdicts(rollouts)
        pairs = [(r.completion, r.problem.answer) for r in rollouts]
        if self._grade_many is None:
            out = []
            for c, g in pairs:
                t0 = time.perf_counter()
                out.append((*fallback_grade(c, g), False, False, time.perf_counter() - t0))
            return out
        verdicts = self._grade_pairs(pairs)
        seconds = [float(getattr(v, "seconds", 0.0)) for v in verdicts]
        for _ in range(REGRADE_ATTEMPTS - 1):  # re-grade what the grader failed on (never cached as a verdict)
            again = [i for i, v in enumerate(verdicts) if isinstance(v, Exception) or getattr(v, "failed", False)]
            if not again:
                break
            for i, v in zip(again, self._grade_pairs([pairs[i] for i in again]), strict=True):
                verdicts[i] = v
                seconds[i] += float(getattr(v, "seconds", 0.0))
        out: list[_Verdict] = []
        for v, s in zip(verdicts, seconds, strict=True):
            if isinstance(v, Exception):
                out.append((False, f"grader failed: {type(v).__name__}: {v}", None, False, True, s))
            elif getattr(v, "failed", False):
                out.append((False, f"grader failed: {v.reason}", v.extracted, False, True, s))
            else:
                out.append((bool(v.correct), str(v.reason), v.extracted, bool(v.timed_out), False, s))
        return out

    def _audit(self, rollouts: Sequence[Rollout], verdicts: list[_Verdict]) -> dict[int, tuple[bool, str]]:
        """{index: (disagrees, second check's reason)} for the audited samples (see the module docstring)."""
        if self.mode == "pot" or self._grade_many is None or self.cfg.audit_fraction <= 0:
            return {}
        chosen = [i for i, (r, v) in enumerate(zip(rollouts, verdicts, strict=True))
                  if not v[3] and not v[4] and audit_selected(r.request_id, r.sample_index, self.cfg.audit_fraction)]
        pairs = [(rollouts[i].completion, rollouts[i].problem.answer) for i in chosen]
        if self.cfg.audit_check == "math_verify":
            second = [math_verify_check(c, g) for c, g in pairs]
        else:
            other = "lenient" if self.cfg.strict else "strict"
            second = []
            for v in self._grade_pairs_in(pairs, other):
                judged = (not isinstance(v, Exception) and not getattr(v, "failed", False)
                          and not getattr(v, "timed_out", False) and v.correct is not None)
                second.append((bool(v.correct) if judged else None,
                               f"{other}: {v.reason if judged else 'no verdict'}"
                               + (f" (extracted {v.extracted!r})" if judged and v.extracted is not None else "")))
        return {i: (ok != verdicts[i][0], why) for i, (ok, why) in zip(chosen, second, strict=True) if ok is not None}

    def _grade_pairs_in(self, pairs: list[tuple[str, str]], mode: str) -> list:
        """``_grade_pairs`` in extraction ``mode`` (the audit's other mode)."""
        try:
            return list(self._grade_many(pairs, mode=mode))
        except Exception as exc:  # noqa: BLE001 - an audit that cannot run audits nothing
            return [exc] * len(pairs)

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        """One result per rollout, in order: ``correct_reward`` / ``incorrect_reward``, minus ``format_penalty``
        when no final answer could be extracted."""
        start = time.perf_counter()
        for rollout in rollouts:
            check_schema(rollout)
        results = []
        verdicts = self._verdicts(rollouts)
        graded_s = time.perf_counter() - start
        audit = self._audit(rollouts, verdicts)
        for i, (rollout, (correct, reason, extracted, timed_out, failed, seconds)) in enumerate(
                zip(rollouts, verdicts, strict=True)):
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
                grader_seconds=float(seconds),
                audited=i in audit,
                audit_disagrees=audit.get(i, (False, ""))[0],
                audit_reason=audit.get(i, (False, ""))[1],
            ))
        self.scored += len(results)
        self.seconds += graded_s
        self.audited += len(audit)
        self.audit_disagreements += sum(d for d, _ in audit.values())
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "grader": self.grader_name, "scored": self.scored,
                "grader_failures": self.grader_failures, "seconds": round(self.seconds, 4),
                "audited": self.audited, "audit_disagreements": self.audit_disagreements}


def reward_worker_actor_class(num_cpus: float = 0.5):
    import ray

    return ray.remote(num_cpus=num_cpus)(RewardWorker)
