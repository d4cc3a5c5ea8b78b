"""``MetricsWriter``: the JSONL curve and the TensorBoard event files it writes, both read back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dsmath.utils.metrics import MetricsWriter, read_metrics


def test_tensorboard_event_files_hold_every_numeric_metric_per_step(tmp_path: Path) -> None:
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path)
    assert writer._tb is not None, "tensorboard is installed: the writer must mirror to it"
    for step in (1, 2, 3):
        writer.write(step, {"reward/mean": 0.25 * step, "train/kl": 0.001 * step, "time/rollout": 2.0 + step,
                            "faults/generator_restarts": step - 1, "accuracy": math.nan, "flag": True, "tag": "x"})
    writer.close()

    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["reward/mean"] == 0.5 and rows[0]["accuracy"] is None

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # NaN, bools and strings are not scalars TensorBoard can plot: they stay out (the JSONL keeps them).
    assert tags == {"reward/mean", "train/kl", "time/rollout", "faults/generator_restarts"}
    reward = acc.Scalars("reward/mean")
    assert [e.step for e in reward] == [1, 2, 3]
    assert [e.value for e in reward] == pytest.approx([0.25, 0.5, 0.75])
    assert [e.value for e in acc.Scalars("faults/generator_restarts")] == [0.0, 1.0, 2.0]
    assert [e.value for e in acc.Scalars("time/rollout")] == pytest.approx([3.0, 4.0, 5.0])


def test_tensorboard_off_writes_only_jsonl(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, {"reward/mean": 1.0})
    writer.close()
    assert not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path) == [{"step": 1, "time": read_metrics(tmp_path)[0]["time"], "reward/mean": 1.0}]
