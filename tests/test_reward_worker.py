"""The verdict rewards (``rule`` grading, the ``sandbox``: dsmath.rewards) in process, and the least-loaded pool's
accounting (no Ray needed for the bookkeeping)."""

from types import SimpleNamespace

import pytest

from actors.pool import RewardPool
from dsmath.config import RewardConfig
from dsmath.records import Problem, Rollout
from dsmath.rewards.rule import RuleReward
from dsmath.rewards.sandbox import SandboxReward


def rollout(uid, completion, gold, index=0):
    return Rollout(uid, index, Problem(uid, "q", gold), "p", (1,), completion, (2, 3), (-0.1, -0.2), "stop", 0, "g0",
                   (1, 1))


@pytest.mark.parametrize("completion,gold,correct", [
    ("The answer is \\boxed{42}.", "42", True),
    ("The answer is \\boxed{42.0}.", "42", True),
    ("The answer is \\boxed{1,000}.", "1000", True),
    ("The answer is \\boxed{0.5}.", "1/2", True),
    ("The answer is \\boxed{41}.", "42", False),
    ("6 times 7, so we get 42", "42", False),  # strict: no stated answer
])
def test_rule_reward_grades_the_stated_answer(completion, gold, correct):
    reward = RuleReward(RewardConfig(audit_fraction=0.0))
    try:
        (r,) = reward.score([rollout("a", completion, gold)])
    finally:
        reward.close()
    assert r.correct is correct and r.reward == float(correct)


def test_worker_rewards_and_format_penalty_one_result_each():
    cfg = RewardConfig(correct_reward=1.0, incorrect_reward=-0.5, format_penalty=0.25)
    worker = RuleReward(cfg, worker_id="rw")
    rollouts = [rollout("a", "\\boxed{3}", "3"), rollout("a", "\\boxed{4}", "3", 1), rollout("b", "none", "3")]
    try:
        results = worker.score(rollouts)
    finally:
        worker.close()
    assert [(r.request_id, r.sample_index) for r in results] == [("a", 0), ("a", 1), ("b", 0)]
    assert [r.reward for r in results] == [1.0, -0.5, -0.75]
    assert [r.correct for r in results] == [True, False, False]
    assert [r.extracted for r in results] == ["3", "4", None]
    assert all(r.reason.startswith(worker.grader_name + ":") for r in results)
    assert worker.stats()["scored"] == 3


def test_grader_exception_is_a_result_not_a_loss():
    worker = RuleReward(RewardConfig())
    worker.close()

    def broken(pairs, **kw):
        if any(c == "bad" for c, _ in pairs):
            raise ValueError("boom")
        return [SimpleNamespace(correct=c == f"\\boxed{{{g}}}", reason="by hand", extracted=c[7:-1], timed_out=False)
                for c, g in pairs]

    worker._grade_many = broken
    results = worker.score([rollout("a", "\\boxed{3}", "3"), rollout("b", "bad", "3"), rollout("c", "\\boxed{4}", "3")])
    assert [r.request_id for r in results] == ["a", "b", "c"]
    assert [r.correct for r in results] == [True, False, False]
    assert [r.grader_failed for r in results] == [False, True, False]  # an exception is no verdict
    assert "boom" in results[1].reason and "boom" not in results[2].reason and results[1].reward == 0.0
    assert worker.stats()["grader_failures"] == 1


