"""Load balancing over several actors: generators (a prompt stream) and reward workers (rollout chunks).

Both pools pick the actor with the fewest outstanding items (ties: round robin) and return Ray futures, so the
driver can overlap generation and scoring: ``ray.wait`` on the generation futures, hand each finished chunk to
``RewardPool.submit`` at once.

Fault tolerance: give a pool a ``factory(index) -> actor`` and a future that failed because its actor died
(``ray.exceptions.RayActorError``) can be handed to :meth:`reissue`: the dead actor is replaced (once, however
many of its futures fail) and the same payload is submitted again. The learner is never involved.

Guaranteed: every submitted item is sent to exactly one live actor at a time; the pool's counters account for
every item (``submitted == completed + outstanding + reissued``), and a reissued payload is the identical
request list (same ids, same sampling seed), so a replacement produces the samples the dead actor owed — none
twice, none lost. Every record a reissued payload produced carries ``reissued=True`` (``Rollout`` or
``RewardResult``), so the sample's lineage says so. Not guaranteed: order of completion across actors.
"""

from __future__ import annotations

import itertools
from dataclasses import replace as dataclasses_replace
from typing import Any, Callable, Sequence

from dsmath.records import GenerationRequest, RewardResult, Rollout


class ActorRestartLimit(RuntimeError):
    """More actor deaths than ``max_restarts``: something is systematically wrong (OOM, a bad node)."""


