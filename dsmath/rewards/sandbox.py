"""The ``sandbox`` reward (program of thought, ``rollout.mode=pot``): the completion's last ```python block runs in
the sandbox (a local pool, or the gRPC service at ``RewardConfig.sandbox_address``) and the last line it prints is
graded against the gold answer (``dsmath.sandbox.pot_reward``; a stated answer without a program earns nothing).

A program that times out or fails is a wrong answer with its reason (``program: timeout``, ``program: error``, ...);
a *sandbox* that fails (``SandboxError``: a template that dies, a full or unreachable service) or any other
exception is no verdict: the program runs again (``REGRADE_ATTEMPTS`` in all), and if the sandbox still fails the
result is ``grader_failed`` (reward 0). Not audited: the verdict is the program's output, with no second reading.
``RewardResult.reason`` starts with ``dsmath.grading`` (the printed line is compared by ``dsmath.grading``).

Guaranteed: the :class:`dsmath.rewards.base.Reward` contract.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from dsmath.records import RewardResult, Rollout, check_schema
from dsmath.rewards.base import REGRADE_ATTEMPTS, Graded, RewardKind, Tally, verdict_results

GRADER = "dsmath.grading"


class SandboxReward:
    """``RewardConfig`` rewards for what the completion's program prints (see the module docstring)."""

    def __init__(self, cfg, *, worker_id: str = "reward-0"):
        """``cfg``: a ``dsmath.config.RewardConfig``."""
        self.cfg = cfg
        self.worker_id = worker_id
        self.grader_name = GRADER
        self._sandbox = None  # the runner, made at the first program
        self.tally = Tally()

    def _run_one(self, rollout: Rollout) -> Graded:
        from dsmath.sandbox import SandboxError, pot_reward, runner_for

        why, t0 = "", time.perf_counter()
        for attempt in range(REGRADE_ATTEMPTS):
            try:
                if self._sandbox is None:
                    self._sandbox = runner_for(self.cfg.sandbox_address)
                v = pot_reward(rollout.completion, rollout.problem.answer, runner=self._sandbox,
                               timeout_s=self.cfg.timeout_s)
                return Graded(v.correct, f"program: {v.reason}", v.answer, v.reason == "timeout", False,
                              time.perf_counter() - t0)
            except SandboxError as exc:  # the sandbox failed (not the program): run it again
                why = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2 * (attempt + 1))  # a busy service gets a moment
            except Exception as exc:  # noqa: BLE001 - anything else is no verdict either
                why = f"{type(exc).__name__}: {exc}"
        return Graded(False, f"grader failed: sandbox: {why}", None, False, True, time.perf_counter() - t0)

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        start = time.perf_counter()
        for rollout in rollouts:
            check_schema(rollout)
        graded = [self._run_one(r) for r in rollouts]
        results = verdict_results(self.cfg, rollouts, graded, self.grader_name, {})
        self.tally.add(results, time.perf_counter() - start)
        return results

    def close(self) -> None:
        """Nothing to release: the local sandbox pool is the process's own (``dsmath.sandbox``), a client holds
        no processes."""

    def stats(self) -> dict[str, Any]:
        return self.tally.as_dict(self.worker_id, self.grader_name)


def check(cfg) -> str | None:
    if cfg.rollout.mode != "pot":
        return (f"reward.kind=sandbox runs the completion's program and rollout.mode={cfg.rollout.mode} completions "
                "state their answer: use rollout.mode=pot, or reward.kind=rule (or auto)")
    return None


KIND = RewardKind(name="sandbox", build=lambda cfg, worker_id: SandboxReward(cfg.reward, worker_id=worker_id),
                  check=check)