def test_uses_dsmath_grading():
    worker = RuleReward(RewardConfig(timeout_s=5.0))
    try:
        results = worker.score([rollout("a", "The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
                                rollout("b", "The answer is \\boxed{x^2+2x+1}.", "(x+1)^2"),
                                rollout("c", "no answer here", "7")])
    finally:
        worker.close()
    assert worker.grader_name == "dsmath.grading"
    assert [r.correct for r in results] == [True, True, False]
    assert results[2].extracted is None and all(r.reason.startswith("dsmath.grading:") for r in results)


class _FakeMethod:
    def __init__(self, log, index):
        self.log, self.index = log, index

    def remote(self, items):
        self.log.append((self.index, len(items)))
        return object()


class _FakeActor:
    def __init__(self, log, index):
        self.score = _FakeMethod(log, index)


def test_pool_picks_least_loaded_and_accounts_for_every_item():
    log = []
    pool = RewardPool([_FakeActor(log, 0), _FakeActor(log, 1)])
    f1 = pool.submit([rollout("a", "", "1")] * 5)
    f2 = pool.submit([rollout("b", "", "1")] * 1)
    pool.submit([rollout("c", "", "1")] * 2)  # actor 1 holds 1 item, actor 0 holds 5: goes to 1
    assert [i for i, _ in log] == [0, 1, 1]
    assert pool.outstanding == [5, 3] and pool.submitted == 8
    pool.done(f1)
    pool.done(f2)
    assert pool.outstanding == [0, 2] and pool.completed == 6
    assert pool.submitted == pool.completed + sum(pool.outstanding)


def test_program_of_thought_rewards_run_the_program_in_the_sandbox():
    def rollout(i: int, completion: str) -> Rollout:
        return Rollout(request_id="r", sample_index=i, problem=Problem("p", "What is 6*7?", "42"), prompt="",
                       prompt_ids=(1,), completion=completion, completion_ids=(2,), logprobs=(0.0,),
                       finish_reason="stop", weight_version=0, generator_id="g")

    worker = SandboxReward(RewardConfig(timeout_s=1.0))
    try:
        results = worker.score([
            rollout(0, "```python\nprint(6 * 7)\n```"),
            rollout(1, "```python\nprint(6 + 7)\n```"),
            rollout(2, "The answer is \\boxed{42}."),  # no program: PoT mode does not accept a stated answer
            rollout(3, "```python\nwhile True: pass\n```"),
        ])
    finally:
        worker.close()
    assert [r.correct for r in results] == [True, False, False, False]
    assert results[0].reward == 1.0 and results[0].extracted == "42"
    assert "no_program" in results[2].reason
    assert results[3].timed_out and "timeout" in results[3].reason


def test_a_grading_worker_that_fails_to_start_still_gives_the_right_reward(monkeypatch):
    from tests.test_grading_pool import _flaky_command

    _flaky_command(monkeypatch, failures=1)
    worker = RuleReward(RewardConfig(timeout_s=10.0))
    try:
        (r,) = worker.score([rollout("a", "So \\boxed{2\\sqrt{3}}.", "\\sqrt{12}")])
        stats = worker._pool.stats()
    finally:
        worker.close()
    assert r.correct and r.reward == 1.0 and not r.grader_failed, r
    assert stats["start_failures"] == 1 and stats["worker_deaths"] == 1


def test_a_grader_that_keeps_failing_is_flagged_and_regraded_not_scored_wrong(monkeypatch):
    from dsmath.grading.pool import ATTEMPTS
    from dsmath.rewards.base import REGRADE_ATTEMPTS
    from tests.test_grading_pool import _flaky_command

    calls = _flaky_command(monkeypatch, failures=10**6)  # a grader that cannot start at all
    worker = RuleReward(RewardConfig(timeout_s=10.0, incorrect_reward=-1.0))
    try:
        (r,) = worker.score([rollout("a", "So \\boxed{2\\sqrt{3}}.", "\\sqrt{12}")])
        assert r.grader_failed and r.reward == 0.0 and r.reason.startswith("dsmath.grading: grader failed")
        assert calls[0] >= ATTEMPTS * REGRADE_ATTEMPTS  # graded again on fresh workers before giving up
        calls[1] = 0  # the grader heals
        (again,) = worker.score([rollout("a", "So \\boxed{2\\sqrt{3}}.", "\\sqrt{12}")])
        assert again.correct and not again.grader_failed  # the failure was not cached
    finally:
        worker.close()
    assert worker.stats()["grader_failures"] == 1 and worker._pool.stats()["failures"] == REGRADE_ATTEMPTS


def test_the_driver_drops_groups_with_an_ungraded_sample():
    from dataclasses import replace

    from wiring.rollout import drop_ungraded_groups
    from dsmath.records import RewardResult

    ros = [rollout(q, "", "1", i) for q in "abc" for i in range(2)]
    res = [RewardResult(r.request_id, r.sample_index, 1.0, True, "ok") for r in ros]
    res[3] = replace(res[3], grader_failed=True, correct=False, reward=0.0)  # group "b"
    kept_r, kept_s, dropped = drop_ungraded_groups(ros, res, 2)
    assert dropped == 1 and [r.request_id for r in kept_r] == ["a", "a", "c", "c"]
    assert [s.request_id for s in kept_s] == ["a", "a", "c", "c"] and not any(s.grader_failed for s in kept_s)


def test_a_dead_sandbox_is_retried_then_flagged_never_scored_wrong():
    from dsmath.sandbox import SandboxError
    from dsmath.sandbox.result import ExecResult

    class Flaky:
        def __init__(self, failures):
            self.failures, self.calls = failures, 0

        def run(self, code, **kw):
            self.calls += 1
            if self.calls <= self.failures:
                raise SandboxError("sandbox template died during a run")
            return ExecResult("42\n", "", 0, False, False, False, None, 0.01)

    worker = SandboxReward(RewardConfig(timeout_s=1.0))
    worker.close()
    good = "```python\nprint(6 * 7)\n```"
    worker._sandbox = Flaky(failures=1)
    (r,) = worker.score([rollout("a", good, "42")])
    assert r.correct and not r.grader_failed and worker._sandbox.calls == 2
    worker._sandbox = Flaky(failures=99)
    (r,) = worker.score([rollout("a", good, "42")])
    assert r.grader_failed and r.reward == 0.0 and "template died" in r.reason


def test_verifier_audit_with_real_grading_counts_what_a_hand_count_gives():
    """Four samples graded for real (strict), every one selected for the audit (the lenient mode): right in both;
    no stated answer in strict but the right number in lenient (the one disagreement); wrong in both; a grader
    timeout (never audited). Hand count: no-answer 1/4, timeouts 1/4, audited 3, disagreement 1/3."""
    from wiring.steps import verifier_metrics

    worker = RuleReward(RewardConfig(timeout_s=1.0, audit_fraction=1.0, audit_check="other_mode"))
    try:
        results = worker.score([rollout("a", "The answer is \\boxed{42}.", "42"),
                                rollout("b", "6 times 7, so we get 42", "42"),
                                rollout("c", "The answer is \\boxed{41}.", "42"),
                                rollout("d", "The answer is \\boxed{10^{10^{10}}+1}.", "10^{10^{10}}")])
    finally:
        worker.close()
    assert [r.correct for r in results] == [True, False, False, False]
    assert [r.timed_out for r in results] == [False, False, False, True]
    assert [r.no_answer for r in results] == [False, True, False, False]
    assert [r.audited for r in results] == [True, True, True, False]
    assert [r.audit_disagrees for r in results] == [False, True, False, False]
    assert results[1].audit_reason.startswith("lenient:") and "'42'" in results[1].audit_reason
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0]  # the audit never changes a reward
    assert results[3].grader_seconds >= 0.9 and all(0 <= r.grader_seconds < 0.5 for r in results[:3])
    assert worker.stats()["audited"] == 3 and worker.stats()["audit_disagreements"] == 1
    m = verifier_metrics(results)
    assert m["verifier/no_answer_rate"] == 0.25 and m["verifier/timeout_rate"] == 0.25
    assert m["verifier/audited"] == 3 and m["verifier/disagreements"] == 1
    assert m["verifier/disagreement_rate"] == pytest.approx(1 / 3)


