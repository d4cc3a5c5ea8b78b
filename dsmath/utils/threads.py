"""torch's intra-op thread count for a long compute-bound loop in one process, chosen by timing the loop itself.

Why measure instead of fixing a count: on 2 idle cores the bootstrap's SFT step (the default preset, batch 32 x ~95
tokens) runs 1.7x faster with 2 threads than with 1, but next to one other busy process 2 threads run it 2.7-3.7x
slower than 1 and burn 3-4x its CPU time (each parallel region waits, spinning, for the thread the other process
pushed off its core; measured on the 2-core machine, 2026-12-05). Which case holds is only known while the loop
runs, and it changes: so more threads are kept only while each step stays faster than one thread was, and two
slower steps in a row drop back to one thread until the next trial.

What is guaranteed: the count changes speed only, never the numbers, on the CPU path this is used on: torch's
CPU kernels here split work across threads without changing any reduction order (``tests/test_threads.py``
trains the same steps at 1 and 2 threads and compares the weights bit for bit; a full default bootstrap at 2
threads gave a model file byte-identical to the 1-thread one). What is not: that this holds for other BLAS
builds; the test is what says so on a machine.

Usage::

    tuner = ThreadTuner()
    for step in range(n):
        with tuner.step(work=batch_tokens):
            train_step(...)
    tuner.restore()
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class ThreadTuner:
    """Every ``every`` steps, times ``trial`` steps at each candidate count (1 and the usable cores, at most
    ``max_threads``; or ``choices``) and keeps the one with the lowest median seconds per unit of work. Step 0
    (allocation, first-call overheads) is never timed. With one candidate it only sets that count. Until the first
    trial ends it runs the smallest count. While a larger count is kept, ``patience`` steps in a row slower per unit
    of work than the smallest count's median in the trial mean another process took a core: it runs the smallest
    count until the next trial."""

    def __init__(self, *, choices: tuple[int, ...] | None = None, max_threads: int = 4, every: int = 200,
                 trial: int = 4, patience: int = 2) -> None:
        import torch

        self._torch = torch
        self.original = torch.get_num_threads()
        self.choices = tuple(sorted(set(choices or (1, max(1, min(usable_cores(), max_threads))))))
        self.every, self.trial, self.patience = every, trial, patience
        self.current = self.choices[0]
        self._fewest: float | None = None  # the smallest count's median seconds per unit of work in the last trial
        self._slow = 0  # steps in a row at a larger count that ran slower than that
        self.steps = 0
        self._plan: list[int] = []
        self._times: dict[int, list[float]] = {}
        self.history: list[tuple[int, int]] = []  # (step, count chosen) each time a trial ends or slow steps drop it

    @contextmanager
    def step(self, work: float = 1.0) -> Iterator[int]:
        """Runs one step of the loop (the ``with`` body) at the count chosen for it; yields that count."""
        if len(self.choices) > 1 and self.steps % self.every == 1:
            self._plan = [c for c in self.choices for _ in range(self.trial)]
            self._times = {c: [] for c in self.choices}
        trying = self._plan.pop(0) if self._plan else None
        threads = trying or self.current
        if threads != self._torch.get_num_threads():  # only on a change: a vLLM engine in this process makes
            self._torch.set_num_threads(threads)      # set_num_threads a no-op that logs a warning each call
        start = time.perf_counter()
        yield threads
        per_work = (time.perf_counter() - start) / max(work, 1e-9)
        self.steps += 1
        if trying is not None:
            self._times[trying].append(per_work)
            if not self._plan:
                self.current = min(self._times, key=lambda c: (statistics.median(self._times[c]), c))
                self._fewest, self._slow = statistics.median(self._times[self.choices[0]]), 0
                self.history.append((self.steps, self.current))
        elif threads > self.choices[0] and self._fewest is not None:
            self._slow = self._slow + 1 if per_work > self._fewest else 0
            if self._slow >= self.patience:  # another process took a core: more threads now only wait on it
                self.current, self._slow = self.choices[0], 0
                self.history.append((self.steps, self.current))

    def restore(self) -> None:
        """Puts back the count the process had before."""
        self._torch.set_num_threads(self.original)
