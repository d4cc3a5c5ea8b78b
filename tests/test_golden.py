"""Learning is pinned on `make run` itself (``tests/golden.py`` says what is checked and how to re-record).

README's ``make run`` block runs here as written, in a fresh copy of the repository and a fresh ``$HOME`` (the
machinery of ``tests/test_docs_commands.py``), with ``DSMATH_OVERRIDES`` cutting the default job to 12 of its 40
steps and 200 held-out problems. It is the one block that file leaves out: its bootstrap alone takes minutes, and in
a file of its own it runs beside the other docs blocks on the second pytest-xdist worker.
"""

from __future__ import annotations

import json

import pytest

import golden
from dsmath.utils.metrics import read_metrics
from test_docs_commands import MAKE_RUN, check_block_ran, fresh_docs_env, kept_dir, run_block

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory):
    yield from fresh_docs_env(tmp_path_factory)


def test_make_run_block_runs_as_written(docs_env) -> None:
    check_block_ran(MAKE_RUN, docs_env)  # fails naming the command's file:line
    _, text = run_block(MAKE_RUN, docs_env)
    assert "held-out greedy accuracy on 200 problems:" in text and "after 12 GRPO steps" in text, text[-3000:]


def test_make_run_is_the_golden_run_held_out_accuracy_rises_by_the_margin(docs_env) -> None:
    """`make run` (the default preset, 12 steps, 200 held-out problems): held-out greedy accuracy rises by at least
    ``golden.MARGIN``."""
    summary = json.loads((_kept(docs_env) / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["heldout_size"] == 200, summary
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    print(f"golden curve: held-out {before:.1%} -> {after:.1%} after 12 steps")
    assert after >= before + golden.MARGIN, f"held-out {before:.1%} -> {after:.1%}: less than +{golden.MARGIN:.0%}"


def test_make_run_is_the_golden_run_samples_rewards_and_losses_equal_the_recorded_trace(docs_env) -> None:
    kept = _kept(docs_env)
    got = golden.as_recorded(json.loads((kept / "summary.json").read_text()), read_metrics(kept))
    if golden.recording():
        golden.record(got)
        pytest.skip(f"recorded {golden.TRACE}")
    want = json.loads(golden.TRACE.read_text())
    reason = golden.other_numerics(want)
    if reason:
        pytest.skip(reason)
    assert golden.trace_differences(got, want) == []


def _kept(docs_env):
    returncode, _ = run_block(MAKE_RUN, docs_env)
    if returncode != 0:
        pytest.fail("the `make run` block failed (test_make_run_block_runs_as_written says where)", pytrace=False)
    return kept_dir(MAKE_RUN, docs_env[0]) / "runs" / "tiny_cpu"