def test_audit_sample_is_a_fixed_share_and_off_at_zero():
    from dsmath.rewards.rule import audit_selected

    keys = [(f"step1-{i}-q{i}", j) for i in range(500) for j in range(4)]
    chosen = [k for k in keys if audit_selected(*k, 0.1)]
    assert 0.07 < len(chosen) / len(keys) < 0.13
    assert chosen == [k for k in keys if audit_selected(*k, 0.1)]  # the same samples every time
    assert not any(audit_selected(*k, 0.0) for k in keys) and all(audit_selected(*k, 1.0) for k in keys)
    worker = RuleReward(RewardConfig(audit_fraction=0.0))
    try:
        results = worker.score([rollout("a", "so we get 42", "42")])
    finally:
        worker.close()
    assert not results[0].audited and results[0].no_answer


def test_math_verify_as_the_second_check_flags_what_strict_grading_missed():
    """``reward.audit_check=math_verify`` (on this, the main, thread): it reads the bare final number that strict
    grading refuses, so that sample is the one disagreement; the boxed right and wrong answers agree."""
    pytest.importorskip("math_verify")
    worker = RuleReward(RewardConfig(audit_fraction=1.0, audit_check="math_verify"))
    try:
        results = worker.score([rollout("a", "The answer is \\boxed{42}.", "42"),
                                rollout("b", "6 times 7, so we get 42", "42"),
                                rollout("c", "The answer is \\boxed{41}.", "42")])
    finally:
        worker.close()
    assert [r.correct for r in results] == [True, False, False]
    assert [r.audited for r in results] == [True, True, True]
    assert [r.audit_disagrees for r in results] == [False, True, False]
    assert [r.audit_reason for r in results] == ["math_verify: equal", "math_verify: equal", "math_verify: not equal"]
