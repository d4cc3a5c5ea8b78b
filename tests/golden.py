"""The golden run: learning is pinned by `make run` itself.

The suite runs README's ``make run`` block (the default preset: its 1,500-step SFT bootstrap, built in the test's
fresh ``$HOME``) shrunk through ``DSMATH_OVERRIDES`` to 12 of its 40 steps, with 200 held-out problems and no
checkpoint (:data:`GOLDEN`). ``tests/test_golden.py`` runs that block and checks two things on the run's files:

- the golden curve: held-out greedy accuracy after the 12 steps is at least :data:`MARGIN` above before
  (measured here: 28.0 % -> 84.5 %);
- the recorded trace (``tests/data/golden_trace.json``, recorded on the code before the wiring layer was
  restructured): per-step samples, rewards and losses equal step for step. Samples are fingerprinted through the
  step's reward and length statistics (a different sample changes them), losses compared to 1e-5 relative.

Re-record only for a deliberate change of behaviour, and say why in the commit:
``DSMATH_RECORD_GOLDEN=1 pytest tests/test_golden.py``. A different CPU or torch build can change
the trace's floats (the tiny bootstrap is trained here, in float32); the recording names both.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

TRACE = Path(__file__).parent / "data" / "golden_trace.json"
GOLDEN = ["eval_size=200", "steps=12", "checkpoint_every=0"]
MARGIN = 0.25  # held-out greedy accuracy after the 12 steps must be at least this much above before
EXACT = ("step", "reward/mean", "reward/std", "accuracy", "zero_std_groups", "response_length/mean",
         "response_length/max", "samples_trained", "weight_version")
CLOSE = ("train/loss", "train/kl", "train/grad_norm", "train/entropy", "train/pg_loss")


def check_curve(summary: dict) -> str:
    """Fails unless held-out accuracy rose by :data:`MARGIN`; returns the line that says by how much."""
    before, after = summary["heldout_accuracy_before"], summary["heldout_accuracy_after"]
    assert summary["steps"] == 12 and summary["heldout_size"] == 200, summary
    assert after >= before + MARGIN, f"held-out accuracy {before:.1%} -> {after:.1%}: less than +{MARGIN:.0%}"
    return f"golden curve: held-out {before:.1%} -> {after:.1%} after {summary['steps']} steps"


def check_trace(summary: dict, rows: list[dict]) -> bool:
    """Fails naming the step and key where the run leaves the recorded trace. With ``DSMATH_RECORD_GOLDEN=1`` it
    records this run instead and returns True (the caller skips)."""
    got = {"machine": _machine(), "heldout_before": summary["heldout_accuracy_before"],
           "heldout_after": summary["heldout_accuracy_after"], "steps": _trace(rows)}
    if os.environ.get("DSMATH_RECORD_GOLDEN") == "1":
        TRACE.parent.mkdir(exist_ok=True)
        TRACE.write_text(json.dumps(got, indent=1) + "\n")
        return True
    want = json.loads(TRACE.read_text())
    assert got["heldout_before"] == want["heldout_before"] and got["heldout_after"] == want["heldout_after"]
    assert len(got["steps"]) == len(want["steps"])
    for g, w in zip(got["steps"], want["steps"]):
        assert set(g) == set(w), (g.keys(), w.keys())
        for k in EXACT:
            if k in w:
                assert g[k] == w[k], f"step {w['step']}: {k} = {g[k]}, recorded {w[k]}"
        for k in CLOSE:
            if k in w:
                assert math.isclose(g[k], w[k], rel_tol=1e-5, abs_tol=1e-7), \
                    f"step {w['step']}: {k} = {g[k]!r}, recorded {w[k]!r}"
    return False


def _trace(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in EXACT + CLOSE if k in r} for r in rows]


def _machine() -> dict:
    import torch

    return {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor()}
