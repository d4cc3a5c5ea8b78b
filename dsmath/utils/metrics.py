"""Per-step metrics to JSONL (always) and TensorBoard (when the package is importable)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def metrics_row(step: int, metrics: dict) -> dict:
    """One ``metrics.jsonl`` row: ``step``, ``time`` (now), then ``metrics`` with NaN/inf as null."""
    row = {"step": step, "time": time.time()}
    for k, v in metrics.items():
        row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
    return row


def truncate_metrics(path: str | Path, last_step: int, *, saved_rows: list[dict] = ()) -> list[int]:
    """On resume from the checkpoint of ``last_step``: keep the rows of steps up to it in the ``metrics.jsonl`` at
    ``path`` and drop later ones (a killed run may have logged steps it never saved). ``saved_rows``, rows (``step``
    and ``time`` included) that checkpoint carries, fill in the steps up to ``last_step`` that have no row: a run
    killed between saving a checkpoint and logging its rows, or a file fetched from storage before they reached it.
    Replaced atomically; returns the steps it restored."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    keep = [r for r in rows if r["step"] <= last_step]
    have = {r["step"] for r in keep}
    restored = [r for r in saved_rows if r["step"] <= last_step and r["step"] not in have]
    if not lines and not restored:
        return []
    keep = sorted(keep + restored, key=lambda r: r["step"])
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)
    return [r["step"] for r in restored]


class MetricsWriter:
    """Appends one JSON object per step to ``run_dir/metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._fh = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception:  # tensorboard is optional; JSONL is the source of truth
                self._tb = None

    def write(self, step: int, metrics: dict) -> dict:
        """Appends the row (:func:`metrics_row`) and returns it as written."""
        row = metrics_row(step, metrics)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return row

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
