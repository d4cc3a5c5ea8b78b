"""Sample lineage files (wiring/lineage.py) and the ``dsmath samples`` command on them: written from real records
and a real learner batch, read back with pyarrow, the retention rule, the command's output and filters, and its
one-line errors. The files a real ``dsmath train`` writes are read back in tests/test_train_loop.py."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from dsmath.config import LineageConfig
from dsmath.records import Problem, RewardResult, Rollout
from wiring.cli import main
from wiring.lineage import SCHEMA, available_steps, read_step, step_path, write_step_samples
from wiring.steps import build_train_batch


def _samples(step: int) -> SimpleNamespace:
    """Two questions × 2 samples: right, wrong (no answer), a grader timeout, and a reissued right one that the
    audit disagreed on. Rewards 1, 0 / 0, 1: GRPO-style advantages ±1 per group."""
    p1, p2 = Problem("q-1", "1+1?", "2"), Problem("q-2", "2+3?", "5")
    rows = [(p1, "The answer is \\boxed{2}.", (5, 6, 7), True, "2", False, False, False),
            (p1, "I do not know", (8, 9), False, None, False, False, False),
            (p2, "The answer is \\boxed{10^{10^{10}}}.", (5, 6), False, "10^{10^{10}}", True, False, False),
            (p2, "so 5\nThe answer is \\boxed{5}.", (4, 4, 4, 4), True, "5", False, True, True)]
    rollouts, results = [], []
    for i, (prob, text, ids, ok, ext, timed_out, reissued, disagree) in enumerate(rows):
        rid = f"s{step}-{i // 2}-{prob.uid}"
        rollouts.append(Rollout(rid, i % 2, prob, "prompt", (1, 2), text, ids, tuple([-0.5] * len(ids)), "stop",
                                step - 1, f"generator-{i % 2}", reissued=reissued))
        results.append(RewardResult(rid, i % 2, 1.0 if ok else 0.0, ok, "dsmath.grading: why", ext,
                                    timed_out=timed_out, grader_seconds=0.001 * (i + 1), audited=i in (0, 3),
                                    audit_disagrees=disagree, audit_reason="lenient: x" if i in (0, 3) else ""))
    return SimpleNamespace(rollouts=rollouts, results=results)


def _write(run_dir, steps: int, keep: int = 0) -> None:
    for step in range(1, steps + 1):
        s = _samples(step)
        batch = build_train_batch(s.rollouts, [1.0, -1.0, -1.0, 1.0], pad_id=0, max_length=64)
        write_step_samples(run_dir, LineageConfig(keep_full_steps=keep), step, s, batch)


def test_a_step_is_written_and_read_back_with_every_column(tmp_path):
    _write(tmp_path, 1)
    table = pq.read_table(step_path(tmp_path, 1))
    assert table.schema.remove_metadata() == SCHEMA and table.num_rows == 4
    rows, text_kept = read_step(tmp_path, 1)
    assert text_kept
    assert [r["question_id"] for r in rows] == ["q-1", "q-1", "q-2", "q-2"]
    assert [r["verdict"] for r in rows] == ["right", "wrong", "failed", "right"]
    assert [r["advantage"] for r in rows] == [1.0, -1.0, -1.0, 1.0]
    assert [r["prompt_tokens"] for r in rows] == [2] * 4 and [r["completion_tokens"] for r in rows] == [3, 2, 2, 4]
    assert [r["no_answer"] for r in rows] == [False, True, False, False]
    assert [r["reissued"] for r in rows] == [False, False, False, True]
    assert [r["audit_disagrees"] for r in rows] == [False, False, False, True]
    assert rows[1]["extracted"] is None and rows[3]["completion"] == "so 5\nThe answer is \\boxed{5}."
    assert rows[0]["generator_id"] == "generator-0" and rows[0]["weight_version"] == 0
    assert rows[2]["question"] == "2+3?" and rows[2]["gold"] == "5"
    assert rows[2]["grader_seconds"] == pytest.approx(0.003) and rows[2]["timed_out"]


def test_older_steps_keep_every_row_but_lose_their_text_and_a_fresh_run_clears_later_steps(tmp_path):
    _write(tmp_path, 4, keep=2)
    assert available_steps(tmp_path) == [1, 2, 3, 4]
    for step, kept in ((1, False), (2, False), (3, True), (4, True)):
        rows, text_kept = read_step(tmp_path, step)
        assert text_kept is kept and len(rows) == 4
        assert all((r["completion"] != "") is kept for r in rows)
        assert [r["reward"] for r in rows] == [1.0, 0.0, 0.0, 1.0]  # everything else kept
    _write(tmp_path, 1)  # a fresh run in the same folder
    assert available_steps(tmp_path) == [1]


def test_disabled_lineage_writes_nothing(tmp_path):
    s = _samples(1)
    batch = build_train_batch(s.rollouts, [0.0] * 4, pad_id=0, max_length=64)
    assert write_step_samples(tmp_path, LineageConfig(enabled=False), 1, s, batch) is None
    assert available_steps(tmp_path) == []


def test_samples_command_shows_a_step_and_filters(tmp_path, capsys):
    _write(tmp_path, 3, keep=2)
    assert main(["samples", str(tmp_path)]) == 0  # the last step by default
    out = capsys.readouterr().out
    assert f"{tmp_path} step 3: 4 samples, 2 questions, reward mean 0.500 | right 2 wrong 1 failed 1" in out
    assert "no answer 1 | audited 2, disagreed 1 | reissued 1\nshowing 4 of 4 matching" in out
    assert out.count("\n[s3-") == 4 and "  | so 5\n  | The answer is \\boxed{5}." in out
    assert "REISSUED" in out and "AUDIT DISAGREES" in out and "audit: lenient: x" in out

    def shown(*args: str) -> list[str]:
        assert main(["samples", str(tmp_path), *args]) == 0
        return [line.split("]")[0][1:] for line in capsys.readouterr().out.splitlines() if line.startswith("[")]

    assert shown("--step", "2", "--verdict", "wrong") == ["s2-0-q-1#1"]
    assert shown("--step", "2", "--verdict", "failed") == ["s2-1-q-2#0"]
    assert shown("--step", "2", "--min-reward", "0.5") == ["s2-0-q-1#0", "s2-1-q-2#1"]
    assert shown("--step", "2", "--question", "q-2", "--limit", "1") == ["s2-1-q-2#0"]
    assert shown("--step", "2", "--disagreements") == ["s2-1-q-2#1"]
    assert shown("--step", "2", "--question", "nope") == []
    assert main(["samples", str(tmp_path), "--step", "1"]) == 0
    assert "completion text dropped" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--step", "9"], "no samples of step 9 (steps written: 1..2)"),
    (["--limit", "-1"], "--limit must be >= 0"),
])
def test_samples_command_mistakes_are_one_line(tmp_path, capsys, args, message):
    _write(tmp_path, 2)
    assert main(["samples", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(message) and err.count("\n") == 1


def test_samples_command_on_a_run_without_lineage(tmp_path, capsys):
    assert main(["samples", str(tmp_path)]) == 2
    assert "no samples/ files" in capsys.readouterr().err
    assert main(["samples", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("reward.audit_fraction=1.5", "reward.audit_fraction: must be in [0, 1]"),
    ("lineage.keep_full_steps=-1", "lineage.keep_full_steps: must be >= 0"),
    ("reward.audit_check=coin", "reward.audit_check"),
])
def test_lineage_and_audit_settings_are_validated(override, message):
    from dsmath.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("[", "\\[").replace("]", "\\]")):
        load_config("tiny_cpu", [override])
