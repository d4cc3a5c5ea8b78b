"""A deterministic, resumable stream of training questions.

The stream is a seeded permutation per epoch; its whole state is one integer (``position``), which
goes into every checkpoint so a resumed run sees exactly the questions an uninterrupted run would.
"""

from __future__ import annotations

import random
from typing import Sequence

from dsmath.records import Problem


class ProblemStream:
    def __init__(self, problems: Sequence[Problem], *, seed: int, position: int = 0) -> None:
        if not problems:
            raise ValueError("the training set is empty")
        self.problems = list(problems)
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._order: list[int] = []

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = list(range(len(self.problems)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def take(self, n: int) -> list[Problem]:
        """The next ``n`` problems; advances ``position`` by ``n``."""
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, len(self.problems))
            out.append(self.problems[self._order_for(epoch)[offset]])
            self.position += 1
        return out
