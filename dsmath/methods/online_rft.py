"""Online RFT (paper Table 10): gradient coefficient I(o) — 1 for a right answer, 0 otherwise — on samples of the
current policy. No KL term."""

from __future__ import annotations

from dsmath.methods.base import Method


def correctness(cfg, rollouts, results, group_size: int) -> list:
    """GC = I(o) for every sample (RFT, online RFT; DPO builds its pairs from it)."""
    import torch

    from dsmath.algorithms import rft_coefficients

    return rft_coefficients(torch.tensor([bool(r.correct) for r in results])).tolist()


def no_kl(cfg) -> str | None:
    if cfg.algorithm.beta != 0:
        return (f"algorithm.beta: {cfg.algorithm.name}'s gradient coefficient has no KL term (paper Table 10); "
                "set algorithm.beta=0")
    return None


METHOD = Method(name="online_rft", sampling="online", advantages=correctness, kl="none", check=no_kl)
