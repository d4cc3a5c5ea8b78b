"""The rewards, one file each, behind one small Protocol (:class:`dsmath.rewards.base.Reward`).

``reward.kind`` picks one: ``rule`` (the stated final answer, graded by :mod:`dsmath.grading`), ``sandbox`` (the
program of a ``pot`` completion, run in the sandbox), ``combined`` (one of those plus a reward model's score,
:mod:`dsmath.rewards.model`, combined as ``reward.combine`` says), or ``auto`` (the default): ``combined`` when
``reward.model_path`` is set or ``algorithm.advantage=process``, else ``sandbox`` for ``rollout.mode=pot``, else
``rule``. The reward actor (``actors.reward_worker.RewardWorker``) hosts whatever :func:`build` makes; neither it
nor the driver branches on a kind's name. Adding a reward: one new file here defining ``KIND`` (a
:class:`~dsmath.rewards.base.RewardKind`), and its module in :data:`REGISTRY`'s tuple.

Importing this package imports neither torch nor sympy (the reward model and the grading workers load on use).
"""

from __future__ import annotations

from dsmath.errors import ConfigError, UserError
from dsmath.rewards import combined, rule, sandbox
from dsmath.rewards.base import Reward, RewardKind

# The registry: a new reward is one new file in this folder and its module in this tuple.
REGISTRY: dict[str, RewardKind] = {m.KIND.name: m.KIND for m in (rule, sandbox, combined)}

AUTO = "auto"


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> RewardKind:
    """The kind called ``name``; a ``ConfigError`` naming the choices for any other name."""
    if name not in REGISTRY:
        raise ConfigError(f"reward.kind: {name!r} is not one of {', '.join([AUTO, *names()])}")
    return REGISTRY[name]


def kind_name(cfg) -> str:
    """``cfg.reward.kind``, with ``auto`` resolved from the other keys (``cfg`` a TrainConfig)."""
    if cfg.reward.kind != AUTO:
        return cfg.reward.kind
    if cfg.reward.model_path or cfg.algorithm.advantage == "process":
        return "combined"
    return "sandbox" if cfg.rollout.mode == "pot" else "rule"


def choose(cfg) -> RewardKind:
    """The kind ``cfg`` picks; its refusal, if any, as a one-line ``UserError`` (the driver asks before any reward
    actor starts)."""
    kind = get(kind_name(cfg))
    refusal = kind.check(cfg)
    if refusal:
        raise UserError(refusal)
    return kind


def build(cfg, *, worker_id: str = "reward-0") -> Reward:
    """The reward ``cfg`` picks (see :func:`choose`), ready to ``score``."""
    return choose(cfg).build(cfg, worker_id)


def verifier(cfg, *, worker_id: str = "reward-0") -> Reward:
    """The verdict reward of ``cfg.rollout.mode`` whatever ``reward.kind`` says: ``sandbox`` for ``pot``, else
    ``rule`` (the grading part of ``combined``, and the grader that labels reward-model data)."""
    return REGISTRY["sandbox" if cfg.rollout.mode == "pot" else "rule"].build(cfg, worker_id)


__all__ = ["REGISTRY", "AUTO", "Reward", "RewardKind", "names", "get", "kind_name", "choose", "build", "verifier"]
