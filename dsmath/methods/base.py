"""What a method of the unified paradigm is (:mod:`dsmath.methods` holds the registry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

Sampling = Literal["online", "offline"]


def no_refusal(cfg: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Method:
    """One method: where its samples come from, what coefficient each sample gets, where β enters.

    ``advantages(algo_cfg, rollouts, results, group_size)`` returns one float or one per-token list per rollout
    (groups of ``group_size`` contiguous samples). ``check(train_cfg)`` returns a one-line refusal, or None."""

    name: str
    sampling: Sampling  # the data source when algorithm.sampling=auto
    advantages: Callable[..., list]
    kl: Literal["loss", "reward", "none"]  # where algorithm.beta enters: GRPO's loss, PPO's token reward, nowhere
    reads_old_logprobs: bool = False  # its update reads π_old beyond ratio 1 (PPO's KL reward, DPO's pairs)
    always_reference: bool = False  # DPO: the loss is relative to π_ref whatever β is
    learner: Literal["policy", "ppo", "dpo"] = "policy"  # which learner runs the update (wiring.paradigm)
    check: Callable[[Any], str | None] = no_refusal
