"""Load balancing over several actors: generators (a prompt stream) and reward workers (rollout chunks).

Both pools pick the actor with the fewest outstanding items (ties: round robin) and return Ray futures, so the
driver can overlap generation and scoring: ``ray.wait`` on the generation futures, hand each finished chunk to
``RewardPool.submit`` at once.

Guaranteed: every submitted item is sent to exactly one actor; the pool's counters account for every item
(``submitted == completed + outstanding``). Not guaranteed: order of completion across actors.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from dsmath.records import GenerationRequest, RewardResult, Rollout


class _LeastLoaded:
    def __init__(self, actors: Sequence[Any]):
        if not actors:
            raise ValueError("a pool needs at least one actor")
        self.actors = list(actors)
        self.outstanding = [0] * len(self.actors)  # items in flight per actor
        self._futures: dict[Any, tuple[int, int]] = {}  # future -> (actor index, items)
        self._turn = itertools.count()
        self.submitted = 0
        self.completed = 0

    def _pick(self) -> int:
        offset = next(self._turn) % len(self.actors)
        order = [(i + offset) % len(self.actors) for i in range(len(self.actors))]
        return min(order, key=lambda i: self.outstanding[i])

    def _track(self, future: Any, index: int, items: int) -> Any:
        self.outstanding[index] += items
        self.submitted += items
        self._futures[future] = (index, items)
        return future

    def done(self, future: Any) -> None:
        """Mark ``future`` finished (call after ``ray.get``/``ray.wait`` saw it ready)."""
        index, items = self._futures.pop(future)
        self.outstanding[index] -= items
        self.completed += items

    def pending(self) -> list[Any]:
        return list(self._futures)


class GeneratorPool(_LeastLoaded):
    """Generator actors behind one ``submit(requests) -> future of list[Rollout]``."""

    def submit(self, requests: Sequence[GenerationRequest], expected_version: int | None = None) -> Any:
        index = self._pick()
        items = sum(r.sampling.n for r in requests)
        return self._track(self.actors[index].generate.remote(list(requests), expected_version), index, items)


class RewardPool(_LeastLoaded):
    """Reward-worker actors behind one ``submit(rollouts) -> future of list[RewardResult]``."""

    def submit(self, rollouts: Sequence[Rollout]) -> Any:
        index = self._pick()
        return self._track(self.actors[index].score.remote(list(rollouts)), index, len(rollouts))


def stream_rollouts_and_rewards(
    generators: GeneratorPool,
    rewards: RewardPool,
    request_chunks: Sequence[Sequence[GenerationRequest]],
    expected_version: int | None = None,
    timeout_s: float | None = None,
) -> tuple[list[Rollout], list[RewardResult]]:
    """Generate every chunk on the least-loaded generator and score each chunk the moment it returns.

    Returns (rollouts, rewards) in completion order; each rollout has exactly one reward (checked: raises if the
    keys differ). ``timeout_s`` bounds each wait.
    """
    import ray

    gen_futures = [generators.submit(chunk, expected_version) for chunk in request_chunks]
    reward_futures: list[Any] = []
    rollouts: list[Rollout] = []
    while gen_futures:
        ready, gen_futures = ray.wait(gen_futures, num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no generator returned within {timeout_s}s ({len(gen_futures)} chunks pending)")
        for future in ready:
            chunk = ray.get(future)
            generators.done(future)
            rollouts.extend(chunk)
            reward_futures.append(rewards.submit(chunk))
    results: list[RewardResult] = []
    for future in reward_futures:
        results.extend(ray.get(future, timeout=timeout_s))
        rewards.done(future)
    keys_r = sorted((r.request_id, r.sample_index) for r in rollouts)
    keys_s = sorted((r.request_id, r.sample_index) for r in results)
    if keys_r != keys_s:
        raise RuntimeError(f"reward accounting broken: {len(rollouts)} rollouts but {len(results)} rewards")
    return rollouts, results
