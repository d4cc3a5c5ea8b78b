"""The golden run: learning is pinned by `make run` itself.

The suite runs README's ``make run`` block (the default preset: its 1,500-step SFT bootstrap, built in the test's
fresh ``$HOME``) shrunk through ``DSMATH_OVERRIDES`` to 12 of its 40 steps, with 200 held-out problems and no
checkpoint (:data:`GOLDEN`). ``tests/test_golden.py`` runs that block and checks two things on the run's files:

- the golden curve: held-out greedy accuracy after the 12 steps is at least :data:`MARGIN` above before
  (measured on 2026-12-05 with ``dsmath.env.same_numbers_env``: 18.5 % -> 96.0 %);
- the recorded trace (``tests/data/golden_trace.json``; first recorded on the code before the wiring layer was
  restructured, re-recorded when the CPU stack's fp32 code path was pinned): per-step samples, rewards and losses
  equal step for step. Samples are fingerprinted through the step's reward and length statistics (a different
  sample changes them), losses compared to 1e-5 relative.

Re-record only for a deliberate change of behaviour, and say why in the commit:
``DSMATH_RECORD_GOLDEN=1 pytest tests/test_golden.py``. A different CPU or torch build can change
the trace's floats (the tiny bootstrap is trained here, in float32), though ``dsmath.env.same_numbers_env`` pins
one code path on every x86 CPU. The recording names the torch build and the bits a few fp32 kernels return
(:func:`numerics_fingerprint`); where they differ the trace is not compared (the test is skipped saying so) and
the golden curve still is.
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


def recording() -> bool:
    """``DSMATH_RECORD_GOLDEN=1``: the run is recorded as the new trace instead of compared."""
    return os.environ.get("DSMATH_RECORD_GOLDEN") == "1"


def as_recorded(summary: dict, rows: list[dict]) -> dict:
    """The run in the trace file's shape: the machine, held-out accuracy before and after, each step's figures."""
    return {"machine": _machine(), "heldout_before": summary["heldout_accuracy_before"],
            "heldout_after": summary["heldout_accuracy_after"], "steps": _trace(rows)}


def record(got: dict) -> None:
    TRACE.parent.mkdir(exist_ok=True)
    TRACE.write_text(json.dumps(got, indent=1) + "\n")


def trace_differences(got: dict, want: dict) -> list[str]:
    """Where ``got`` leaves the recorded trace ``want``, one line each (step, key, both values); [] when equal:
    held-out accuracies and :data:`EXACT` keys exactly, :data:`CLOSE` keys to 1e-5 relative."""
    out = [f"held-out {k}: {got[k]} recorded {want[k]}" for k in ("heldout_before", "heldout_after")
           if got[k] != want[k]]
    if len(got["steps"]) != len(want["steps"]):
        return out + [f"{len(got['steps'])} steps, recorded {len(want['steps'])}"]
    for g, w in zip(got["steps"], want["steps"]):
        if set(g) != set(w):
            out.append(f"step {w['step']}: keys {sorted(g)}, recorded {sorted(w)}")
            continue
        out += [f"step {w['step']}: {k} = {g[k]!r}, recorded {w[k]!r}" for k in EXACT if k in w and g[k] != w[k]]
        out += [f"step {w['step']}: {k} = {g[k]!r}, recorded {w[k]!r}" for k in CLOSE
                if k in w and not math.isclose(g[k], w[k], rel_tol=1e-5, abs_tol=1e-7)]
    return out


def _trace(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in EXACT + CLOSE if k in r} for r in rows]


def _machine() -> dict:
    import torch

    return {"torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "numerics": numerics_fingerprint()}


def other_numerics(want: dict) -> str | None:
    """Why the trace ``want`` cannot be compared on this machine (another torch build or fingerprint), or None."""
    import torch

    here = {"torch": torch.__version__, "numerics": numerics_fingerprint()}
    there = {k: want["machine"].get(k) for k in here}
    if here == there:
        return None
    return f"the trace was recorded where fp32 kernels compute other bits ({there}; here {here})"


def numerics_fingerprint() -> str:
    """12 hex digits of the bits that matmuls, a softmax, an RMS norm, SiLU and their backward pass return, in a
    fresh process with this one's environment (the code path the libraries pick is fixed when they load)."""
    import subprocess
    import sys

    code = """
import hashlib, torch
g = torch.Generator().manual_seed(0)
x = torch.randn(37, 96, generator=g, requires_grad=True)
w1, w2 = torch.randn(96, 288, generator=g) / 10, torch.randn(288, 512, generator=g) / 10
h = torch.nn.functional.silu(x @ w1)
h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
logp = torch.log_softmax(h @ w2, dim=-1)
logp[:, 7].sum().backward()
print(hashlib.sha256(logp.detach().numpy().tobytes() + x.grad.numpy().tobytes()).hexdigest()[:12])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.split()[-1]
