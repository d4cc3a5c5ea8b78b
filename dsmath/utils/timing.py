"""Named, timed stages: the stage names are the metric names (``time/<stage>``)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class StageTimer:
    """Accumulates wall time per stage name for one step; ``pop()`` returns and clears them."""

    def __init__(self) -> None:
        self._times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._times[name] = self._times.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self._times.items()}
        self._times = {}
        return out
