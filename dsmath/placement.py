"""What a training run asks the cluster for, as plain dicts (no Ray): placement-group bundles and a fit check.

Clusters built from ``cluster/`` advertise each node's role as a Ray custom resource (``generator``, ``learner``,
``reward``, ``sandbox``, ``driver``) and every actor asks for one unit of its role besides CPUs/GPUs. An actor that
sits in a placement-group bundle can only use what that bundle holds, so each bundle carries the role resource of
the actor that will sit in it — when the cluster has that resource at all. On a plain cluster (``ray.init()`` on a
laptop, no roles) the bundles hold CPUs/GPUs only and the actors ask for no role.

Guaranteed: :func:`actor_bundles` lists one bundle per generator, then one per learner rank, in that order (the
driver's bundle indices rely on it), and :func:`role_options` asks for exactly the role units the bundles hold.
:func:`first_fit` is a feasibility check (first-fit decreasing), not Ray's scheduler: it says a request fits a
set of nodes when some assignment exists that it finds; Ray's PACK strategy may choose another.
"""

from __future__ import annotations

from collections.abc import Mapping

# The roles an actor asks for, by kind of actor.
ACTOR_ROLES = ("generator", "learner", "reward")


def roles_present(cluster_resources: Mapping[str, float]) -> set[str]:
    """The actor roles this cluster advertises (``ray.cluster_resources()`` or a node list's union)."""
    return {role for role in ACTOR_ROLES if cluster_resources.get(role, 0) > 0}


def role_options(cluster_resources: Mapping[str, float]) -> dict[str, dict]:
    """Actor options per role: ``{"generator": {"resources": {"generator": 1}}, ...}`` for the roles present."""
    return {role: {"resources": {role: 1}} for role in sorted(roles_present(cluster_resources))}


def _bundle(cpus: float, gpus: float, role: str, roles: set[str]) -> dict[str, float]:
    out = {"CPU": float(cpus)}
    if gpus > 0:
        out["GPU"] = float(gpus)
    if role in roles:
        out[role] = 1.0
    return out


def actor_bundles(cfg, cluster_resources: Mapping[str, float]) -> list[dict[str, float]]:
    """One bundle per generator, then one per learner rank: CPUs, GPUs and (when the cluster has it) the role."""
    roles = roles_present(cluster_resources)
    r, lr = cfg.rollout, cfg.learner
    bundles = [_bundle(r.cpus_per_generator, r.gpus_per_generator, "generator", roles)
               for _ in range(r.num_generators)]
    bundles += [_bundle(lr.cpus_per_rank, lr.gpus_per_rank, "learner", roles) for _ in range(lr.num_ranks)]
    return bundles


def loose_requests(cfg, cluster_resources: Mapping[str, float], *, reward_cpus: float = 0.5,
                   driver_resources: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """What the run asks for outside its placement group: one request per reward worker (0.5 CPU and its role),
    and the driver's entrypoint resources (e.g. ``{"driver": 1}`` from ``ray job submit --entrypoint-resources``)."""
    roles = roles_present(cluster_resources)
    out = [_bundle(reward_cpus, 0.0, "reward", roles) for _ in range(cfg.reward.num_workers)]
    if driver_resources:
        out.append({k: float(v) for k, v in driver_resources.items()})
    return out


def first_fit(requests: list[Mapping[str, float]], nodes: list[Mapping[str, float]]) -> list[int] | None:
    """Place each request on a node with room for all of it (largest requests first); the node index per request,
    or None when some request finds no node. ``nodes`` are the nodes' total resources."""
    free = [dict(n) for n in nodes]
    order = sorted(range(len(requests)), key=lambda i: (-requests[i].get("GPU", 0.0), -requests[i].get("CPU", 0.0)))
    where: list[int] = [-1] * len(requests)
    for i in order:
        req = requests[i]
        for j, node in enumerate(free):
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in req.items()):
                for k, v in req.items():
                    node[k] = node.get(k, 0.0) - v
                where[i] = j
                break
        else:
            return None
    return where


def fit_problem(cfg, nodes: list[Mapping[str, float]], *, driver_resources: Mapping[str, float] | None = None
                ) -> str | None:
    """None when the run's bundles, reward workers and driver all fit ``nodes``; else one line saying what not."""
    union: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            union[k] = union.get(k, 0.0) + float(v)
    bundles = actor_bundles(cfg, union)
    loose = loose_requests(cfg, union, driver_resources=driver_resources)
    if first_fit(bundles + loose, nodes) is not None:
        return None
    if first_fit(bundles, nodes) is None:
        return (f"the {cfg.rollout.num_generators} generator and {cfg.learner.num_ranks} learner bundles "
                f"({bundles[0]}, {bundles[-1]}) do not fit the nodes {list(nodes)}")
    return f"the bundles fit, but not also the reward workers and driver ({loose[0]}) on the nodes {list(nodes)}"
