"""Where a step's samples come from: one interface, three producers.

* :class:`SyncProducer` — exactly on-policy: the step samples at the learner's version, and after the update
  every generator is brought to the new version (``weight_sync``).
* :class:`AsyncProducer` — one step ahead (``async.enabled``): at the top of step k the generators (idle) are
  synced, then step k+1's rollout runs in a thread while the learner trains on step k, so every sample is
  exactly one version behind (IS-corrected in the loss).
* :class:`OfflineProducer` — the offline pool (``rft``, ``dpo``, ``algorithm.sampling=offline``): every step's samples
  were drawn once, from the starting policy, before the loop; generators are still synced after each update
  (the evaluations sample from them).

The driver calls, per step: ``samples = producer.take(step)``, then after the update ``producer.after_update()``;
``producer.ready_for_eval()`` before an in-training evaluation and ``producer.finish()`` after the last step.
Each returns the weight-sync stats of a sync it made (or None), and times its own stages on the driver's
``StageTimer`` (``rollout``/``reward``, ``rollout_wait``, ``weight_sync``).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

from wiring.rollout import StepSamples, sample_step


class SyncProducer:
    """Sample at the learner's version; sync every generator after each update."""

    def __init__(self, sample: Callable[[int, int], StepSamples], sync: Callable[[], Any]) -> None:
        self._sample, self._sync = sample, sync  # sample(step, generator version), sync() -> stats
        self.gen_version = 0  # the version the generators hold (set by the driver)
        self.health_at_top = False  # generator health is probed after the step's checkpoint

    def take(self, step: int) -> StepSamples:
        return self._sample(step, self.gen_version)

    def after_update(self) -> Any:
        return self._sync()

    def ready_for_eval(self) -> None:
        """Synchronous generators already hold the learner's weights."""

    def finish(self) -> None:
        """Nothing in flight."""

    def close(self) -> None:
        """Nothing to stop."""


class AsyncProducer(SyncProducer):
    """Step k+1's rollout overlaps step k's update; generators are synced at the top of each step, while idle."""

    def __init__(self, sample: Callable[[int, int], StepSamples], sync: Callable[[], Any], *, last_step: int,
                 behind: Callable[[], bool], on_top: Callable[[], None]) -> None:
        super().__init__(sample, sync)
        self._last, self._behind, self._on_top = last_step, behind, on_top
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsmath-rollout")
        self._next: Future | None = None
        self.health_at_top = True
        self.sync_stats: Any = None  # the sync made at the top of the current step (None if none)

    def take(self, step: int) -> StepSamples:
        if self._next is not None:
            with self.timer.stage("rollout_wait"):  # the part of the prefetch the update did not hide
                samples = self._next.result()
            self._next = None
        else:
            samples = self._sample(step, self.gen_version)
        # The generators are idle now: bring them up to date, then let them sample step + 1.
        self.sync_stats = self._sync() if self._behind() else None
        self._on_top()
        if step < self._last:
            self._next = self._pool.submit(self._sample, step + 1, self.gen_version)
        return samples

    def after_update(self) -> Any:
        return self.sync_stats

    def ready_for_eval(self) -> None:
        """Let the prefetch finish (its result is kept), then sync: the evaluation samples the current weights."""
        if self._next is not None:
            self._next.result()
        self._sync()

    def finish(self) -> None:
        if self._behind():
            self._sync()  # the final weights, for the evaluation after RL

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class OfflineProducer(SyncProducer):
    """The pool drawn before the loop hands out each step's samples once."""

    def __init__(self, pool, stream, sync: Callable[[], Any]) -> None:
        super().__init__(lambda step, version: StepSamples(*pool.take(step), {}, stream.position, version), sync)


def make_producer(kind: str, *, cfg, gen_pool, reward_pool, stream, prompt_mode: str, chunk: int, timer,
                  sync: Callable[[], Any], behind: Callable[[], bool], on_top: Callable[[], None],
                  fault_hook=None, offline_pool=None) -> SyncProducer:
    """The producer for ``kind`` (``sync`` | ``async`` | ``offline``) over the run's pools and question stream."""

    def sample(step: int, version: int) -> StepSamples:
        hook = (lambda event: fault_hook(event, step, gen_pool, reward_pool)) if fault_hook else None
        return sample_step(cfg, gen_pool, reward_pool, stream, prompt_mode, step=step, version=version, chunk=chunk,
                           num_ranks=cfg.learner.num_ranks, on_event=hook)

    if kind == "offline":
        producer: SyncProducer = OfflineProducer(offline_pool, stream, sync)
    elif kind == "async":
        producer = AsyncProducer(sample, sync, last_step=cfg.steps, behind=behind, on_top=on_top)
    else:
        producer = SyncProducer(sample, sync)
    producer.timer = timer
    return producer
