"""GradingPool: deadlines, pathological inputs, dead workers, threads, leaks, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from dsmath.grading import GradingPool, grade_batch

DEADLINE_S = 1.0
SLACK_S = 3.0  # queueing and pipe overhead on a loaded 2-core machine; far below "hangs"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture(scope="module")
def pool():
    with GradingPool(1, timeout_s=DEADLINE_S) as p:
        p.symbolic_equal("1", "1")  # start the worker outside the timed tests
        yield p


NESTED_PARENS = "(" * 50 + "x+1" + ")" * 50
NESTED_FRACS = "\\frac{1}{" * 50 + "2" + "}" * 50
PATHOLOGICAL = [
    ("\\boxed{10^{10^{10}}}", "1"),
    ("\\boxed{" + NESTED_PARENS + "}", "2"),
    ("\\boxed{" + NESTED_FRACS + "}", "1"),
    ("x " * 500_000 + "\\boxed{7}", "8"),  # 1 MB completion
    ("\\boxed{" + "x+" * 500_000 + "1}", "2"),  # 1 MB answer
    ("\\boxed{\\frac{1}{}", "1"), ("\\boxed{}{}", "1"), ("\\boxed{\\sqrt}", "1"), ("\\boxed{x^^2}", "1"),
    ("\\boxed{\\begin{pmatrix}}", "1"), ("\\boxed{)(}", "1"), ("\\boxed{\\unknowncommand{3}}", "3x"),
    ("\\boxed{" + "9" * 5000 + "}", "1"), ("\\boxed{1e999999}", "1"), ("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "3"),
]


@pytest.mark.parametrize("completion, gold", PATHOLOGICAL, ids=[f"case{i}" for i in range(len(PATHOLOGICAL))])
def test_pathological_inputs_return_within_deadline(pool, completion, gold):
    t0 = time.monotonic()
    v = pool.grade(completion, gold)
    elapsed = time.monotonic() - t0
    assert elapsed < DEADLINE_S + SLACK_S, (elapsed, v)
    assert v.correct is False
    assert v.timed_out or v.reason


def test_timeout_is_a_counted_verdict_and_the_worker_is_replaced():
    with GradingPool(1, timeout_s=DEADLINE_S) as p:
        v = p.grade("\\boxed{10^{10^{10}}+1}", "10^{10^{10}}")
        assert v.timed_out and not v.correct and "did not finish" in v.reason and v.path == "symbolic"
        assert p.stats()["timeouts"] == 1 and p.stats()["worker_restarts"] == 1
        again = p.grade("\\boxed{10^{10^{10}}+1}", "10^{10^{10}}")  # cached: no second 1 s burn
        assert again.timed_out and again.path == "cache" and again.seconds < 0.5
        ok = p.grade("\\boxed{\\sqrt{12}}", "2\\sqrt3")  # the replacement worker answers
        assert ok.correct and ok.path == "symbolic"
        assert p.stats()["timeouts"] == 1


def test_a_killed_worker_is_replaced():
    with GradingPool(1, timeout_s=5.0) as p:
        assert p.symbolic_equal("\\sqrt{8}", "2\\sqrt{2}")[0]
        (pid,) = p.worker_pids()
        os.kill(pid, signal.SIGKILL)
        v = p.grade("\\boxed{\\sqrt{18}}", "3\\sqrt{2}")
        assert v.correct and not v.timed_out
        (new_pid,) = p.worker_pids()
        assert new_pid != pid
        s = p.stats()
        assert s["worker_deaths"] == 1 and s["worker_restarts"] == 1


def test_many_threads_share_one_pool():
    pairs = [(f"\\boxed{{{k}\\sqrt{{2}}}}", f"\\sqrt{{{2 * k * k}}}") for k in range(1, 6)]
    pairs += [(f"\\boxed{{{k}}}", f"{k + (k % 2)}") for k in range(20)]
    expected = [True] * 5 + [k % 2 == 0 for k in range(20)]
    results: list = [None] * 4
    with GradingPool(2, timeout_s=10.0) as p:
        def work(i: int) -> None:
            results[i] = [v.correct for v in p.grade_many(pairs)]
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stats = p.stats()
    assert results == [expected] * 4
    assert stats["symbolic"] == 5  # each distinct pair went to sympy once; the rest were cache/in-flight hits
    assert stats["cache_hits"] == 15


def test_ten_thousand_gradings_leak_no_processes():
    before = _children()
    pairs = [(f"The answer is {k % 97}.", str(k % 89)) for k in range(9_990)]
    pairs += [(f"\\boxed{{\\sqrt{{{k * k * 2}}}}}", f"{k}\\sqrt2") for k in range(1, 11)]
    with GradingPool(2, timeout_s=10.0) as p:
        verdicts = p.grade_many(pairs)
        during = _children() - before
        assert 1 <= len(during) <= 2
        assert set(p.worker_pids()) == during
    assert len(verdicts) == 10_000
    assert sum(v.correct for v in verdicts) == sum((k % 97) == (k % 89) for k in range(9_990)) + 10
    assert _children() == before


def test_timeouts_and_close_leave_no_processes():
    before = _children()
    with GradingPool(1, timeout_s=0.5) as p:
        verdicts = p.grade_many([("\\boxed{10^{10^{10}}}", str(k)) for k in range(2)])
        assert all(v.timed_out for v in verdicts)
        assert p.stats()["timeouts"] == 2
    assert _children() == before


def test_grade_batch_keeps_order():
    pairs = [("\\boxed{1}", "1"), ("\\boxed{x^2-1}", "(x-1)(x+1)"), ("nothing stated", "3"), ("#### 12", "12.0")]
    verdicts = grade_batch(pairs, workers=2, timeout_s=10.0)
    assert [v.correct for v in verdicts] == [True, True, False, True]
    assert [v.path for v in verdicts] == ["fast", "symbolic", "none", "fast"]


# ------------------------------------------------------------------ CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wiring.cli", "grade", *args], capture_output=True, text=True, timeout=120)


def test_cli_one_pair_explained():
    out = _cli("--pred", "\\frac{\\sqrt{2}}{2}", "--gold", "\\dfrac{1}{\\sqrt2}")
    assert out.returncode == 0, out.stderr
    assert "CORRECT" in out.stdout and "kind: expression" in out.stdout
    wrong = _cli("--pred", "0.5", "--gold", "1/3", "--json")
    assert wrong.returncode == 1
    verdict = json.loads(wrong.stdout)
    assert verdict["correct"] is False and verdict["pred"] == "0.5" and verdict["kind"] == "number"


def test_cli_file_summary_by_kind(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"pred": "0.5", "gold": "\\frac12"}, {"completion": "so it is 3", "gold": "3"},
            {"pred": "[1,2)", "gold": "[1, 2)"}, {"completion": "The answer is $x \\le 3$.", "gold": "(-\\infty,3]"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _cli("--file", str(path), "--mode", "strict", "--json", "--out", str(tmp_path / "v.jsonl"))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["pairs"], summary["correct"]) == (4, 3)
    assert summary["by_kind"]["number"] == {"pairs": 2, "correct": 1, "timed_out": 0, "no_answer": 1}
    assert summary["by_kind"]["interval"]["correct"] == 2
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 4
    text = _cli("--file", str(path), "--mode", "strict")
    assert "3/4 correct" in text.stdout and "interval" in text.stdout


def test_cli_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"pred": "1", "gold": "1"}\n{"pred": "2"}\n')
    out = _cli("--file", str(path))
    assert out.returncode == 2
    assert f"{path}:2" in out.stderr and "gold" in out.stderr and "Traceback" not in out.stderr


def _flaky_command(monkeypatch, failures: int) -> list[int]:
    """Make the next ``failures`` worker starts exit at once (a real process that never says ready).
    Returns [starts so far, failures left]: set the second to 0 to heal the grader."""
    import dsmath.grading.pool as pool_mod

    real, calls = pool_mod._worker_command, [0, failures]

    def command(memory_mb: int) -> list[str]:
        calls[0] += 1
        if calls[1] > 0:
            calls[1] -= 1
            return [sys.executable, "-c", "import sys; sys.exit(3)"]
        return real(memory_mb)

    monkeypatch.setattr(pool_mod, "_worker_command", command)
    return calls


def test_a_worker_that_fails_to_start_is_retried_and_counted(monkeypatch):
    calls = _flaky_command(monkeypatch, failures=1)
    with GradingPool(1, timeout_s=10.0) as p:
        v = p.grade("\\boxed{\\sqrt{12}}", "2\\sqrt3")
        assert v.correct is True and not v.failed and v.path == "symbolic", v.explain()
        s = p.stats()
        assert (s["start_failures"], s["worker_deaths"], s["failures"]) == (1, 1, 0) and calls[0] == 2


def test_a_grader_that_cannot_start_is_a_failure_never_a_cached_false(monkeypatch):
    from dsmath.grading import math_equal
    from dsmath.grading.pool import ATTEMPTS, GradingFailure

    _flaky_command(monkeypatch, failures=ATTEMPTS)
    with GradingPool(1, timeout_s=10.0) as p:
        v = p.grade("\\boxed{\\sqrt{12}}", "2\\sqrt3")
        assert v.failed and v.correct is None and v.path == "failed" and "GRADER FAILED" in v.explain()
        s = p.stats()
        assert (s["failures"], s["start_failures"], s["worker_deaths"], s["cache_size"]) == (1, ATTEMPTS, ATTEMPTS, 0)
        again = p.grade("\\boxed{\\sqrt{12}}", "2\\sqrt3")  # not cached: graded afresh, now by a healthy worker
        assert again.correct is True and again.path == "symbolic"
    _flaky_command(monkeypatch, failures=ATTEMPTS)
    with GradingPool(1, timeout_s=10.0) as p, pytest.raises(GradingFailure):
        math_equal("\\sqrt{12}", "2\\sqrt3", pool=p)


def test_every_worker_death_is_counted_idle_or_busy():
    with GradingPool(1, timeout_s=10.0) as p:
        assert p.symbolic_equal("\\sqrt{8}", "2\\sqrt{2}")[0]
        killed = []
        for _ in range(6):  # killed while idle: noticed and replaced without any job arriving
            deadline = time.monotonic() + 60
            while not p.worker_pids() or p.worker_pids()[0] in killed:
                assert time.monotonic() < deadline, "no replacement worker"
                time.sleep(0.05)
            killed.append(p.worker_pids()[0])
            os.kill(killed[-1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while p.stats()["worker_deaths"] < 6:
            assert time.monotonic() < deadline, p.stats()
            time.sleep(0.05)
        assert p.symbolic_equal("\\sqrt{18}", "3\\sqrt{2}")[0]
        assert p.stats()["worker_deaths"] == 6 and p.stats()["failures"] == 0
