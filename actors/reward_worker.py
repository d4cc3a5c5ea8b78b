"""The reward actor: one class that hosts whichever reward ``reward.kind`` picks (``dsmath.rewards``: rule grading,
the PoT sandbox, a reward model combined with either, or any kind registered there).

``RewardWorker`` is a plain class; ``reward_worker_actor_class()`` makes it a Ray actor. ``actors.pool.RewardPool``
spreads chunks over several of them (least outstanding rollouts first) and hands back one future per chunk, so the
driver submits each generator's output the moment it returns instead of waiting for the whole batch.

Guaranteed: what the hosted reward guarantees (``dsmath.rewards.base.Reward``): exactly one ``RewardResult`` per
rollout, in order; a grader or sandbox failure is a flagged result (``grader_failed``), never a lost one.
"""

from __future__ import annotations

from typing import Any, Sequence

from dsmath import rewards
from dsmath.model_folder import has_model_folder
from dsmath.records import ModelFiles, RewardResult, Rollout


class RewardWorker:
    """Hosts ``dsmath.rewards.build(cfg)`` (``cfg`` a TrainConfig).

    ``model``: None, or a one-element list holding the reward model's :class:`dsmath.records.ModelFiles` (or a Ray
    object ref to it; a list, so Ray does not fetch it before it is needed). Used only when this node has no
    ``reward.model_path`` (a cluster without a shared filesystem): the files are written to a scratch folder
    (``dsmath.model_folder.scratch_folder``), removed by ``remove_files`` (and ``close``), and the reward model is
    loaded from there."""

    def __init__(self, cfg, *, worker_id: str = "reward-0", model: list | None = None):
        self.local_model: str | None = None
        if cfg.reward.model_path and not has_model_folder(cfg.reward.model_path):
            cfg = self._with_local_model(cfg, model, worker_id)
        self.reward = rewards.build(cfg, worker_id=worker_id)

    def _with_local_model(self, cfg, model: list | None, worker_id: str):
        from dsmath.config import with_overrides
        from dsmath.errors import UserError
        from dsmath.model_folder import scratch_folder, write_model_files

        if not model:
            raise UserError(f"reward.model_path={cfg.reward.model_path}: no such model folder on {worker_id}'s node; "
                            f"put it on a shared filesystem, or set rollout.weights_from=learner to send it through "
                            f"Ray's object store")
        bundle = model[0] if isinstance(model[0], ModelFiles) else _fetch(model[0])
        self.local_model = str(write_model_files(bundle, scratch_folder(f"{worker_id}-rm")))
        print(f"[dsmath] {worker_id}: no {cfg.reward.model_path} on this node; the reward model came through the "
              f"object store ({sum(len(d) for _, d in bundle.files) / 2**20:.1f} MiB)", flush=True)
        return with_overrides(cfg, [f"reward.model_path={self.local_model}"])

    def score(self, rollouts: Sequence[Rollout]) -> list[RewardResult]:
        return self.reward.score(rollouts)

    def close(self) -> None:
        """Close the reward (its grading and sandbox pools) and remove the files this worker wrote."""
        self.reward.close()
        self.remove_files()

    def remove_files(self) -> None:
        """Remove the reward model this worker was sent (its scratch folder); call it before the actor is killed
        (``ray.kill`` runs no exit handlers). Scoring after it is not supported when there was one."""
        from dsmath.model_folder import remove_scratch_folder

        remove_scratch_folder(self.local_model)
        self.local_model = None

    def stats(self) -> dict[str, Any]:
        return self.reward.stats()


def _fetch(ref):
    import ray

    return ray.get(ref)


def reward_worker_actor_class(num_cpus: float = 0.5):
    """``RewardWorker`` as a Ray actor class: ``.remote(train_cfg, worker_id=...)``."""
    import ray

    return ray.remote(num_cpus=num_cpus)(RewardWorker)
