"""Wiring for the unified-paradigm switches (``algorithm.name``, ``algorithm.sampling``) in the training driver.

* :class:`OfflinePool` — the offline data source: every step's samples are drawn once, up front, from the
  starting policy (the SFT model), then handed to the loop one step at a time. Step s uses the same questions
  and the same sampling seed an online run's step s would, so step 1 of ``rft`` and ``online_rft`` train on
  identical samples; later steps differ only in the weights that sampled them.
* :func:`wrap_learner` — PPO and DPO need more than ``grpo_step``: a value model and GAE (PPO), pairs and the
  DPO loss against the frozen reference (DPO). The wrapper keeps the driver's call sequence and stage names
  (``advantages`` → ``old_logprobs`` → ``ref_logprobs`` → ``update``) and does the extra work inside ``update``
  (timed separately in the step's metrics: ``time/values``, ``time/value_update``).

This is the wiring layer (it imports the driver's helpers and the learner lazily); the math is
:mod:`dsmath.algorithms`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from dsmath.config import TrainConfig
from dsmath.errors import UserError
from dsmath.records import RewardResult, Rollout


@dataclass
class OfflinePool:
    """Samples (with their rewards) for steps ``first_step..last_step``, drawn before training starts."""

    steps: dict[int, tuple[list[Rollout], list[RewardResult]]] = field(default_factory=dict)
    seconds: float = 0.0
    questions_taken: int = 0

    @classmethod
    def draw(cls, cfg: TrainConfig, *, gen_pool, reward_pool, stream, prompt_mode: str, version: int, chunk: int,
             first_step: int, resume: bool, progress: bool = True,
             log: Callable[[str], None] = print) -> "OfflinePool":
        """Sample steps ``first_step..cfg.steps`` from the generators as they are now (``version``: the starting
        policy). Questions come from ``stream`` in step order; seeds are the online loop's per-step seeds.

        Raises UserError on ``resume``: a resumed run's generators hold the checkpoint's weights, not the
        starting policy's, so the rest of the pool could not be drawn again faithfully.
        """
        from tqdm import tqdm

        from wiring.rollout import generate_and_score, make_requests, step_seed
        from dsmath.utils.timing import StageTimer

        if resume:
            raise UserError("--resume: offline sampling (algorithm.sampling=offline, the default for rft and dpo) "
                            "draws its samples from the starting policy at the start of a run; start the run again instead")
        pool = cls()
        start = time.perf_counter()
        q, g, r = cfg.rollout.questions_per_step, cfg.rollout.group_size, cfg.rollout
        steps = range(first_step, cfg.steps + 1)
        for step in tqdm(steps, desc="offline pool", unit="step", disable=not progress, dynamic_ncols=True):
            problems = stream.take(q)
            pool.questions_taken += len(problems)
            requests = make_requests(problems, step=step, prompt_mode=prompt_mode, n=g, temperature=r.temperature,
                                     top_p=r.top_p, max_new_tokens=r.max_new_tokens, stop=r.stop, tag="s")
            pool.steps[step] = generate_and_score(gen_pool, reward_pool, requests, version, StageTimer(),
                                                  chunk_size=chunk, seed=step_seed(cfg.seed, step))
        pool.seconds = time.perf_counter() - start
        n = sum(len(v[0]) for v in pool.steps.values())
        log(f"offline pool: {n} samples for {len(pool.steps)} steps drawn from weight version {version} "
            f"in {pool.seconds:.1f} s")
        return pool

    def take(self, step: int) -> tuple[list[Rollout], list[RewardResult]]:
        """Step ``step``'s samples (each step's share is handed out once)."""
        if step not in self.steps:
            raise RuntimeError(f"the offline pool has no samples for step {step}")
        return self.steps.pop(step)


def wrap_learner(learner, cfg: TrainConfig, *, model_dir, seed: int, value_options: dict | None = None) -> Any:
    """The learner the driver should call: ``learner`` itself for grpo / online_rft / rft, a wrapper for
    ppo (:class:`learner.unified.PPOLearner`, which starts the value model's own Ray group) and dpo
    (:class:`learner.unified.DPOLearner`). The wrappers answer every other attribute from ``learner``."""
    from dsmath.methods import get

    kind = get(cfg.algorithm.name).learner
    if kind == "policy":
        return learner
    if kind == "dpo":
        from learner.unified import DPOLearner

        return DPOLearner(learner, cfg.algorithm, group_size=cfg.rollout.group_size)
    if kind == "ppo":
        from learner.unified import PPOLearner

        return PPOLearner(learner, cfg, model_dir=model_dir, seed=seed, value_options=value_options or {})
    raise UserError(f"algorithm.name={cfg.algorithm.name}: its learner {kind!r} is not wired into the training loop")