class _LeastLoaded:
    role = "actor"

    def __init__(self, actors: Sequence[Any], factory: Callable[[int], Any] | None = None, max_restarts: int = 3):
        if not actors:
            raise ValueError("a pool needs at least one actor")
        self.actors = list(actors)
        self.outstanding = [0] * len(self.actors)  # items in flight per actor
        # future -> (actor index, items, the actor handle it went to, payload to reissue)
        self._futures: dict[Any, tuple[int, int, Any, tuple]] = {}
        self._turn = itertools.count()
        self.submitted = 0
        self.completed = 0
        self.factory = factory
        self.max_restarts = max_restarts
        self.restarts = 0
        self.reissued = 0  # items submitted again after their actor died
        self._reissued_futures: set[Any] = set()  # futures of reissued payloads: their records get reissued=True

    def _pick(self) -> int:
        offset = next(self._turn) % len(self.actors)
        order = [(i + offset) % len(self.actors) for i in range(len(self.actors))]
        return min(order, key=lambda i: self.outstanding[i])

    def _track(self, future: Any, index: int, items: int, payload: tuple = ()) -> Any:
        self.outstanding[index] += items
        self.submitted += items
        self._futures[future] = (index, items, self.actors[index], payload)
        return future

    def done(self, future: Any) -> None:
        """Mark ``future`` finished (call after ``ray.get``/``ray.wait`` saw it ready)."""
        index, items, _, _ = self._futures.pop(future)
        self.outstanding[index] -= items
        self.completed += items
        self._reissued_futures.discard(future)

    def was_reissued(self, future: Any) -> bool:
        """Whether ``future`` is the resubmission of a payload whose first actor died (ask before :meth:`done`)."""
        return future in self._reissued_futures

    def _submit(self, *payload) -> Any:
        raise NotImplementedError

    def replace_dead(self, probe: str = "ping", timeout_s: float = 30.0) -> list[int]:
        """Call ``probe`` on every actor; replace those that died (or do not answer within ``timeout_s``).
        Returns the replaced indices. For failures outside a submitted task (e.g. during a weight sync)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        replaced = []
        for index, actor in enumerate(list(self.actors)):
            try:
                ray.get(getattr(actor, probe).remote(), timeout=timeout_s)
                continue
            except (RayActorError, GetTimeoutError) as exc:
                error = exc
            if self.factory is None:
                raise error
            if self.restarts >= self.max_restarts:
                raise ActorRestartLimit(f"{self.role} {index} died and the pool already restarted {self.restarts} "
                                        f"actors (max_restarts={self.max_restarts}): {error}") from error
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.actors[index] = self.factory(index)
            self.restarts += 1
            replaced.append(index)
        return replaced

    def reissue(self, future: Any, error: BaseException) -> Any:
        """``future`` failed with ``error`` because its actor died: replace that actor (if not done already for
        this death) and submit the same payload again. Returns the new future. Raises ``error`` when the pool
        has no factory, and :class:`ActorRestartLimit` past ``max_restarts``."""
        index, items, handle, payload = self._futures.pop(future)
        self.outstanding[index] -= items
        self.submitted -= items  # the resubmission counts it again
        if self.factory is None:
            raise error
        if self.actors[index] is handle:  # the first failed future of this death replaces the actor
            if self.restarts >= self.max_restarts:
                raise ActorRestartLimit(
                    f"{self.role} {index} died and the pool already restarted {self.restarts} actors "
                    f"(max_restarts={self.max_restarts}): {error}") from error
            import ray

            try:
                ray.kill(handle, no_restart=True)  # it may be hung rather than dead
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.actors[index] = self.factory(index)
            self.restarts += 1
        self.reissued += items
        self._reissued_futures.discard(future)
        again = self._submit(*payload)
        self._reissued_futures.add(again)
        return again

    def pending(self) -> list[Any]:
        return list(self._futures)


class GeneratorPool(_LeastLoaded):
    """Generator actors behind one ``submit(requests) -> future of list[Rollout]``."""

    role = "generator"

    def submit(self, requests: Sequence[GenerationRequest], expected_version: int | None = None) -> Any:
        index = self._pick()
        items = sum(r.sampling.n for r in requests)
        requests = list(requests)
        return self._track(self.actors[index].generate.remote(requests, expected_version), index, items,
                           (requests, expected_version))

    _submit = submit


class RewardPool(_LeastLoaded):
    """Reward-worker actors behind one ``submit(rollouts) -> future of list[RewardResult]``."""

    role = "reward worker"

    def submit(self, rollouts: Sequence[Rollout]) -> Any:
        index = self._pick()
        rollouts = list(rollouts)
        return self._track(self.actors[index].score.remote(rollouts), index, len(rollouts), (rollouts,))

    _submit = submit


def drain(pool: _LeastLoaded, futures: Sequence[Any], on_result: Callable[[Any], None],
          timeout_s: float | None = None) -> None:
    """Wait for ``futures`` of ``pool`` and hand each result to ``on_result`` as it arrives.

    A future whose actor died is reissued through :meth:`_LeastLoaded.reissue` (replacement actor, same payload)
    and waited for in turn; any other task error is raised. ``timeout_s`` bounds each wait (a hung actor raises
    ``TimeoutError`` naming the pool's role rather than blocking the run forever).
    """
    import ray
    from ray.exceptions import RayActorError

    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no {pool.role} answered within {timeout_s:.0f} s ({len(pending)} tasks pending)")
        for future in ready:
            try:
                result = ray.get(future)
            except RayActorError as exc:
                pending.append(pool.reissue(future, exc))
                continue
            if pool.was_reissued(future):  # the records say so (sample lineage)
                result = [dataclasses_replace(r, reissued=True) for r in result]
            pool.done(future)
            on_result(result)


def stream_rollouts_and_rewards(
    generators: GeneratorPool,
    rewards: RewardPool,
    request_chunks: Sequence[Sequence[GenerationRequest]],
    expected_version: int | None = None,
    timeout_s: float | None = None,
) -> tuple[list[Rollout], list[RewardResult]]:
    """Generate every chunk on the least-loaded generator and score each chunk the moment it returns.

    Returns (rollouts, rewards) in completion order; each rollout has exactly one reward (checked: raises if the
    keys differ). ``timeout_s`` bounds each wait. Dead actors are replaced when the pools have factories.
    """
    rollouts: list[Rollout] = []
    reward_futures: list[Any] = []

    def scored_on_arrival(chunk: list[Rollout]) -> None:
        rollouts.extend(chunk)
        reward_futures.append(rewards.submit(chunk))

    drain(generators, [generators.submit(chunk, expected_version) for chunk in request_chunks], scored_on_arrival,
          timeout_s)
    results: list[RewardResult] = []
    drain(rewards, reward_futures, results.extend, timeout_s)
    check_one_reward_each(rollouts, results)
    return rollouts, results


def check_one_reward_each(rollouts: Sequence[Rollout], results: Sequence[RewardResult]) -> None:
    """Raise unless every rollout key (request_id, sample_index) is unique and has exactly one reward."""
    keys_r = [(r.request_id, r.sample_index) for r in rollouts]
    keys_s = [(r.request_id, r.sample_index) for r in results]
    if len(set(keys_r)) != len(keys_r) or sorted(keys_r) != sorted(keys_s):
        raise RuntimeError(f"sample accounting broken: {len(rollouts)} rollouts ({len(set(keys_r))} distinct) "
                           f"but {len(results)} rewards")
