"""The Ray side of a run: joining or starting a cluster, the job's environment, placing the actors, releasing them.

Placement follows the cluster's role resources (``cluster/README.md``): the plain dicts come from
:mod:`dsmath.placement` (no Ray), this module turns them into a placement group and actor options.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsmath.config import TrainConfig
from dsmath.errors import UserError
from wiring.console import log


def job_runtime_env() -> dict:
    """The runtime env of the Ray job this driver runs in (``ray job submit``), or ``{}`` outside a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def worker_runtime_env() -> dict:
    """The ``env_vars`` our actors need that the job's runtime env does not already set (never a duplicate key:
    Ray refuses to merge those); one line says which were added. While this process is quiet
    (:mod:`dsmath.logs`), also the setup hook that sends each worker's output to the run's log folder — unless the
    job has a setup hook of its own (Ray takes one)."""
    from dsmath.env import WORKER_ENV_KEYS, env_to_add
    from dsmath.logs import WORKER_HOOK, worker_env
    from dsmath.sandbox.service import TOKEN_ENV

    job = job_runtime_env()
    quiet = {} if job.get("worker_process_setup_hook") else worker_env()
    # The sandbox service's token: on a multi-node cluster the actors' processes descend from each node's
    # `ray start`, not from this driver, so it travels with the job (readable by whoever may read its runtime env).
    keys = WORKER_ENV_KEYS + (TOKEN_ENV,)
    ours = {**{k: os.environ[k] for k in keys if k in os.environ}, **quiet}
    job_env = job.get("env_vars") or {}
    added = env_to_add(ours, job_env)
    if job_env:
        kept = sorted(set(ours) - set(added))
        log(f"runtime env: the job sets {len(job_env)} variables; added {sorted(added) or 'none'}"
             + (f" (kept the job's {kept})" if kept else ""))
    env: dict = {"env_vars": added} if added else {}
    if quiet:
        env["worker_process_setup_hook"] = WORKER_HOOK
    return env


def connect_ray(cfg: TrainConfig):
    """Join the cluster at ``cfg.ray_address`` / ``$RAY_ADDRESS``, or start a local one.

    A local cluster ends with this process: Ray stops it at a normal exit, and a watchdog
    (:func:`dsmath.reaper.start_reaper`) ends whatever of it outlives a killed driver (Ray's agents do). A joined
    cluster is left as it is."""
    import ray

    from dsmath.reaper import start_reaper

    if ray.is_initialized():
        return ray
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = worker_runtime_env()
    if address:
        log(f"joining Ray cluster at {address}")
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=True)
    else:
        needed = (
            cfg.rollout.num_generators * cfg.rollout.cpus_per_generator
            + cfg.learner.num_ranks * cfg.learner.cpus_per_rank
            + cfg.reward.num_workers * 0.5
        )
        # Logical CPUs: sync mode runs the stages one after another, so actors may share cores.
        num_cpus = max(int(needed + 0.999), os.cpu_count() or 1)
        log(f"starting a local Ray cluster ({num_cpus} logical CPUs, no GPUs)")
        ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, runtime_env=runtime_env or None,
                 log_to_driver=True)
        start_reaper()
    return ray


def role_resources() -> dict[str, dict]:
    """Actor options for the cluster's role resources (cluster/README.md), when the cluster has them.

    On a plain local cluster there are none, and asking for one would leave the actor pending forever.
    """
    import ray

    from dsmath.placement import role_options

    return role_options(ray.cluster_resources())


@dataclass
class Placement:
    """One placement group: a bundle per generator, then a bundle per learner rank.

    PACK puts the learner's ranks and the generators on as few nodes as possible (NVLink for the
    collectives); on a single machine it is simply a reservation, so a step never waits on a stray task.
    Each bundle carries the role resource its actor asks for, when the cluster has roles (:mod:`dsmath.placement`).
    """

    group: Any
    num_generators: int

    def generator(self, i: int) -> dict:
        return self._bundle(i)

    def learner(self, rank: int) -> dict:
        return self._bundle(self.num_generators + rank)

    def _bundle(self, index: int) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=index)}


def place_actors(cfg: TrainConfig, timeout_s: float = 300.0) -> Placement:
    """Reserve the generators' and learner ranks' CPUs/GPUs/roles (from config) before creating any actor."""
    import ray
    from ray.util.placement_group import placement_group

    from dsmath.placement import actor_bundles

    r, lr = cfg.rollout, cfg.learner
    bundles = actor_bundles(cfg, ray.cluster_resources())
    group = placement_group(bundles, strategy="PACK", name=f"dsmath-{Path(cfg.run_dir).name}")
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        raise UserError(
            f"the cluster cannot place {r.num_generators} generators ({bundles[0]}) and {lr.num_ranks} learner ranks "
            f"({bundles[-1]}) within {timeout_s:.0f} s; it has {ray.cluster_resources()} (lower "
            "rollout.num_generators / learner.num_ranks or the per-actor cpus/gpus, or add nodes)"
        )
    return Placement(group=group, num_generators=r.num_generators)


# ----------------------------------------------------------------------------------------------- data



def release_actors(actors: list, learner, placement: Placement) -> None:
    """Have this run's actors remove the files each wrote on its node, kill them and free the placement group, so a
    later run on the same cluster gets them."""
    import ray
    from ray.util.placement_group import remove_placement_group

    learner.shutdown()
    # A dead actor's call fails at once; a hung one is killed after the wait, and the files it wrote stay until
    # the next sweep on its node (dsmath.model_folder.scratch_folder).
    if closing := [actor.remove_files.remote() for actor in actors]:
        ray.wait(closing, num_returns=len(closing), timeout=30)
    for actor in actors:
        ray.kill(actor)
    remove_placement_group(placement.group)
