"""DPO (paper A.1.4, Table 10): pairs of a right and a wrong completion of one question, drawn once from the
starting policy; the loss is relative to the frozen reference (strength ``algorithm.dpo_beta``, not β)."""

from __future__ import annotations

from dsmath.methods.base import Method
from dsmath.methods.online_rft import correctness


def check(cfg) -> str | None:
    if cfg.algorithm.beta != 0:
        return ("algorithm.beta: dpo's gradient coefficient has no KL term (paper Table 10); set algorithm.beta=0 "
                "(DPO's strength is algorithm.dpo_beta)")
    if cfg.rollout.group_size < 2:
        return "rollout.group_size: DPO pairs a right and a wrong completion of one question; needs at least 2"
    return None


METHOD = Method(name="dpo", sampling="offline", advantages=correctness, kl="none", reads_old_logprobs=True,
                always_reference=True, learner="dpo", check=check)
