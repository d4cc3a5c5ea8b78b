"""The RL methods of the unified paradigm (DeepSeekMath §5.2), one file each, behind one small record.

A method says where its samples come from by default, what gradient coefficient each sample gets (its
"advantages"), where β enters (GRPO's loss, PPO's per-token reward, or nowhere), whether its update reads the
sampling policy's log-probs, whether it always needs the reference, which learner runs its update, and which
configurations it refuses. The driver, the learner and the config validation ask the registry; none of them
branches on a method's name. Adding a method: one new file here defining ``METHOD``, and its module in
:data:`REGISTRY`'s tuple.

The kernels (group advantages, GAE, DPO coefficients, …) live in :mod:`dsmath.algorithms` and
:mod:`dsmath.grpo`, each kernel ``f`` with its plain-loop twin ``f_loop`` right after it.
"""

from __future__ import annotations

from typing import Sequence

from dsmath.errors import ConfigError
from dsmath.methods import dpo, grpo, online_rft, ppo, rft
from dsmath.methods.base import Method, Sampling

# The registry: a new method is one new file in this folder and its module in this tuple.
REGISTRY: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (grpo, online_rft, rft, ppo, dpo)}


def names() -> list[str]:
    return sorted(REGISTRY)


def get(name: str) -> Method:
    """The method called ``name``; a ``ConfigError`` naming the choices for any other name."""
    if name not in REGISTRY:
        raise ConfigError(f"algorithm.name: {name!r} is not one of {', '.join(names())}")
    return REGISTRY[name]


def sample_advantages(cfg, rollouts: Sequence, results: Sequence, group_size: int) -> list:
    """The driver's ``advantages`` stage: the method's coefficient per sample (``cfg`` an AlgorithmConfig).

    Guaranteed: one entry per rollout, in order — a float, or ``len(completion_ids)`` floats (process
    supervision). Raises ``ValueError`` for a method / supervision pair without a rule (PPO with process rewards).
    """
    if len(rollouts) != len(results):
        raise ValueError(f"{len(rollouts)} rollouts but {len(results)} rewards")
    return get(cfg.name).advantages(cfg, rollouts, results, group_size)


def resolve_sampling(algorithm: str, sampling: str) -> Sampling:
    """``online`` or ``offline`` for ``algorithm.name`` / ``algorithm.sampling`` (``auto`` → the method's own)."""
    return get(algorithm).sampling if sampling == "auto" else sampling  # type: ignore[return-value]


def needs_reference(algo_cfg) -> bool:
    """Whether training with ``algo_cfg`` ever reads the frozen reference: when β enters somewhere (β > 0 and the
    method has a KL term) or the method always does (DPO). With False no reference model is built."""
    method = get(algo_cfg.name)
    return method.always_reference or (algo_cfg.beta > 0 and method.kl != "none")


def loss_beta(algo_cfg) -> float:
    """β in the policy loss: the configured β where the method pays the KL in its loss, else 0."""
    return algo_cfg.beta if get(algo_cfg.name).kl == "loss" else 0.0


def needs_old_logprobs(algo_cfg, *, off_policy: bool) -> bool:
    """Whether an update needs a separate pass for the sampling policy's log-probs before it: off-policy samples
    (async: the IS weights), several updates per batch (μ > 1), or a method whose update reads them. One
    on-policy update otherwise uses its own detached log-probs (ratio exactly 1)."""
    return off_policy or algo_cfg.updates_per_step > 1 or get(algo_cfg.name).reads_old_logprobs

